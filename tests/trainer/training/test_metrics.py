import math

import numpy as np
import pytest

from trainer.training.metrics import aggregate, tail_recall, user_metrics

LOG2_3 = math.log2(3)


def test_single_hit_at_rank_two_of_two_targets():
    recall, ndcg, hit = user_metrics(np.array([1, 2, 3, 4]), np.array([2, 9]), n=3)
    assert recall == pytest.approx(0.5)
    # DCG = 1/log2(3); IDCG over min(|T|=2, N=3) = 2 positions: 1 + 1/log2(3).
    assert ndcg == pytest.approx((1 / LOG2_3) / (1 + 1 / LOG2_3))
    assert hit == 1.0


def test_ndcg_with_fewer_hits_than_targets_uses_ideal_over_min_targets_n():
    # 3 targets, N = 2, one hit at rank 1: ComiRec's IDCG (over hits) would give 1.0.
    recall, ndcg, hit = user_metrics(np.array([5, 1]), np.array([5, 6, 7]), n=2)
    assert recall == pytest.approx(1 / 3)
    assert ndcg == pytest.approx(1 / (1 + 1 / LOG2_3))
    assert hit == 1.0


def test_perfect_list_scores_one_and_cutoff_is_respected():
    assert user_metrics(np.array([3, 4, 9]), np.array([4, 3]), n=2) == pytest.approx((1, 1, 1))
    # The only hit lies beyond the cut-off.
    assert user_metrics(np.array([1, 2, 3]), np.array([3]), n=2) == (0.0, 0.0, 0.0)


def test_duplicate_targets_count_once():
    recall, _, _ = user_metrics(np.array([7, 8]), np.array([7, 7, 8, 9]), n=2)
    assert recall == pytest.approx(2 / 3)


def test_aggregate_averages_users_per_cutoff():
    ranked = [np.array([1, 2]), np.array([3, 4])]
    targets = [np.array([1]), np.array([9])]
    out = aggregate(ranked, targets, cutoffs=(1, 2))
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["hitrate@2"] == pytest.approx(0.5)
    assert out["ndcg@2"] == pytest.approx(0.5)
    assert set(out) == {f"{m}@{n}" for m in ("recall", "ndcg", "hitrate") for n in (1, 2)}


def test_user_without_targets_is_an_error():
    with pytest.raises(ValueError):
        user_metrics(np.array([1]), np.array([], dtype=int), n=1)


def test_tail_recall_counts_only_rarely_seen_targets():
    popularity = np.array([0, 100, 5, 6, 0, 2])  # internal ids 1..5; [0] padding
    ranked = [np.array([1, 2, 3]), np.array([1, 3]), np.array([5])]
    targets = [np.array([1, 2, 4]),  # tail: 2 (hit), 4 (miss); 1 is popular
               np.array([1, 3]),  # no tail target (6 > 5 interactions)
               np.array([5, 4])]  # tail: 5 (hit), 4 (miss)
    out = tail_recall(ranked, targets, popularity, n=2)["tail_recall@2"]
    assert out[0] == 0.5 and np.isnan(out[1]) and out[2] == 0.5
    # the cut-off applies: item 2 sits at rank 2, outside a top 1
    assert tail_recall(ranked, targets, popularity, n=1)["tail_recall@1"][0] == 0.0
