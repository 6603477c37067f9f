"""Naming behavioural interests online, without an LLM (docs/architecture.md, "Named interests").

A bundle trained with ESIM ships its interest vocabulary (label names and MiniLM vectors) and
ESIM's projection g (service/bundle/, `NamingTables`). Interest v is named by the label whose
vector is nearest g(v) (cosine); the cosine is the confidence. Below the bundle's calibrated
threshold (or the MIN_NAME_CONFIDENCE setting) the interest stays unnamed: no name rather than
a wrong one. A few small matrix products per request (K x d x 384).
"""

from __future__ import annotations

import numpy as np

from service.bundle.naming_files import NamingTables


class InterestNamer:
    def __init__(self, tables: NamingTables) -> None:
        self.names = tables.names
        self.min_confidence = tables.min_confidence  # calibrated at export
        # cos(g(v), e_l) with g(v) = W v + b, computed in the encoder's d dimensions instead of
        # the vocabulary's 384: <g(v), e_l> = v . (W^T e_l) + <b, e_l> and
        # |g(v)|^2 = v^T (W^T W) v + 2 v . (W^T b) + |b|^2. Small products stay on one thread
        # (a 384-wide one made OpenBLAS fan out, which cost milliseconds on a busy machine).
        w = tables.projection.astype(np.float64)  # [384, d]
        b = tables.bias.astype(np.float64)
        e = tables.vocabulary.astype(np.float64)  # [L, 384]
        self.to_labels = (w.T @ e.T).astype(np.float32)  # [d, L]
        self.label_offset = (e @ b).astype(np.float32)  # [L]
        self.gram = (w.T @ w).astype(np.float32)  # [d, d]
        self.cross = (w.T @ b).astype(np.float32)  # [d]
        self.bias_norm2 = float(b @ b)

    def nearest(self, interests: np.ndarray) -> tuple[list[str], list[float]]:
        """interests [K, d] -> the nearest label's name and its cosine, per interest."""
        norm2 = (np.einsum("kd,kd->k", interests @ self.gram, interests)
                 + 2 * interests @ self.cross + self.bias_norm2)
        similarity = (interests @ self.to_labels + self.label_offset) / np.sqrt(
            np.maximum(norm2, 1e-24))[:, None]  # [K, L]
        best = similarity.argmax(axis=1)
        confidence = similarity[np.arange(len(best)), best]
        return [self.names[i] for i in best.tolist()], confidence.tolist()

    def name(self, interests: np.ndarray, min_confidence: float | None = None
             ) -> list[tuple[str | None, float]]:
        """(name or None when below the threshold, confidence) per interest; the threshold is
        the bundle's calibrated one unless `min_confidence` overrides it."""
        threshold = self.min_confidence if min_confidence is None else min_confidence
        labels, confidence = self.nearest(interests)
        return [(label if c >= threshold else None, round(c, 4))
                for label, c in zip(labels, confidence, strict=True)]
