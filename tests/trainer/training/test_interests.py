"""The interest measures on hand-made interests, lists and histories."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.training.evaluate import exact_search
from trainer.training.interests import (
    category_measures,
    distinct_items,
    distinctness,
    dominant_cluster,
    effective_interests,
    head_overlap,
    item_clusters,
    minority_recall,
    pairwise_cosine,
    served_effective_interests,
)


def test_identical_interests_are_one_and_orthogonal_ones_are_k():
    rng = np.random.default_rng(0)
    one = rng.normal(size=(5, 1, 8))
    copies = np.repeat(one, 4, axis=1) * rng.uniform(0.5, 2, size=(5, 4, 1))  # scale-free
    assert pairwise_cosine(copies) == pytest.approx(np.ones(5))
    assert effective_interests(copies) == pytest.approx(np.ones(5))
    orthogonal = np.repeat(np.eye(8)[None, :4], 3, axis=0) * 3.0
    assert pairwise_cosine(orthogonal) == pytest.approx(np.zeros(3))
    assert effective_interests(orthogonal) == pytest.approx(np.full(3, 4.0))
    # two distinct directions, each twice: two effective interests
    two = np.stack([np.eye(8)[0], np.eye(8)[0], np.eye(8)[1], np.eye(8)[1]])[None]
    assert effective_interests(two) == pytest.approx([2.0])


def test_pair_measures_are_undefined_for_one_interest():
    one = np.random.default_rng(0).normal(size=(3, 1, 8))
    assert np.isnan(pairwise_cosine(one)).all() and effective_interests(one) == pytest.approx(1.0)
    assert np.isnan(distinct_items(np.arange(6).reshape(2, 1, 3))).all()
    assert np.isnan(head_overlap(np.ones((2, 1, 5)) / 5)).all()


def test_distinct_items_counts_the_union_of_the_per_interest_lists():
    same = np.array([[[1, 2, 3], [1, 2, 3]]])
    apart = np.array([[[1, 2, 3], [4, 5, 6]]])
    half = np.array([[[1, 2, 3], [3, 4, 1]]])
    assert distinct_items(np.concatenate([same, apart, half])).tolist() == [0.5, 1.0, 4 / 6]


def test_head_overlap_is_one_for_equal_attention_and_zero_for_disjoint():
    equal = np.array([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]])
    disjoint = np.array([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    assert head_overlap(np.concatenate([equal, disjoint])) == pytest.approx([1.0, 0.0])


def test_served_interests_counts_the_sources_of_the_merged_list():
    # interest 0 holds every top score: one source; alternating scores: two equal sources
    rows = np.array([[[0, 1, 2, 3], [4, 5, 6, 7]]])
    one = np.array([[[9.0, 8, 7, 6], [1.0, 1, 1, 1]]])
    alternate = np.array([[[9.0, 7, 5, 3], [8.0, 6, 4, 2]]])
    assert served_effective_interests(one, rows, 4) == pytest.approx([1.0])
    assert served_effective_interests(alternate, rows, 4) == pytest.approx([2.0])


def test_distinctness_of_interests_aimed_at_separate_item_groups():
    items = np.eye(4, dtype=np.float32).repeat(30, axis=0)  # 4 groups of 30 equal items
    items += np.random.default_rng(0).normal(0, 0.01, items.shape).astype(np.float32)
    apart = np.eye(4, dtype=np.float32)[None].repeat(2, axis=0)
    copies = np.eye(4, dtype=np.float32)[[0, 0, 0, 0]][None]
    spread = distinctness(apart, exact_search(items))
    collapsed = distinctness(copies, exact_search(items))
    assert spread["interest_cosine"] == pytest.approx(0.0, abs=1e-6)
    assert spread["effective_interests"] == pytest.approx(4.0)
    # each interest's top 50 holds its 30 items and 20 of others: 4 x 50 lists, >= 120 distinct
    assert spread["distinct_items@50"] >= 0.6 > collapsed["distinct_items@50"]
    assert collapsed["distinct_items@50"] == pytest.approx(0.25)
    assert collapsed["interest_cosine"] == pytest.approx(1.0)


def planted_histories(rng: np.random.Generator, groups: int = 4, per_group: int = 25,
                      users: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Users who each draw 12 items from one of `groups` disjoint item groups."""
    sequences, group_of = [], []
    for u in range(users):
        g = u % groups
        sequences.append(1 + g * per_group + rng.choice(per_group, 12, replace=False))
        group_of.append(g)
    flat = np.concatenate(sequences)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])])
    return flat, offsets, np.asarray(group_of)


def test_item_clusters_recover_planted_groups_and_are_seeded():
    flat, offsets, _ = planted_histories(np.random.default_rng(0))
    users = np.arange(len(offsets) - 1)
    labels = item_clusters(flat, offsets, users, 100, clusters=4, seed=0)
    assert labels[0] == -1
    for g in range(4):
        group = labels[1 + 25 * g : 1 + 25 * (g + 1)]
        assert len(set(group.tolist())) == 1  # each planted group is one cluster
    assert len(set(labels[1:].tolist())) == 4
    again = item_clusters(flat, offsets, users, 100, clusters=4, seed=0)
    assert np.array_equal(labels, again)
    assert item_clusters(flat, offsets, users, 10**9) is None  # too large: skipped


def test_minority_recall_splits_targets_by_the_dominant_cluster():
    labels = np.array([-1, 0, 0, 0, 1, 1, 1])
    histories = np.array([[0, 1, 2, 4], [0, 0, 0, 0]])  # user 0: cluster 0 dominant (2 of 3)
    assert dominant_cluster(histories[0], labels) == (0, pytest.approx(2 / 3))
    targets = [np.array([3, 5, 6]), np.array([3])]
    ranked = [np.array([3, 5]), np.array([1])]
    out = minority_recall(ranked, histories, targets, labels, n=2)
    assert out["minority_recall@2"][0] == 0.5  # 5 found, 6 missed
    assert out["dominant_recall@2"][0] == 1.0  # 3 found
    assert out["history_dispersion"][0] == pytest.approx(1 / 3)
    # no history: every target is outside the (missing) dominant cluster
    assert out["minority_recall@2"][1] == 0.0 and np.isnan(out["dominant_recall@2"][1])


def test_category_measures_on_planted_topics_and_on_multi_genre_items():
    # items 1-6: topics a, a, a, b, b, c (one category each: planted topics)
    categories = np.array(["", "topic-a", "topic-a", "topic-a", "topic-b", "topic-b", "topic-c"],
                          dtype=object)
    # interest 0's list is all topic a, interest 1's is two b and one a
    rows = np.array([[[0, 1, 2], [3, 4, 0]]])  # rows = id - 1
    history = np.array([[0, 1, 4, 6]])  # topics a, b, c
    out = category_measures([np.array([1, 4, 6])], rows, history, categories, n=3)
    assert out["category_coverage@3"].tolist() == [3.0]
    assert out["intra_list_diversity@3"].tolist() == [1.0]  # no two share a topic
    assert out["interest_purity@3"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert out["topics_covered"].tolist() == [2.0]  # a and b are majorities; c is not
    # multi-genre items: Jaccard distances, no purity
    genres = np.array(["", "A|B", "A|B", "C"], dtype=object)
    multi = category_measures([np.array([1, 2, 3])], np.array([[[0, 1, 2]]]),
                              np.array([[1, 2]]), genres, n=3)
    assert multi["category_coverage@3"].tolist() == [3.0]
    assert multi["intra_list_diversity@3"][0] == pytest.approx((0 + 1 + 1) / 3)
    assert "interest_purity@3" not in multi
