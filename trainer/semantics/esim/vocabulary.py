"""The interest vocabulary: k-means over the semantic interests' sentence embeddings."""

from __future__ import annotations

import logging

import faiss
import numpy as np

log = logging.getLogger(__name__)


def interest_vocabulary(embeddings: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A vocabulary label per interest: k-means (cosine) over the interest embeddings."""
    size = max(1, min(size, len(embeddings)))
    if size == 1:
        return np.zeros(len(embeddings), dtype=np.int64)
    kmeans = faiss.Kmeans(embeddings.shape[1], size, niter=25, seed=seed, spherical=True,
                          verbose=False, min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(embeddings, dtype=np.float32))
    _, labels = kmeans.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64)
