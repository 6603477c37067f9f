import numpy as np

from service.serving.retrieval import merge_diverse, merge_interest_results


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


def random_results(seed: int, k: int = 4, n: int = 30, items: int = 60):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(items, n, replace=False) for _ in range(k)])
    scores = -np.sort(-rng.normal(size=(k, n)), axis=1).astype(np.float32)
    scores[0] += 2.0  # interest 0 outscores the others: a score merge is mostly its items
    ids[1, -1] = -1  # a missing FAISS result
    return scores, ids


def test_diversity_zero_is_the_merge_by_score():
    for seed in range(5):
        scores, ids = random_results(seed)
        exclude = np.array([ids[0, 0], ids[2, 3]])
        for n in (1, 10, 40):
            plain = merge_interest_results(scores, ids, n, exclude)
            diverse = merge_diverse(scores, ids, n, 0.0, exclude)
            assert all(np.array_equal(a, b) for a, b in zip(plain, diverse, strict=True))


def test_diversity_covers_more_interests_and_keeps_the_list_valid():
    for seed in range(5):
        scores, ids = random_results(seed)
        exclude = np.array([ids[1, 0]])
        plain_ids, _, plain_which = merge_interest_results(scores, ids, 20, exclude)
        div_ids, div_scores, div_which = merge_diverse(scores, ids, 20, 1.0, exclude)
        assert len(div_ids) == 20 == len(set(div_ids.tolist()))
        assert not set(div_ids.tolist()) & {ids[1, 0], -1}
        assert len(set(div_which.tolist())) > len(set(plain_which.tolist()))
        assert np.bincount(div_which, minlength=4).max() < np.bincount(plain_which).max()
        # each item keeps the score and the interest it has in the plain merge
        best = dict(zip(*merge_interest_results(scores, ids, 200)[:2], strict=True))
        assert all(best[i] == s for i, s in zip(div_ids.tolist(), div_scores.tolist(),
                                                strict=True))
        # the first place is still the best-scored item
        assert div_ids[0] == plain_ids[0]
    # a small setting moves less than a large one
    scores, ids = random_results(0)
    counts = [np.bincount(merge_diverse(scores, ids, 20, d)[2], minlength=4).max()
              for d in (0.0, 0.2, 1.0)]
    assert counts[0] >= counts[1] >= counts[2] and counts[0] > counts[2]
