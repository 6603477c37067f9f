"""Recommendations from one loaded bundle: history -> K interests -> per-interest FAISS top-N
-> merged list. A Recommender is immutable once built, so swapping the served model is one
reference assignment and requests in flight finish on the model they started with."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.bundle import Bundle
from service.retrieval import merge_interest_results


@dataclass
class Recommendation:
    item_ids: list[str]
    titles: list[str]
    scores: list[float]
    interests: list[int | None]  # interest index per item; None for the popularity fallback
    fallback: bool
    used_history: int  # known items that went into the encoder
    unknown_items: int  # history ids not in the catalogue (ignored)
    interest_counts: list[int] = field(default_factory=list)


class Recommender:
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        m = bundle.manifest
        self.name, self.version = m.name, m.version
        self.maxlen, self.num_interests, self.item_count = m.maxlen, m.interests, m.item_count
        # External id -> internal id (1..N); built once per bundle.
        self.internal = {item: i + 1 for i, item in enumerate(bundle.item_ids.tolist())}
        self.popular_rows = np.argsort(-bundle.popularity, kind="stable")

    def to_internal(self, item_ids: list[str]) -> tuple[list[int], int]:
        """Known internal ids in order, and how many ids were unknown."""
        known = [self.internal[i] for i in item_ids if i in self.internal]
        return known, len(item_ids) - len(known)

    def recommend(self, history: list[str], k: int, exclude: list[str] | None = None,
                  fanout: int = 50) -> Recommendation:
        known, unknown = self.to_internal(history)
        excluded = np.array(sorted({self.internal[i] - 1 for i in (exclude or [])
                                    if i in self.internal}), dtype=np.int64)
        k = min(k, self.item_count - len(excluded))
        if not known:
            return self._popular(k, excluded, unknown)
        recent = known[-self.maxlen :]
        row = np.zeros((1, self.maxlen), dtype=np.int64)
        row[0, self.maxlen - len(recent) :] = recent
        interests = self.bundle.encode(row)[0]  # [K, d]
        # Enough candidates per interest that exclusions and duplicates still leave k.
        n = min(self.item_count, max(fanout, k + len(excluded)))
        scores, rows = self.bundle.search(interests, n)
        ids, best, which = merge_interest_results(scores, rows, k, excluded)
        counts = np.bincount(which, minlength=self.num_interests).tolist()
        return Recommendation(
            item_ids=self.bundle.item_ids[ids].tolist(), titles=self.bundle.titles[ids].tolist(),
            scores=best.astype(float).tolist(),
            interests=which.tolist(), fallback=False, used_history=len(recent),
            unknown_items=unknown, interest_counts=counts)

    def _popular(self, k: int, excluded: np.ndarray, unknown: int) -> Recommendation:
        rows = self.popular_rows[: k + len(excluded)]
        if len(excluded):
            rows = rows[~np.isin(rows, excluded)]
        rows = rows[:k]
        return Recommendation(
            item_ids=self.bundle.item_ids[rows].tolist(),
            titles=self.bundle.titles[rows].tolist(),
            scores=self.bundle.popularity[rows].astype(float).tolist(),
            interests=[None] * len(rows), fallback=True, used_history=0, unknown_items=unknown,
            interest_counts=[0] * self.num_interests)
