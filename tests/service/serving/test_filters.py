"""Filters resolved to rows, and the two filtered searches: exact over few rows, an index
restricted by an IDSelector over many."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from service.serving.filters import (
    FilterError,
    ItemFilter,
    allowed_rows,
    exact_search,
    restricted_search,
)

FIELDS = {"category": {"a": np.array([0, 1, 2]), "b": np.array([2, 3]), "c": np.array([4])},
          "year": {"1999": np.array([1, 3]), "2000": np.array([0, 2, 4])}}
INTERNAL = {f"id{i}": i + 1 for i in range(6)}  # row i is "id{i}"


@pytest.mark.parametrize(("item_filter", "rows"), [
    (ItemFilter(), [0, 1, 2, 3, 4, 5]),
    (ItemFilter(include={"category": ["a"]}), [0, 1, 2]),
    (ItemFilter(include={"category": ["a", "c"]}), [0, 1, 2, 4]),  # any value of a field
    (ItemFilter(include={"category": ["a"], "year": ["2000"]}), [0, 2]),  # every field
    (ItemFilter(exclude={"category": ["b"]}), [0, 1, 4, 5]),
    (ItemFilter(include={"year": ["2000"]}, exclude={"category": ["b"]}), [0, 4]),
    (ItemFilter(item_ids=["id5", "id1", "unknown"]), [1, 5]),
    (ItemFilter(include={"category": ["c"]}, item_ids=["id1"]), []),
])
def test_a_filter_allows_exactly_its_rows(item_filter, rows):
    assert allowed_rows(item_filter, FIELDS, INTERNAL, 6).tolist() == rows


def test_unknown_fields_and_values_are_named():
    with pytest.raises(FilterError, match="unknown field 'brand'; fields: category, year"):
        allowed_rows(ItemFilter(include={"brand": ["x"]}), FIELDS, INTERNAL, 6)
    with pytest.raises(FilterError, match="'1998'") as raised:
        allowed_rows(ItemFilter(exclude={"year": ["1999", "1998"]}), FIELDS, INTERNAL, 6)
    assert raised.value.loc == ("filter", "exclude", "year") and raised.value.value == ["1998"]


def brute_force(vectors, queries, rows, n):
    scores = queries @ vectors[rows].T
    return rows[np.argsort(-scores, axis=1, kind="stable")[:, :n]]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4000, 16)).astype(np.float32)
    queries = rng.standard_normal((4, 16)).astype(np.float32)
    rows = np.sort(rng.choice(4000, 400, replace=False))
    return vectors, queries, rows


def test_exact_search_is_the_best_allowed_rows_best_first(data):
    vectors, queries, rows = data
    scores, found = exact_search(queries, vectors, rows, 20)
    assert np.array_equal(found, brute_force(vectors, queries, rows, 20))
    assert np.all(np.diff(scores, axis=1) <= 0)
    scores, found = exact_search(queries, vectors, rows[:5], 20)  # fewer rows than n
    assert found.shape == (4, 5) and set(found[0].tolist()) == set(rows[:5].tolist())


@pytest.mark.parametrize(("kind", "factory", "params"), [
    ("flat", "Flat", {}), ("hnsw", "HNSW32,Flat", {"efSearch": 16}),
    ("ivf", "IVF16,Flat", {"nprobe": 16})])
def test_a_restricted_index_returns_only_allowed_rows(data, kind, factory, params):
    vectors, queries, rows = data
    index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    _, found = restricted_search(index, kind, params, queries, rows, 20)
    assert found.shape == (4, 20) and np.isin(found, rows).all()
    truth = brute_force(vectors, queries, rows, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(found, truth, strict=True)])
    assert recall == 1.0 if kind != "hnsw" else recall >= 0.95


def test_resolved_filters_are_reused_until_availability_or_eviction_changes_them():
    from service.serving.filters import ResolvedFilters, rows_bitmap

    cache = ResolvedFilters(max_rows=10, max_entries=2)
    a, b, c = np.arange(0, 6), np.arange(6, 10), np.arange(3, 5)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a and cache.get("b") is b
    bitmap = cache.bitmap(a, 16)
    assert cache.bitmap(a, 16) is bitmap  # built once while `a` is cached
    assert np.array_equal(bitmap, rows_bitmap(a, 16))
    assert np.unpackbits(bitmap, bitorder="little")[:16].nonzero()[0].tolist() == a.tolist()
    cache.put("c", c)  # three entries > 2: the least recently used ("a") goes
    assert cache.get("a") is None and cache.get("c") is c
    assert cache.bitmap(a, 16) is not bitmap  # its bitmap went with it
    cache.put("big", np.arange(11))  # larger than the whole budget: not kept
    assert cache.get("big") is None and cache.get("b") is b


def test_a_repeated_filter_answers_the_same_and_follows_availability(tiny_bundle):
    from service.bundle.load import load_bundle
    from service.serving.filters import ItemFilter
    from service.serving.recommender import Recommender
    from service.store.availability import Snapshot

    model = Recommender(load_bundle(tiny_bundle))
    category = sorted(model.bundle.fields["category"])[0]
    f = ItemFilter(include={"category": [category]})
    first, _ = model.restrict(f)
    again, _ = model.restrict(ItemFilter(include={"category": [category, category]}))
    assert again is first  # the same filter (values as a set): resolved once
    gone_id = str(model.bundle.item_ids[first[0]])
    later, _ = model.restrict(f, Snapshot(7, frozenset({gone_id})))
    assert later.tolist() == first[1:].tolist()  # a new availability version: resolved anew
    assert model.restrict(ItemFilter(item_ids=[gone_id]))[0].tolist() == [first[0]]
