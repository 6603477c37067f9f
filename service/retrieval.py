"""Merging per-interest retrieval results into one ranked list.

Shared by the service (online) and the trainer's evaluation (offline), so that offline metrics
measure exactly what is served: each interest retrieves its top-N, the K*N candidates are
ranked by score, de-duplicated (an item keeps its best score and the interest that gave it)
and cut to N.
"""

from __future__ import annotations

import numpy as np


def merge_interest_results(
    scores: np.ndarray,
    ids: np.ndarray,
    n: int,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scores, ids: [K, M] per-interest results (ids < 0 are FAISS's 'no result').

    Returns (ids, scores, interest index) of the best `n` distinct items, best first.
    """
    num_interests, per_interest = ids.shape
    flat_ids = ids.reshape(-1)
    flat_scores = scores.reshape(-1)
    interest = np.repeat(np.arange(num_interests), per_interest)
    keep = flat_ids >= 0
    if exclude is not None and len(exclude):
        keep &= ~np.isin(flat_ids, exclude)
    flat_ids, flat_scores, interest = flat_ids[keep], flat_scores[keep], interest[keep]
    order = np.argsort(-flat_scores, kind="stable")
    flat_ids, flat_scores, interest = flat_ids[order], flat_scores[order], interest[order]
    _, first = np.unique(flat_ids, return_index=True)  # first = best-scored occurrence
    first = np.sort(first)[:n]
    return flat_ids[first], flat_scores[first], interest[first]
