import numpy as np
import pandas as pd
import pytest

from trainer.data.dataset import build_dataset
from trainer.data.loaders import DataError, RawData
from trainer.data.synthetic import make_synthetic


def raw_from(rows):
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return RawData("t", "test", df)


def test_comirec_filtering_and_id_mapping():
    rows = []
    # 12 users with 6 interactions over items a..f (5+ each), plus a rare item "z".
    for u in range(12):
        for t, item in enumerate("fedcba"):
            rows.append((f"u{u}", item, 100 - t))  # reverse time order in the file
    rows.append(("u0", "z", 1))
    rows.append(("lonely", "a", 1))  # user with 1 interaction is dropped
    ds = build_dataset(raw_from(rows), min_item_count=5)
    assert ds.n_items == 6 and "z" not in ds.item_ids
    assert ds.item_ids[0] == "" and sorted(ds.item_ids[1:]) == list("abcdef")
    assert "lonely" not in ds.user_ids
    # Sequences follow timestamps, not file order.
    seq = ds.item_ids[ds.sequence(0)].tolist()
    assert seq == list("abcdef")


def test_split_is_disjoint_80_10_10_and_seeded():
    ds = build_dataset(make_synthetic(n_users=200, n_items=100, n_topics=5), split_seed=3)
    parts = [ds.train_users, ds.valid_users, ds.test_users]
    assert [len(p) for p in parts] == [160, 20, 20]
    assert len(np.unique(np.concatenate(parts))) == ds.n_users
    again = build_dataset(make_synthetic(n_users=200, n_items=100, n_topics=5), split_seed=3)
    assert np.array_equal(again.test_users, ds.test_users)
    other = build_dataset(make_synthetic(n_users=200, n_items=100, n_topics=5), split_seed=4)
    assert not np.array_equal(other.test_users, ds.test_users)


def test_train_examples_and_right_aligned_histories():
    ds = build_dataset(make_synthetic(n_users=50, n_items=60, n_topics=6, min_len=8, max_len=8))
    users, positions = ds.train_examples()
    lengths = {u: len(ds.sequence(u)) for u in ds.train_users}
    assert positions.min() == 4
    assert len(users) == sum(n - 4 for n in lengths.values())
    assert all(p < lengths[u] for u, p in zip(users, positions, strict=True))
    hist = ds.histories(users[:1], np.array([5]), maxlen=7)[0]
    seq = ds.sequence(users[0])
    assert hist.tolist() == [0, 0] + seq[:5].tolist()


def test_train_windows_cover_every_position_and_move_each_epoch():
    ds = build_dataset(make_synthetic(n_users=50, n_items=60, n_topics=6, min_len=8, max_len=30))
    maxlen = 5

    def covered(users, ends):
        seen: dict[int, list[int]] = {}
        for u, e in zip(users, ends, strict=True):
            # the window [e - maxlen, e) predicts positions e - maxlen + 1 .. e
            seen.setdefault(int(u), []).extend(range(max(1, e - maxlen + 1), e + 1))
        return seen

    fixed = ds.train_windows(maxlen)
    assert all(np.array_equal(a, b) for a, b in zip(fixed, ds.train_windows(maxlen), strict=True))
    rng = np.random.default_rng(0)
    moved = [ds.train_windows(maxlen, rng) for _ in range(2)]
    assert not np.array_equal(moved[0][1], moved[1][1])  # borders move between epochs
    for users, ends in [fixed, *moved]:
        seen = covered(users, ends)
        assert set(seen) == set(ds.train_users.tolist())  # training users only
        for u, positions in seen.items():
            n = len(ds.sequence(u))
            assert sorted(set(positions)) == list(range(1, n))  # every target position
            assert max(np.bincount(positions)) <= 2  # at most twice (the latest window)
            assert n - 1 in ends[users == u]  # the latest item is always a target


def test_future_targets_draw_from_the_next_h_items_of_the_sequence():
    ds = build_dataset(make_synthetic(n_users=50, n_items=60, n_topics=6, min_len=8, max_len=30))
    maxlen = 5
    users, ends = ds.train_windows(maxlen, np.random.default_rng(1))
    histories = ds.histories(users, ends, maxlen)
    rng = np.random.default_rng(0)
    # horizon 1: the history shifted by one, then the item at `end` (next-item training)
    nxt = ds.future_targets(users, ends, maxlen, 1, rng)
    shifted = np.concatenate([histories[:, 1:], ds.flat[ds.offsets[users] + ends][:, None]], 1)
    assert np.array_equal(nxt, np.where(histories != 0, shifted, 0))
    horizon = 4
    drawn = [ds.future_targets(users, ends, maxlen, horizon, rng) for _ in range(20)]
    for row, (u, e) in enumerate(zip(users, ends, strict=True)):
        seq = ds.sequence(u)
        for j in range(maxlen):
            at = e - maxlen + j
            got = {int(d[row, j]) for d in drawn}
            if at < 0:
                assert got == {0}
                continue
            allowed = set(seq[at + 1 : min(at + horizon, len(seq) - 1) + 1].tolist())
            assert got <= allowed and got
    # the draws vary where there is more than one item ahead
    assert any(not np.array_equal(drawn[0], d) for d in drawn[1:])


def test_eval_split_uses_first_80_percent_as_history():
    ds = build_dataset(make_synthetic(n_users=50, n_items=60, n_topics=6, min_len=10, max_len=10))
    split = ds.eval_split("test", maxlen=5)
    u = split.users[0]
    seq = ds.sequence(u).tolist()
    cut = int(len(seq) * 0.8)
    expected = seq[:cut][-5:]
    assert split.histories[0].tolist() == [0] * (5 - len(expected)) + expected
    assert split.targets[0].tolist() == list(dict.fromkeys(seq[cut:]))


def test_too_few_users_after_filtering_is_an_error():
    with pytest.raises(DataError, match="users left"):
        build_dataset(raw_from([("u", "a", 1)] * 5))


def test_synthetic_users_stay_within_their_planted_topics():
    raw = make_synthetic(n_users=100, n_items=400, n_topics=20, interests_per_user=4, seed=1)
    topic = raw.items.set_index("item_id")["categories"]
    per_user = raw.interactions.assign(topic=raw.interactions["item_id"].map(topic))
    counts = per_user.groupby("user_id")["topic"].nunique()
    assert counts.max() <= 4 and counts.mean() > 3
    again = make_synthetic(n_users=100, n_items=400, n_topics=20, interests_per_user=4, seed=1)
    assert again.fingerprint() == raw.fingerprint()


def test_folds_test_every_user_once_validate_on_the_next_and_are_deterministic():
    raw = make_synthetic(n_users=203, n_items=100, n_topics=5)
    runs = [build_dataset(raw, folds=10, fold=f) for f in range(10)]
    tests = [r.test_users for r in runs]
    # every user tested exactly once; folds disjoint and near-equal (203 = 3 x 21 + 7 x 20)
    assert sorted(np.concatenate(tests).tolist()) == list(range(runs[0].n_users))
    assert sorted(len(t) for t in tests) == [20] * 7 + [21] * 3
    for f, r in enumerate(runs):
        assert np.array_equal(r.valid_users, tests[(f + 1) % 10])
        parts = np.concatenate([r.train_users, r.valid_users, r.test_users])
        assert len(np.unique(parts)) == len(parts) == r.n_users  # disjoint, complete
        assert r.describe()["folds"] == 10 and r.describe()["fold"] == f
    again = build_dataset(raw, folds=10, fold=4)
    assert np.array_equal(again.test_users, runs[4].test_users)
    assert np.array_equal(again.train_users, runs[4].train_users)
    # the default stays the 80/10/10 split, and it has no fold keys
    assert "folds" not in build_dataset(raw).describe()


@pytest.mark.parametrize(("folds", "fold"), [(2, 0), (10, 10), (10, -1)])
def test_bad_fold_settings_are_refused(folds, fold):
    with pytest.raises(ValueError, match="fold"):
        build_dataset(make_synthetic(n_users=50, n_items=60, n_topics=6), folds=folds, fold=fold)


def test_train_events_cut_training_users_only_and_keep_the_catalogue():
    raw = make_synthetic(n_users=200, n_items=100, n_topics=5, min_len=12, max_len=30)
    full = build_dataset(raw, folds=10, fold=2)
    cut = build_dataset(raw, folds=10, fold=2, train_events=5)
    assert np.array_equal(cut.item_ids, full.item_ids)  # the filters count the whole data
    for u in full.train_users:  # the first 5 events, in order
        assert cut.sequence(u).tolist() == full.sequence(u)[:5].tolist()
    for u in [*full.valid_users, *full.test_users]:  # evaluated users are unchanged
        assert cut.sequence(u).tolist() == full.sequence(u).tolist()
    assert cut.popularity().sum() == 5 * len(full.train_users)
    with pytest.raises(DataError, match="at least 2"):
        build_dataset(raw, train_events=1)


def test_min_item_count_one_keeps_the_long_tail():
    rows = [(f"u{u}", item, t) for u in range(12) for t, item in enumerate("abcdef")]
    rows.append(("u0", "z", 99))  # one interaction
    assert "z" in build_dataset(raw_from(rows)).item_ids  # the default keeps every item
    assert "z" not in build_dataset(raw_from(rows), min_item_count=5).item_ids


def test_items_without_any_interaction_are_text_only():
    rows = [(f"u{u}", item, t) for u in range(12) for t, item in enumerate("abcdef")]
    rows.append(("u0", "rare", 99))  # one interaction: under the filter, not new
    items = pd.DataFrame({"item_id": ["a", "rare", "new", "untitled"],
                          "title": ["A", "Rare", "Brand new", " "],
                          "categories": ["", "", "x|y", ""], "year": [np.nan, np.nan, 2024.0,
                                                                       np.nan]})
    raw = RawData("t", "test", pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]),
                  items)
    ds = build_dataset(raw)
    assert ds.text_only.item_ids.tolist() == ["new"]  # a title and no event at all
    assert ds.text_only.titles.tolist() == ["Brand new"]
    assert ds.text_only.categories.tolist() == ["x|y"] and ds.text_only.years.tolist() == [2024]
