"""Top-N metrics: Recall, NDCG (IDCG over min(|targets|, N)) and HitRate
(docs/architecture.md, "Evaluation protocol")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CUTOFFS = (20, 50)
# A tail target: an item with at most this many interactions among the training users.
TAIL_MAX_COUNT = 5


def user_metrics(ranked: np.ndarray, targets: np.ndarray, n: int) -> tuple[float, float, float]:
    """(recall, ndcg, hit) of one user's ranked list against its set of target items."""
    target_set = set(np.asarray(targets).tolist())
    if not target_set:
        raise ValueError("a user needs at least one target")
    top = np.asarray(ranked)[:n].tolist()
    gains = np.array([1.0 if item in target_set else 0.0 for item in top])
    hits = gains.sum()
    discounts = 1.0 / np.log2(np.arange(2, n + 2))
    dcg = float((gains * discounts[: len(gains)]).sum())
    idcg = float(discounts[: min(len(target_set), n)].sum())
    return hits / len(target_set), dcg / idcg, float(hits > 0)


def per_user_metrics(
    ranked_lists: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    cutoffs: Sequence[int] = CUTOFFS,
) -> dict[str, np.ndarray]:
    """Each metric for each user (in the given order), keyed like 'recall@50': what paired
    comparisons between models need."""
    if len(ranked_lists) != len(targets):
        raise ValueError("one ranked list per user")
    out: dict[str, np.ndarray] = {}
    for n in cutoffs:
        rows = np.array([user_metrics(r, t, n) for r, t in zip(ranked_lists, targets, strict=True)])
        for name, col in zip(("recall", "ndcg", "hitrate"), rows.T, strict=True):
            out[f"{name}@{n}"] = col
    return out


def aggregate(
    ranked_lists: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    cutoffs: Sequence[int] = CUTOFFS,
) -> dict[str, float]:
    """Mean of each metric over users, keyed like 'recall@50'."""
    return {name: float(values.mean())
            for name, values in per_user_metrics(ranked_lists, targets, cutoffs).items()}


def tail_recall(ranked_lists: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                popularity: np.ndarray, n: int = 50,
                max_count: int = TAIL_MAX_COUNT) -> dict[str, np.ndarray]:
    """Per user: Recall@n on the targets with at most `max_count` training interactions
    (`popularity`: counts per internal id), NaN for a user without such a target."""
    out = []
    for ranked, wanted in zip(ranked_lists, targets, strict=True):
        wanted = np.asarray(wanted)
        tail = wanted[popularity[wanted] <= max_count]
        out.append(np.isin(tail, np.asarray(ranked)[:n]).mean() if len(tail) else np.nan)
    return {f"tail_recall@{n}": np.asarray(out, dtype=float)}
