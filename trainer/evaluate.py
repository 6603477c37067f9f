"""ComiRec evaluation: exact full-catalogue retrieval per interest, merged by score."""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from service.retrieval import merge_interest_results
from trainer.dataset import EvalSplit, SequenceDataset
from trainer.metrics import CUTOFFS, aggregate

# Maps right-aligned histories [U, L] to interests [U, K, d] (a torch model or an ONNX session).
Encoder = Callable[[np.ndarray], np.ndarray]


def retrieve(interests: np.ndarray, item_vectors: np.ndarray, n: int) -> list[np.ndarray]:
    """Top-n internal item ids per user: exact inner-product search for each interest, merged.

    item_vectors row i is internal id i + 1.
    """
    users, k, d = interests.shape
    index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(item_vectors, dtype=np.float32))
    scores, rows = index.search(np.ascontiguousarray(interests.reshape(-1, d), np.float32), n)
    scores, rows = scores.reshape(users, k, n), rows.reshape(users, k, n)
    ranked = []
    for u in range(users):
        ids, _, _ = merge_interest_results(scores[u], rows[u], n)
        ranked.append(ids + 1)
    return ranked


def evaluate_encoder(
    encode: Encoder, item_vectors: np.ndarray, split: EvalSplit, batch_size: int = 1024
) -> dict[str, float]:
    parts = [encode(split.histories[i : i + batch_size])
             for i in range(0, len(split.histories), batch_size)]
    interests = np.concatenate(parts) if parts else np.zeros((0, 1, item_vectors.shape[1]))
    return aggregate(retrieve(interests, item_vectors, max(CUTOFFS)), split.targets)


def most_popular(dataset: SequenceDataset, split: EvalSplit) -> dict[str, float]:
    """MostPop baseline: the same top items (by training-user counts) for everyone."""
    popularity = dataset.popularity()
    popularity[0] = -1
    top = np.argsort(-popularity, kind="stable")[: max(CUTOFFS)]
    return aggregate([top] * len(split.targets), split.targets)
