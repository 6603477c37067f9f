"""Recommendations from one loaded bundle: history -> K interests -> per-interest FAISS top-N
-> merged list. A Recommender is immutable once built, so swapping the served model is one
reference assignment and requests in flight finish on the model they started with."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import faiss
import numpy as np

from service.bundle.format import CATEGORY_FIELD
from service.bundle.load import Bundle
from service.serving.filters import (
    EXACT_FILTER_MAX_ROWS,
    ItemFilter,
    ResolvedFilters,
    allowed_rows,
    exact_search,
    in_sorted,
    restricted_search,
)
from service.serving.interest_names import InterestNamer
from service.serving.retrieval import (
    adapt_interests,
    copy_groups,
    interest_support,
    merge_by_share,
    merge_diverse,
    merge_interest_results,
)
from service.serving.row_policy import NEW_ITEM_SHARE, RowPolicy
from service.serving.rows import (
    FieldLabels,
    Row,
    best_by_candidates,
    best_by_scores_lazily,
    best_by_search,
    interest_rows,
)
from service.store.availability import EMPTY as NO_UNAVAILABLE
from service.store.availability import Snapshot

# Up to this many unavailable rows (and no filter) a request excludes them, searching
# n + this many candidates per interest in the shared batched search; above it, it searches
# the available rows only (a restricted search of its own).
UNAVAILABLE_AS_EXCLUSIONS = 256


@dataclass(frozen=True)
class Shaping:
    """How interests shape an answer (from the settings; the same for every request)."""

    # Adaptive interests: drop unsupported ones, merge those within this cosine, give each a
    # share of the list by its support (service.serving.retrieval.adapt_interests). None: off, the
    # K lists merged by score (what the model is trained and evaluated for).
    merge_cosine: float | None = None
    # Override of the bundle's calibrated naming threshold; None: the bundle's.
    min_name_confidence: float | None = None
    # Per request: trade score for coverage of the interests (merge_diverse); 0: by score.
    # Adaptive interests set each interest's share themselves and ignore it.
    diversity: float = 0.0
    # Interests within this cosine are reported as one in the answer's interest summary (and
    # the items they gave as the kept one's); the list itself is unchanged. None: each apart.
    copy_cosine: float | None = 0.9
    # Interest rows (service.serving.rows): how many (per request), their size and choice, and
    # the item fields they may come from, in order of preference for equal scores.
    rows: RowPolicy = RowPolicy()
    row_fields: tuple[str, ...] = (CATEGORY_FIELD,)
    # New items (no event yet, placed by their text at export): the list's last
    # round(k x share) places go to the best of them by the model's score, unless the list
    # holds that many already (docs/architecture.md, "New items in the list").
    new_item_share: float = NEW_ITEM_SHARE


DEFAULT_SHAPING = Shaping()


@dataclass(frozen=True)
class InterestDetail:
    weight: float  # share of the history this interest explains (its share of the list
    #                with adaptive interests); 0 for a dropped or merged interest
    merged_into: int | None  # adaptive: the interest it was merged into; None if kept/off
    dropped: bool  # adaptive: no history item supports it, so it retrieved nothing
    name: str | None = None  # bundles trained with ESIM, when confident
    confidence: float | None = None


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
    interest_details: list[InterestDetail] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)  # interest rows, when asked for
    new: list[bool] = field(default_factory=list)  # per item: without any event yet


@dataclass
class Query:
    """A validated request, ready for the encoder: what a batch stacks and searches."""
    row: np.ndarray  # [maxlen] right-aligned internal ids
    k: int  # items to return (already capped by the catalogue minus exclusions)
    n: int  # FAISS candidates per interest
    excluded: np.ndarray  # 0-based rows never to return
    used_history: int
    unknown_items: int
    shaping: Shaping = DEFAULT_SHAPING
    allowed: np.ndarray | None = None  # a filter's rows (ascending); None: every row


@dataclass
class SimilarItems:
    item_ids: list[str]
    titles: list[str]
    scores: list[float]


class Recommender:
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        m = bundle.manifest
        self.name, self.version = m.name, m.version
        self.maxlen, self.num_interests, self.item_count = m.maxlen, m.interests, m.item_count
        # External id -> internal id (1..N); built once per bundle.
        self.internal = {item: i + 1 for i, item in enumerate(bundle.item_ids.tolist())}
        self.popular_rows = np.argsort(-bundle.popularity, kind="stable")
        # FAISS threads for this index (ModelManager sets it before serving); 0 = leave as is.
        self.search_threads = 0
        self.namer = InterestNamer(bundle.naming) if bundle.naming is not None else None
        # Derived from the availability snapshot, per its version: (version, rows).
        self._unavailable: tuple[int, np.ndarray] | None = None
        self._available: tuple[int, np.ndarray] | None = None
        self._filters = ResolvedFilters()
        self._row_labels: dict[str, FieldLabels] = {}  # built on first use per field
        # The item table as a plain array over the same mapped pages (no copy): indexing a
        # numpy memmap goes through its Python subclass on every request.
        self.item_vectors = np.asarray(bundle.item_vectors)

    def row_labels(self, names: tuple[str, ...]) -> list[FieldLabels]:
        """The fields rows may come from that this bundle carries (e.g. no ESIM labels in a
        bundle trained without ESIM), each indexed once per model."""
        out = []
        for name in names:
            if name not in self._row_labels and name in self.bundle.fields:
                self._row_labels[name] = FieldLabels.from_postings(
                    name, self.bundle.fields[name], self.item_count)
            if name in self._row_labels:
                out.append(self._row_labels[name])
        return out

    def to_internal(self, item_ids: list[str]) -> tuple[list[int], int]:
        """Known internal ids in order, and how many ids were unknown."""
        known = [self.internal[i] for i in item_ids if i in self.internal]
        return known, len(item_ids) - len(known)

    def restrict(self, item_filter: ItemFilter | None,
                 unavailable: Snapshot = NO_UNAVAILABLE
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """What a request may be answered with, as `prepare` and `similar` take it:
        (allowed, excluded). allowed: the filter's rows without the unavailable ones (None:
        every row); excluded: unavailable rows to leave out of an unrestricted search (few
        and no filter: the batched search stays), else None. FilterError names an unknown
        field or value."""
        gone = self.unavailable_rows(unavailable)
        if not item_filter:
            if len(gone) <= UNAVAILABLE_AS_EXCLUSIONS:
                return None, gone
            return self._available_rows(unavailable), None
        key = item_filter.key()
        if key is not None:
            key = (key, unavailable.version)
            cached = self._filters.get(key)
            if cached is not None:
                return cached, None
        rows = allowed_rows(item_filter, self.bundle.fields, self.internal, self.item_count)
        if len(gone):
            rows = rows[~np.isin(rows, gone)]
        if key is not None:
            self._filters.put(key, rows)
        return rows, None

    def unavailable_rows(self, unavailable: Snapshot) -> np.ndarray:
        """This catalogue's rows of the unavailable ids (ascending); cached per version."""
        cached = self._unavailable
        if cached is None or cached[0] != unavailable.version:
            rows = np.array(sorted(self.internal[i] - 1 for i in unavailable.unavailable
                                   if i in self.internal), dtype=np.int64)
            cached = self._unavailable = (unavailable.version, rows)
        return cached[1]

    def _available_rows(self, unavailable: Snapshot) -> np.ndarray:
        cached = self._available
        if cached is None or cached[0] != unavailable.version:
            keep = np.ones(self.item_count, dtype=bool)
            keep[self.unavailable_rows(unavailable)] = False
            cached = self._available = (unavailable.version, np.flatnonzero(keep))
        return cached[1]

    def recommend(self, history: list[str], k: int, exclude: list[str] | None = None,
                  fanout: int = 50, shaping: Shaping = DEFAULT_SHAPING,
                  allowed: np.ndarray | None = None, unavailable: np.ndarray | None = None
                  ) -> Recommendation:
        """One request alone: prepare, one ONNX run, one FAISS search, finish."""
        query = self.prepare(history, k, exclude, fanout, shaping, allowed, unavailable)
        if isinstance(query, Recommendation):
            return query
        return self.compute(query)

    def compute(self, query: Query) -> Recommendation:
        """A prepared query alone: one ONNX run, one FAISS search, finish."""
        interests = self.encode(query.row[None])
        if query.allowed is not None:
            scores, rows = self.search_rows(interests[0], query.n, query.allowed)
            return self.finish(query, scores, rows, interests[0])
        scores, rows = self.search(interests, query.n)
        return self.finish(query, scores[0], rows[0], interests[0])

    def prepare(self, history: list[str], k: int, exclude: list[str] | None = None,
                fanout: int = 50, shaping: Shaping = DEFAULT_SHAPING,
                allowed: np.ndarray | None = None, unavailable: np.ndarray | None = None
                ) -> Query | Recommendation:
        """The per-request part before the encoder (cheap, no model run): a Query to compute,
        or the finished answer when there is nothing to encode (popularity fallback, or a
        filter that allows nothing). Split out so that a batcher can stack many requests'
        rows into one encoder run. `allowed`, `unavailable`: what `restrict` returned."""
        known, unknown = self.to_internal(history)
        excluded = np.array(sorted({self.internal[i] - 1 for i in (exclude or [])
                                    if i in self.internal}), dtype=np.int64)
        if unavailable is not None and len(unavailable):
            excluded = np.union1d(excluded, unavailable)
        if allowed is not None:
            excluded = excluded[in_sorted(excluded, allowed)]  # the others cannot come back
        pool = self.item_count if allowed is None else len(allowed)
        k = min(k, pool - len(excluded))
        if not known:
            return self._popular(k, excluded, unknown, allowed)
        if k == 0:  # the filter allows nothing (else): an empty list, not a fallback
            return replace(self._popular(0, excluded, unknown), fallback=False,
                           used_history=min(len(known), self.maxlen))
        recent = known[-self.maxlen :]
        row = np.zeros(self.maxlen, dtype=np.int64)
        row[self.maxlen - len(recent) :] = recent
        # Enough candidates per interest that exclusions and duplicates still leave k.
        n = min(pool, max(fanout, k + len(excluded)))
        return Query(row=row, k=k, n=n, excluded=excluded, used_history=len(recent),
                     unknown_items=unknown, shaping=shaping, allowed=allowed)

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """Histories [B, maxlen] -> interests [B, K, d] (one ONNX run)."""
        return self.bundle.encode(rows)

    def search(self, interests: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Interests [B, K, d] -> (scores, rows) [B, K, n] (one FAISS search for all B*K)."""
        self._set_search_threads()
        b, k, d = interests.shape
        scores, rows = self.bundle.search(interests.reshape(b * k, d), n)
        return scores.reshape(b, k, n), rows.reshape(b, k, n)

    def _set_search_threads(self) -> None:
        if self.search_threads and faiss.omp_get_max_threads() != self.search_threads:
            # OpenMP's thread count is per calling thread: set it in whichever thread searches
            # (the batcher's worker as well as the event loop).
            faiss.omp_set_num_threads(self.search_threads)

    def search_rows(self, queries: np.ndarray, n: int, allowed: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Queries [Q, d] -> (scores, rows) [Q, <= n] among the `allowed` rows only: the best
        allowed items, not a post-filtered top-n (service/serving/filters.py)."""
        info = self.bundle.manifest.index
        if len(allowed) <= EXACT_FILTER_MAX_ROWS:
            return exact_search(queries, self.item_vectors, allowed, n)
        self._set_search_threads()
        return restricted_search(self.bundle.index, info.kind, info.search_params, queries,
                                 allowed, n, self._filters.bitmap(allowed, self.item_count))

    def similar(self, item_id: str, k: int, allowed: np.ndarray | None = None,
                unavailable: np.ndarray | None = None) -> SimilarItems:
        """The k items nearest `item_id` by the bundle's item vectors (inner product, through
        the same index and filters as recommendations), the item itself left out, as are the
        `unavailable` rows; `allowed`, `unavailable`: what `restrict` returned. KeyError for
        an unknown id."""
        row = self.internal[item_id] - 1
        query = np.asarray(self.item_vectors[row : row + 1], dtype=np.float32)
        gone = unavailable if unavailable is not None else np.zeros(0, dtype=np.int64)
        if allowed is not None:
            allowed = allowed[allowed != row]
            scores, rows = self.search_rows(query, k, allowed)
        else:
            n = min(k + 1 + len(gone), self.item_count)
            scores, rows = self.search(query[None], n)
            scores, rows = scores[0], rows[0]
        keep = (rows[0] >= 0) & (rows[0] != row) & ~np.isin(rows[0], gone)
        top, best = rows[0][keep][:k], scores[0][keep][:k]
        return SimilarItems(item_ids=self.bundle.item_ids[top].tolist(),
                            titles=self.bundle.titles[top].tolist(),
                            scores=best.astype(float).tolist())

    def finish(self, query: Query, scores: np.ndarray, rows: np.ndarray,
               interests: np.ndarray) -> Recommendation:
        """One request's [K, n] search results and its interests [K, d] -> its merged,
        post-processed list with what each interest is (weight, name), and its rows."""
        history = query.row[query.row > 0]
        support = interest_support(interests, self.item_vectors[history - 1])
        shaping = query.shaping
        cosine = shaping.merge_cosine
        merged = None  # every candidate merged by score: the rows' mass, and the list's prefix
        if shaping.rows.rows > 0:
            merged = merge_interest_results(scores, rows, scores.size, query.excluded)
        shown = self._rows(query, scores, rows, interests, history, merged)
        if cosine is None:
            if merged is not None and shaping.diversity <= 0:  # merge_diverse at 0: its prefix
                ids, best, which = (part[: query.k] for part in merged)
            else:
                ids, best, which = merge_diverse(scores, rows, query.k, shaping.diversity,
                                                 query.excluded)
            weights = support / max(int(support.sum()), 1)
            merged_into = np.arange(self.num_interests)
            if shaping.copy_cosine is not None:  # a report of what the list is made of
                merged_into = copy_groups(interests, support, shaping.copy_cosine)
                which = merged_into[which]
                shown = [replace(row, heads=tuple(int(merged_into[h]) for h in row.heads))
                         for row in shown]
                weights = np.bincount(merged_into, weights=weights,
                                      minlength=self.num_interests)
        else:
            weights, merged_into = adapt_interests(interests, support, cosine)
            ids, best, which = merge_by_share(scores, rows, query.k, weights, query.excluded)
        ids, best, which = self._with_new_items(query, interests, ids, best, which,
                                                merged_into)
        names = (self.namer.name(interests, shaping.min_name_confidence)
                 if self.namer is not None else [(None, None)] * self.num_interests)
        details = []
        for i, (name, confidence) in enumerate(names):
            target = int(merged_into[i])
            details.append(InterestDetail(
                weight=round(float(weights[i]), 4),
                merged_into=target if target not in (i, -1) else None,
                dropped=cosine is not None and target == -1, name=name, confidence=confidence))
        counts = np.bincount(which, minlength=self.num_interests).tolist()
        return Recommendation(
            item_ids=self.bundle.item_ids[ids].tolist(), titles=self.bundle.titles[ids].tolist(),
            scores=best.astype(float).tolist(),
            interests=which.tolist(), fallback=False, used_history=query.used_history,
            unknown_items=query.unknown_items, interest_counts=counts,
            interest_details=details, rows=shown, new=self.bundle.is_new[ids].tolist())

    def _with_new_items(self, query: Query, interests: np.ndarray, ids: np.ndarray,
                        best: np.ndarray, which: np.ndarray, merged_into: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The list with its last round(k x new_item_share) places given to the best-scoring
        new items (the model's score; filters and exclusions apply), unless it holds that many
        already: an item nobody has chosen yet earns its first events only by being shown.
        An added item is credited like the list's (`merged_into`: the interest each is
        reported as; -1, dropped, keeps its own)."""
        new_rows = self.bundle.text_only_rows
        slots = round(query.k * query.shaping.new_item_share)
        if slots == 0 or not len(new_rows):  # most bundles: nothing to look at per request
            return ids, best, which
        is_new = self.bundle.is_new[ids]
        missing = slots - int(is_new.sum())
        if missing <= 0:
            return ids, best, which
        pool = new_rows if query.allowed is None else np.intersect1d(new_rows, query.allowed)
        pool = pool[~np.isin(pool, query.excluded) & ~np.isin(pool, ids)]
        if not len(pool):
            return ids, best, which
        scores, rows = self.search_rows(interests, min(missing, len(pool)), pool)
        new_ids, new_best, new_which = merge_interest_results(scores, rows, missing)
        new_which = np.where(merged_into[new_which] >= 0, merged_into[new_which], new_which)
        # Make room at the end of the list, never by dropping a new item already there.
        drop = max(0, len(ids) + len(new_ids) - query.k)
        keep = np.ones(len(ids), dtype=bool)
        others = np.flatnonzero(~is_new)
        keep[others[max(0, len(others) - drop):]] = False
        return (np.concatenate([ids[keep], new_ids]), np.concatenate([best[keep], new_best]),
                np.concatenate([which[keep], new_which]))

    def _rows(self, query: Query, scores: np.ndarray, rows: np.ndarray,
              interests: np.ndarray, history: np.ndarray,
              merged: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> list[Row]:
        """The request's interest rows (service.serving.rows): the list's candidates
        (`merged`) give the model's mass per explicit interest and, where they settle it, a
        row's best items; otherwise a search among the interest's items."""
        if merged is None:
            return []
        fields = self.row_labels(query.shaping.row_fields)
        if not fields:
            return []
        list_rows, list_scores, list_heads = merged
        # An interest with fewer than n results saw every allowed item: no bound from it.
        full = (rows >= 0).all(axis=1) & (rows.shape[1] == query.n)
        bound = float(scores[full, -1].max()) if full.any() else -np.inf
        if self.item_count <= EXACT_FILTER_MAX_ROWS:  # one product beats a search per row
            exact = best_by_scores_lazily(lambda: interests @ self.item_vectors.T)
        else:
            exact = best_by_search(lambda pool, n: self.search_rows(interests, n, pool))
        best = best_by_candidates(list_rows, list_scores, list_heads, bound, exact)
        return interest_rows(history - 1, fields, list_rows, list_scores, best, query.shaping.rows,
                             query.excluded, query.allowed)

    def _popular_allowed(self, n: int, allowed: np.ndarray) -> np.ndarray:
        """The n most popular of the `allowed` rows (ascending), in popularity order: the
        popularity ranking scanned in growing chunks (no sort of a large allowed set)."""
        found = np.zeros(0, dtype=np.int64)
        start, chunk = 0, max(4 * n, 1024)
        while len(found) < n and start < self.item_count and len(allowed):
            rows = self.popular_rows[start : start + chunk]
            found = np.concatenate([found, rows[in_sorted(rows, allowed)]])
            start, chunk = start + chunk, chunk * 4
        return found[:n]

    def _popular(self, k: int, excluded: np.ndarray, unknown: int,
                 allowed: np.ndarray | None = None) -> Recommendation:
        rows = (self.popular_rows[: k + len(excluded)] if allowed is None
                else self._popular_allowed(k + len(excluded), allowed))
        if len(excluded):
            rows = rows[~np.isin(rows, excluded)]
        rows = rows[:k]
        return Recommendation(
            item_ids=self.bundle.item_ids[rows].tolist(),
            titles=self.bundle.titles[rows].tolist(),
            scores=self.bundle.popularity[rows].astype(float).tolist(),
            interests=[None] * len(rows), fallback=True, used_history=0, unknown_items=unknown,
            interest_counts=[0] * self.num_interests,
            interest_details=[InterestDetail(0.0, None, False)] * self.num_interests,
            new=self.bundle.is_new[rows].tolist())
