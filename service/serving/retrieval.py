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


def interest_support(interests: np.ndarray, history_vectors: np.ndarray) -> np.ndarray:
    """How many history items each interest explains best: [K] counts (each item counts for
    the interest with which its inner product is largest)."""
    if len(history_vectors) == 0:
        return np.zeros(len(interests), dtype=np.int64)
    best = (history_vectors @ interests.T).argmax(axis=1)
    return np.bincount(best, minlength=len(interests))


def adapt_interests(interests: np.ndarray, support: np.ndarray, merge_cosine: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive interests at serving (the adaptive granularity of docs/architecture.md,
    "ESIM levels", applied per user): an interest no history item supports is dropped, and
    one whose direction is within `merge_cosine` of a better-supported kept interest is
    merged into it (its support joins the kept one's).

    Returns (weights [K]: share of the list per kept interest, 0 for dropped/merged ones;
    merged_into [K]: the kept interest each one went to, itself if kept, -1 if dropped).
    Without any support (no history) every interest is kept with equal weight."""
    k = len(interests)
    if support.sum() == 0:
        return np.full(k, 1.0 / k), np.arange(k)
    unit = interests / np.maximum(np.linalg.norm(interests, axis=1, keepdims=True), 1e-12)
    merged_into = np.full(k, -1)
    weight = np.zeros(k)
    for i in np.argsort(-support, kind="stable"):
        if support[i] == 0:
            continue
        kept = np.flatnonzero(merged_into == np.arange(k))
        near = kept[unit[kept] @ unit[i] >= merge_cosine] if len(kept) else kept
        target = int(near[0]) if len(near) else int(i)
        merged_into[i] = target
        weight[target] += support[i]
    return weight / weight.sum(), merged_into


def copy_groups(interests: np.ndarray, support: np.ndarray, cosine: float) -> np.ndarray:
    """Which interests are near-copies, for reporting what a list is made of (not a
    re-ranking): interests taken by support, most first, each joining the first kept one within
    `cosine`, else kept. Returns [K]: the kept interest each one is reported as (itself if
    kept). Unlike `adapt_interests`, an interest without support is grouped too."""
    k = len(interests)
    unit = interests / np.maximum(np.linalg.norm(interests, axis=1, keepdims=True), 1e-12)
    group = np.full(k, -1)
    for i in np.argsort(-support, kind="stable"):
        kept = np.flatnonzero(group == np.arange(k))
        near = kept[unit[kept] @ unit[i] >= cosine] if len(kept) else kept
        group[i] = int(near[0]) if len(near) else int(i)
    return group


def share_quotas(weights: np.ndarray, n: int) -> np.ndarray:
    """n list places split by weight (largest remainder): [K] ints summing to n."""
    exact = weights * n
    quotas = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[: n - quotas.sum()]] += 1
    return quotas


def merge_by_share(scores: np.ndarray, ids: np.ndarray, n: int, weights: np.ndarray,
                   exclude: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like `merge_interest_results`, but each interest fills its share of the n places
    (`share_quotas`) with its own best items, the heavier interests first; places left over
    (an interest ran out of distinct candidates) go to the best remaining items by score. The
    list is then ordered by score."""
    quotas = share_quotas(weights, n)
    taken: dict[int, tuple[float, int]] = {}
    excluded = set(exclude.tolist()) if exclude is not None and len(exclude) else set()
    for k in np.argsort(-weights, kind="stable"):
        need = quotas[k]
        for score, item in zip(scores[k].tolist(), ids[k].tolist(), strict=True):
            if need == 0:
                break
            if item >= 0 and item not in taken and item not in excluded:
                taken[item] = (score, int(k))
                need -= 1
    if len(taken) < n:
        rest_ids, rest_scores, rest_interest = merge_interest_results(
            scores[weights > 0], ids[weights > 0], n,
            np.array(sorted(excluded | taken.keys()), dtype=np.int64))
        active = np.flatnonzero(weights > 0)
        for item, score, k in zip(rest_ids.tolist(), rest_scores.tolist(),
                                  active[rest_interest].tolist(), strict=True):
            if len(taken) == n:
                break
            taken[item] = (score, k)
    items = np.array(list(taken), dtype=np.int64)
    best = np.array([s for s, _ in taken.values()], dtype=np.float32)
    which = np.array([k for _, k in taken.values()], dtype=np.int64)
    order = np.argsort(-best, kind="stable")
    return items[order], best[order], which[order]


def merge_diverse(scores: np.ndarray, ids: np.ndarray, n: int, diversity: float,
                  exclude: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`merge_interest_results` with a per-request trade of score for coverage of the
    interests (ComiRec's controllable aggregation, with the interest an item came from as its
    category). Greedily, each place goes to the candidate with the largest
    score' - diversity * share, where score' is its score scaled to [0, 1] over the candidates
    and share is the fraction of the places taken so far that its interest already holds. At
    0 this is the merge by score; at 1 an interest that holds every place so far gives way to
    any candidate of an unrepresented one. Returned best-first by that greedy order."""
    if diversity <= 0:
        return merge_interest_results(scores, ids, n, exclude)
    ids_all, best, which = merge_interest_results(scores, ids, scores.size, exclude)
    if len(ids_all) == 0:
        return ids_all, best, which
    span = float(best[0] - best[-1]) or 1.0
    scaled = (best - best[-1]) / span
    held = np.zeros(scores.shape[0])
    free = np.ones(len(ids_all), dtype=bool)
    picked: list[int] = []
    for t in range(min(n, len(ids_all))):
        gain = scaled - diversity * (held[which] / max(t, 1))
        gain[~free] = -np.inf
        pick = int(np.argmax(gain))  # ties: the better-scored (earlier) candidate
        picked.append(pick)
        free[pick] = False
        held[which[pick]] += 1
    order = np.asarray(picked, dtype=np.int64)
    return ids_all[order], best[order], which[order]
