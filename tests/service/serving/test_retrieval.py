import numpy as np

from service.serving.retrieval import merge_interest_results


def test_merge_ranks_by_score_dedups_and_keeps_best_interest():
    scores = np.array([[0.9, 0.5, 0.1], [0.95, 0.9, 0.2]], dtype=np.float32)
    ids = np.array([[10, 11, 12], [20, 10, 13]])
    out_ids, out_scores, interest = merge_interest_results(scores, ids, n=4)
    # 10 appears under both interests (0.9 and 0.9): first by stable order is interest 0.
    assert out_ids.tolist() == [20, 10, 11, 13]
    assert np.allclose(out_scores, [0.95, 0.9, 0.5, 0.2])
    assert interest.tolist() == [1, 0, 0, 1]


def test_merge_drops_missing_results_and_exclusions():
    scores = np.array([[0.9, 0.8, -np.inf]], dtype=np.float32)
    ids = np.array([[5, 6, -1]])
    out_ids, _, _ = merge_interest_results(scores, ids, n=10, exclude=np.array([5]))
    assert out_ids.tolist() == [6]


def test_merge_returns_at_most_n_distinct():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 15, size=(4, 10))
    scores = rng.random((4, 10)).astype(np.float32)
    out_ids, out_scores, _ = merge_interest_results(scores, ids, n=8)
    assert len(out_ids) == len(set(out_ids.tolist())) == 8
    assert np.all(np.diff(out_scores) <= 0)
    # Every returned item is reported with its best score over interests.
    for i, s in zip(out_ids, out_scores, strict=True):
        assert s == scores[ids == i].max()
