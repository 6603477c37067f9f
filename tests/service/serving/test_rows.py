"""Interest rows (service/serving/rows.py): which explicit interests a user gets, and what
fills them."""

from dataclasses import replace

import numpy as np
import pytest

from service.serving.filters import exact_search
from service.serving.retrieval import copy_groups, merge_interest_results
from service.serving.rows import (
    Candidate,
    FieldLabels,
    RowPolicy,
    best_by_candidates,
    best_by_scores,
    best_by_search,
    candidates,
    fill_rows,
    interest_rows,
    row_sizes,
)

# 12 items: "a" holds 0-3, "b" 4-7, "c" 8-11; items 3 and 4 hold "ab" as well (multi-valued).
POSTINGS = {"a": np.array([0, 1, 2, 3]), "b": np.array([4, 5, 6, 7]),
            "c": np.array([8, 9, 10, 11]), "ab": np.array([3, 4])}


@pytest.fixture
def labels() -> FieldLabels:
    return FieldLabels.from_postings("category", POSTINGS, 12)


@pytest.fixture
def vectors() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)


def search_for(interests: np.ndarray, vectors: np.ndarray):
    """Both ways of finding the best inside an interest; they must agree (checked below)."""
    return best_by_search(lambda pool, n: exact_search(interests, vectors, pool, n))


def test_the_two_ways_to_the_best_items_agree(vectors):
    interests = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32)
    by_search = search_for(interests, vectors)
    by_scores = best_by_scores(interests @ vectors.T)
    for pool, n in ((np.array([0, 2, 5, 7, 11]), 3), (np.arange(12), 12), (np.array([4]), 5)):
        a, b = by_search(pool, n), by_scores(pool, n)
        assert a[0].tolist() == b[0].tolist() and a[2].tolist() == b[2].tolist()
        assert np.allclose(a[1], b[1], atol=1e-5)


def test_the_list_candidates_settle_a_row_exactly_or_fall_back():
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(300, 8)).astype(np.float32)
    interests = rng.normal(size=(4, 8)).astype(np.float32)
    exact = best_by_scores(interests @ vectors.T)
    n = 20  # each interest's top 20, merged: the list's candidates
    scores, rows = exact_search(interests, vectors, np.arange(300), n)
    merged = merge_interest_results(scores, rows, scores.size)
    bound = float(scores[:, -1].max())
    asked = []

    def fallback(pool, k):
        asked.append(len(pool))
        return exact(pool, k)

    best = best_by_candidates(*merged, bound, fallback)
    settled = 0
    for _ in range(200):
        pool = np.sort(rng.choice(300, rng.integers(1, 300), replace=False))
        k = int(rng.integers(1, 8))
        before = len(asked)
        got, want = best(pool, k), exact(pool, k)
        assert got[0].tolist() == want[0].tolist() and got[2].tolist() == want[2].tolist()
        assert np.allclose(got[1], want[1], atol=1e-5)
        settled += len(asked) == before
    assert 0 < settled < 200  # both ways were taken


def test_field_labels_index_every_value_of_every_item(labels):
    owner, values = labels.holders(np.array([3, 8, 4]))
    held = {(int(o), labels.names[v]) for o, v in zip(owner, values, strict=True)}
    assert held == {(0, "a"), (0, "ab"), (1, "c"), (2, "b"), (2, "ab")}


def test_one_taste_gives_one_row(labels, vectors):
    # A history inside "a" only; the model's mass spread over every item.
    history = np.array([0, 1, 2, 1])
    list_rows, list_scores = np.arange(12), np.zeros(12)
    found = candidates(history, [labels], list_rows, list_scores, RowPolicy(rows=4))
    assert [c.name for c in found] == ["a"]
    assert found[0].because == (1, 2, 0)  # distinct, most recent first


def test_min_support_and_min_ratio_decide_which_interests_count(labels):
    history = np.array([0, 1, 2, 8])  # three of "a", one of "c"
    list_rows = np.arange(12)
    even = np.zeros(12)
    assert [c.name for c in candidates(history, [labels], list_rows, even,
                                       RowPolicy(rows=4, min_support=2))] == ["a"]
    assert {c.name for c in candidates(history, [labels], list_rows, even,
                                       RowPolicy(rows=4, min_support=1))} == {"a", "c"}
    # The model puts almost all its mass on "a": "c" falls under min_ratio.
    peaked = np.where(np.isin(list_rows, POSTINGS["a"]), 10.0, 0.0)
    found = candidates(history, [labels], list_rows, peaked,
                       RowPolicy(rows=4, min_support=1, min_ratio=0.1, history_weight=0.0))
    assert [c.name for c in found] == ["a"]
    assert found[0].score == pytest.approx(4 * np.exp(10) / (4 * np.exp(10) + 8), abs=1e-4)


def test_history_weight_ranks_by_the_history_instead_of_the_model(labels):
    history = np.array([8, 0, 1, 2, 9])  # "a" three times, "c" twice
    list_rows = np.arange(12)
    towards_c = np.where(np.isin(list_rows, POSTINGS["c"]), 5.0, 0.0)
    by_model = candidates(history, [labels], list_rows, towards_c,
                          RowPolicy(rows=2, min_ratio=0.0, history_weight=0.0))
    by_history = candidates(history, [labels], list_rows, towards_c,
                            RowPolicy(rows=2, history_weight=1.0, min_ratio=0.0))
    assert [c.name for c in by_model] == ["c", "a"]
    assert [c.name for c in by_history] == ["a", "c"]
    assert by_history[0].score == pytest.approx(3 / 5)


def test_rows_hold_the_best_items_inside_their_interest_and_never_repeat(labels, vectors):
    interests = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    history = np.array([0, 1, 4, 5, 3])
    list_rows = np.arange(12)
    list_scores = (interests @ vectors.T).max(axis=0)
    policy = RowPolicy(rows=3, size=3, min_support=2, min_ratio=0.0, min_size=None)
    rows = interest_rows(history, [labels], list_rows, list_scores,
                         search_for(interests, vectors), policy, np.zeros(0, np.int64))
    assert 2 <= len(rows) <= 3
    seen: set[int] = set()
    best = (interests @ vectors.T).max(axis=0)
    for row in rows:
        inside = set(POSTINGS[row.interest.name].tolist())
        assert set(row.rows) <= inside  # coherent: 1.0 by construction
        assert not seen & set(row.rows)  # no item in two rows
        # the best of its interest by the list's score, among those not taken before
        free = sorted(inside - seen, key=lambda r: -best[r])[: policy.size]
        assert list(row.rows) == free
        assert row.scores == pytest.approx([float(best[r]) for r in row.rows], abs=1e-5)
        assert all(int(np.argmax(interests @ vectors[r])) == h
                   for r, h in zip(row.rows, row.heads, strict=True))
        seen |= set(row.rows)


def test_exclusions_and_filters_apply_and_an_emptied_row_gives_way(labels, vectors):
    interests = np.random.default_rng(2).normal(size=(2, 8)).astype(np.float32)
    history = np.array([0, 1, 4, 5, 8, 9])
    found = candidates(history, [labels], np.arange(12), np.zeros(12),
                       RowPolicy(rows=2, min_ratio=0.0, min_support=2))
    assert {c.name for c in found} == {"a", "b", "c"}
    policy = RowPolicy(rows=2, size=4)
    # Only "b" and "c" items allowed, item 9 excluded: "a" is empty and gives way.
    allowed = np.arange(4, 12)
    rows = fill_rows(found, {"category": labels}, search_for(interests, vectors), policy,
                     np.array([9]), allowed)
    assert sorted(r.interest.name for r in rows) == ["b", "c"]
    every = [item for r in rows for item in r.rows]
    assert 9 not in every and all(item >= 4 for item in every)


def test_rows_share_their_items_by_score_above_a_floor(labels, vectors):
    interests = np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32)
    found = candidates(np.array([0, 1, 4, 5, 8, 9]), [labels], np.arange(12), np.zeros(12),
                       RowPolicy(rows=3, min_ratio=0.0, min_support=2))
    scored = [replace(c, score=s) for c, s in zip(found, (0.6, 0.3, 0.1), strict=True)]
    assert row_sizes(scored, RowPolicy(size=4, min_size=None)) == [4, 4, 4]
    # 12 items: 1 each, the other 9 by 0.6 / 0.3 / 0.1 (largest remainder)
    assert row_sizes(scored, RowPolicy(size=4, min_size=1)) == [6, 4, 2]
    rows = fill_rows(scored, {"category": labels}, search_for(interests, vectors),
                     RowPolicy(rows=3, size=4, min_size=1), np.zeros(0, np.int64))
    assert [len(r.rows) for r in rows] == [4, 4, 2]  # a value holds 4 items at most


def test_an_interest_whose_items_earlier_rows_took_gives_way(labels, vectors):
    # "ab" holds items 3 and 4 only; rows "a" and "b" of four items each take both first.
    interests = np.random.default_rng(6).normal(size=(2, 8)).astype(np.float32)
    scored = [Candidate("category", labels.names.index(name), name, score, (0,))
              for name, score in (("a", 0.5), ("b", 0.4), ("ab", 0.3), ("c", 0.2))]
    exact = best_by_scores(interests @ vectors.T)
    shortcut = best_by_candidates(np.arange(12), np.zeros(12, np.float32),
                                  np.zeros(12, np.int64), np.inf, exact)  # always falls back
    for best in (exact, shortcut):
        rows = fill_rows(scored, {"category": labels}, best,
                         RowPolicy(rows=3, size=4, min_size=None), np.zeros(0, np.int64))
        assert [r.interest.name for r in rows] == ["a", "b", "c"]


def test_no_rows_asked_or_no_history_gives_none(labels, vectors):
    search = search_for(np.ones((1, 8), np.float32), vectors)
    assert interest_rows(np.array([0, 1]), [labels], np.arange(12), np.zeros(12), search,
                         RowPolicy(rows=0), np.zeros(0, np.int64)) == []
    assert interest_rows(np.zeros(0, np.int64), [labels], np.arange(12), np.zeros(12), search,
                         RowPolicy(rows=3), np.zeros(0, np.int64)) == []


def test_copy_groups_report_near_copies_as_one():
    base = np.array([1.0, 0.0, 0.0])
    interests = np.stack([base, base + [0.0, 0.05, 0.0], [0.0, 1.0, 0.0], base * 2])
    support = np.array([1, 5, 2, 0])
    group = copy_groups(interests, support, 0.9)
    # interest 1 has the most support: 0 and 3 (near-copies of it) are reported as it
    assert group.tolist() == [1, 1, 2, 1]
    assert copy_groups(interests, support, 1.0 + 1e-9).tolist() == [0, 1, 2, 3]
