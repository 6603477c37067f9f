"""Item filters: which rows of a bundle a request may be answered with, and the best items
among exactly those rows (docs/architecture.md, "Filters").

A filter is resolved against the bundle's field postings (items.json "fields") to the sorted
rows it allows, once per request. Retrieval then searches only those rows, so a filtered answer
is the best k among the allowed items, not what is left of an unfiltered top-k:

* few rows (at most EXACT_FILTER_MAX_ROWS): an exact inner-product search over the allowed
  rows' vectors;
* many rows: the index's own search restricted by a FAISS `IDSelector` (exact for a flat
  index), with the bundle's search parameters (HNSW's efSearch, IVF's nprobe).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

# Up to this many allowed rows an exact search over them is cheaper than a restricted ANN
# search (and exact); above it the ANN index with an IDSelector.
EXACT_FILTER_MAX_ROWS = 20_000
# Resolved filters kept per model (ResolvedFilters): at most this many rows in all (int64:
# 32 MB), and this many filters.
FILTER_CACHE_ROWS = 4_000_000
FILTER_CACHE_ENTRIES = 256


class FilterError(ValueError):
    """A filter names a field or value the bundle does not have; `loc` says where."""

    def __init__(self, loc: tuple[str | int, ...], message: str, value: object) -> None:
        super().__init__(message)
        self.loc, self.message, self.value = loc, message, value


@dataclass(frozen=True)
class ItemFilter:
    """include: field -> values; an item must hold one of the values of every listed field.
    exclude: field -> values; an item holding any of them is left out. item_ids: an
    allow-list of external ids (ids the bundle does not know are ignored)."""

    include: Mapping[str, Sequence[str]] = field(default_factory=dict)
    exclude: Mapping[str, Sequence[str]] = field(default_factory=dict)
    item_ids: Sequence[str] | None = None

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude or self.item_ids is not None)

    def key(self) -> Hashable | None:
        """What the allowed rows depend on, hashable; None for an allow-list of ids (one
        user's candidates, rarely sent twice: not worth a cache entry)."""
        if self.item_ids is not None:
            return None

        def canonical(part: Mapping[str, Sequence[str]]) -> tuple:
            return tuple(sorted((name, tuple(sorted(set(values))))
                                for name, values in part.items()))

        return canonical(self.include), canonical(self.exclude)


class ResolvedFilters:
    """Filters one model resolved lately: their allowed rows by key (the filter's and the
    availability version), and the FAISS bitmap of those rows once a restricted search built
    it. A category page sends the same filter again and again, and on a 1M catalogue resolving
    it (passes over every row) and building its bitmap cost as much as the filtered search
    (docs/results.md, "Filters, availability, similar items"). Least recently used first out,
    within FILTER_CACHE_ROWS rows and FILTER_CACHE_ENTRIES filters."""

    def __init__(self, max_rows: int = FILTER_CACHE_ROWS,
                 max_entries: int = FILTER_CACHE_ENTRIES) -> None:
        self.max_rows, self.max_entries = max_rows, max_entries
        # key -> [rows, its bitmap or None until a restricted search asks for it]
        self._entries: OrderedDict[Hashable, list] = OrderedDict()
        # id(rows) -> key, for the cached arrays only (an entry holds its array, so the id is
        # not reused while the entry lives)
        self._keys: dict[int, Hashable] = {}
        self._size = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, rows: np.ndarray) -> None:
        if len(rows) > self.max_rows or key in self._entries:
            return
        self._entries[key] = [rows, None]
        self._keys[id(rows)] = key
        self._size += len(rows)
        while self._size > self.max_rows or len(self._entries) > self.max_entries:
            _, (old, _) = self._entries.popitem(last=False)
            self._size -= len(old)
            del self._keys[id(old)]

    def bitmap(self, rows: np.ndarray, ntotal: int) -> np.ndarray:
        """The bitmap of `rows` over `ntotal` ids: built once while `rows` is a cached entry,
        built per call otherwise."""
        key = self._keys.get(id(rows))
        entry = self._entries.get(key) if key is not None else None
        if entry is None:
            return rows_bitmap(rows, ntotal)
        if entry[1] is None:
            entry[1] = rows_bitmap(rows, ntotal)
        return entry[1]


def rows_bitmap(rows: np.ndarray, ntotal: int) -> np.ndarray:
    """FAISS IDSelectorBitmap's layout: bit i (little-endian within each byte) set for row i."""
    mask = np.zeros(ntotal, dtype=bool)
    mask[rows] = True
    return np.packbits(mask, bitorder="little")


def _postings(fields: Mapping[str, Mapping[str, np.ndarray]], part: str, name: str,
              values: Sequence[str]) -> list[np.ndarray]:
    known = fields.get(name)
    if known is None:
        choices = ", ".join(sorted(fields)) or "none (this model's items carry no fields)"
        raise FilterError(("filter", part, name), f"unknown field {name!r}; fields: {choices}",
                          name)
    unknown = [v for v in values if v not in known]
    if unknown:
        raise FilterError(("filter", part, name),
                          f"unknown value(s) of {name!r}: {', '.join(map(repr, unknown))}",
                          unknown)
    return [known[v] for v in values]


def allowed_rows(item_filter: ItemFilter, fields: Mapping[str, Mapping[str, np.ndarray]],
                 internal: Mapping[str, int], item_count: int) -> np.ndarray:
    """The rows (0-based, ascending, int64) the filter allows; FilterError for an unknown
    field or value."""
    allowed = np.ones(item_count, dtype=bool)
    if item_filter.item_ids is not None:
        allowed[:] = False
        rows = [internal[i] - 1 for i in item_filter.item_ids if i in internal]
        allowed[np.asarray(rows, dtype=np.int64)] = True
    for name, values in item_filter.include.items():
        hold = np.zeros(item_count, dtype=bool)
        for rows in _postings(fields, "include", name, values):
            hold[rows] = True
        allowed &= hold
    for name, values in item_filter.exclude.items():
        for rows in _postings(fields, "exclude", name, values):
            allowed[rows] = False
    return np.flatnonzero(allowed)


def in_sorted(values: np.ndarray, sorted_rows: np.ndarray) -> np.ndarray:
    """np.isin(values, sorted_rows) for an ascending `sorted_rows`: one binary search per
    value. np.isin hashes the large side on every call (15 ms for 100,000 allowed rows, more
    than the filtered search itself)."""
    if not len(sorted_rows):
        return np.zeros(len(values), dtype=bool)
    at = np.searchsorted(sorted_rows, values)
    return sorted_rows[np.minimum(at, len(sorted_rows) - 1)] == values


def exact_search(queries: np.ndarray, vectors: np.ndarray, rows: np.ndarray, n: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, d] against vectors[rows] only: (scores, rows) [Q, min(n, len(rows))],
    best first (inner product, as the index)."""
    n = min(n, len(rows))
    if n == 0:
        return (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
    scores = queries @ np.asarray(vectors[rows], dtype=np.float32).T  # [Q, R]
    top = np.argpartition(-scores, n - 1, axis=1)[:, :n] if n < len(rows) else \
        np.tile(np.arange(len(rows)), (len(queries), 1))
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    return np.take_along_axis(top_scores, order, axis=1), rows[top]


def restricted_search(index: faiss.Index, kind: str, search_params: Mapping[str, int],
                      queries: np.ndarray, rows: np.ndarray, n: int,
                      bitmap: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` restricted to `rows` by an IDSelector, at the bundle's operating point.
    HNSW keeps efSearch candidates whatever the filter, and fewer of them pass it the
    narrower it is: efSearch is raised to n / sqrt(selectivity) where that is above the
    bundle's (on the 1M bundle at 10%, the bundle's 256 already gave recall@20 0.96 at the
    unfiltered latency, and n / selectivity = 500 doubled the latency for 0.97;
    docs/results.md, "Filters, availability, similar items"). `bitmap`: rows_bitmap(rows),
    when the caller has it already."""
    if len(rows) == 0:
        return (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
    if bitmap is None:
        bitmap = rows_bitmap(rows, index.ntotal)
    selector = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bitmap))
    if kind == "hnsw":
        params = faiss.SearchParametersHNSW()
        selectivity = len(rows) / index.ntotal
        params.efSearch = max(int(search_params.get("efSearch", 16)),
                              math.ceil(n / math.sqrt(selectivity)))
    elif kind == "ivf":
        params = faiss.SearchParametersIVF()
        params.nprobe = int(search_params.get("nprobe", 1))
    else:
        params = faiss.SearchParameters()
    params.sel = selector  # reads `bitmap`, alive until this function returns
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(n, len(rows)),
                        params=params)
