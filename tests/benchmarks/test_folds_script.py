"""The pure helpers of benchmarks/folds.py: per-user loading and paired comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import benchmark_script


@pytest.fixture(scope="module")
def folds():
    with benchmark_script("folds") as module:
        yield module


def test_bootstrap_interval_covers_the_mean_and_narrows_with_users(folds):
    rng = np.random.default_rng(1)
    small = rng.normal(0.02, 0.1, 50)
    large = rng.normal(0.02, 0.1, 5000)
    low, high = folds.bootstrap_interval(small)
    assert low < small.mean() < high
    big_low, big_high = folds.bootstrap_interval(large)
    assert big_high - big_low < (high - low) / 5  # ~ 1/sqrt(100)
    assert big_low > 0  # 0.02 with 5000 users is clearly positive


def test_compare_is_paired_and_counts_fold_wins(folds):
    # B is A minus 0.01 for every user: tiny paired differences, so the interval excludes 0
    # even though the users' own values vary a lot
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)
    a = {m: base for m in folds.METRICS}
    b = {m: base - 0.01 for m in folds.METRICS}
    fold_of = np.repeat(np.arange(10), 20)
    result = folds.compare(a, b, fold_of)["recall@50"]
    assert result["mean_difference"] == pytest.approx(0.01)
    assert result["excludes_zero"] and result["wins"] == 10 and result["folds"] == 10
    reverse = folds.compare(b, a, fold_of)["recall@50"]
    assert reverse["wins"] == 0 and reverse["interval_95"][1] < 0


def test_load_lines_users_up_across_variants_and_adds_mostpop(folds, tmp_path):
    def write(name, fold, users, model, pop):
        path = tmp_path / name / f"fold-{fold}" / "per_user.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"users": users,
                                    "model": {m: model for m in folds.METRICS},
                                    "mostpop": {m: pop for m in folds.METRICS}}))
        return path

    results = {"x": [write("x", 0, ["u1", "u2"], [1, 0], [0, 0]),
                     write("x", 1, ["u3"], [0.5], [0.25])],
               "y": [write("y", 0, ["u1", "u2"], [0, 1], [0, 0]),
                     write("y", 1, ["u3"], [1], [0.25])]}
    users, fold_of, arrays = folds.load(results)
    assert users == ["u1", "u2", "u3"] and fold_of.tolist() == [0, 0, 1]
    assert set(arrays) == {"x", "y", folds.MOSTPOP}
    assert arrays["y"]["recall@50"].tolist() == [0, 1, 1]
    assert arrays[folds.MOSTPOP]["recall@50"].tolist() == [0, 0, 0.25]


def test_training_time_summarises_the_runs_metrics(folds, tmp_path):
    paths = []
    for fold, (seconds, steps, best) in enumerate([(10.0, 100, 60), (30.0, 300, 200)]):
        run = tmp_path / f"fold-{fold}"
        run.mkdir()
        train = {"seconds": seconds, "steps": steps, "best_step": best,
                 "seconds_per_step": seconds / steps, "steps_after_best": steps - best,
                 "load_average": {"start": [0.5 + fold, 0, 0], "end": [1.5 + fold, 0, 0]}}
        (run / "metrics.json").write_text(json.dumps({"train": train}))
        paths.append(run / "per_user.json")
    time = folds.training_time(paths)
    assert time["runs"] == 2 and time["seconds"] == 20.0
    assert (time["seconds_min"], time["seconds_max"]) == (10.0, 30.0)
    assert time["steps"] == 200 and time["best_step"] == 130 and time["steps_after_best"] == 70
    assert time["seconds_per_step"] == 0.1 and time["load_1min"] == 1.5
    assert folds.training_time([tmp_path / "missing" / "per_user.json"]) is None


def test_training_time_of_runs_before_the_timing_line(folds, tmp_path):
    """metrics.json written before steps and load averages were recorded: seconds only."""
    run = tmp_path / "fold-0"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"train": {"seconds": 12.0}}))
    time = folds.training_time([run / "per_user.json"])
    assert time["seconds"] == 12.0 and time["steps"] is None and time["load_1min"] is None


def test_interval_widens_when_runs_disagree(folds):
    """Two seeds that agree give the user-level interval; two seeds whose differences have
    opposite signs (model-level noise) must widen it to cover 0."""
    rng = np.random.default_rng(2)
    fold_of = np.repeat(np.arange(10), 60)
    noise = rng.normal(0, 0.05, 600)
    agree = np.stack([0.01 + noise, 0.01 + noise])
    disagree = np.stack([0.06 + noise, -0.04 + noise])
    low, high = folds.runs_and_users_interval(agree, fold_of)
    assert low > 0
    wide_low, wide_high = folds.runs_and_users_interval(disagree, fold_of)
    assert wide_low < 0 < wide_high
    assert wide_high - wide_low > 2 * (high - low)


def test_load_and_compare_with_seeds(folds, tmp_path):
    """Per-seed runs load as [S, U]; MostPop stays [U] and broadcasts in a comparison."""
    def write(name, seed, fold, users, model):
        path = tmp_path / name / f"seed-{seed}" / f"fold-{fold}" / "per_user.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"users": users, "model": {m: model for m in folds.METRICS},
                                    "mostpop": {m: [0.0] * len(users) for m in folds.METRICS}}))
        return path

    results = {"x": [[write("x", s, f, [f"u{f}"], [0.5 + s]) for f in range(3)]
                     for s in range(2)]}
    users, fold_of, arrays = folds.load(results)
    assert users == ["u0", "u1", "u2"] and fold_of.tolist() == [0, 1, 2]
    assert arrays["x"]["recall@50"].shape == (2, 3)
    assert arrays[folds.MOSTPOP]["recall@50"].shape == (3,)
    result = folds.compare(arrays["x"], arrays[folds.MOSTPOP], fold_of)["recall@50"]
    assert result["mean_difference"] == pytest.approx(1.0) and result["seeds"] == 2
    assert folds.run_dir_of(tmp_path, "x", 1, 2, seeds=2) == tmp_path / "x" / "seed-1" / "fold-2"
    assert folds.run_dir_of(tmp_path, "x", 0, 2, seeds=1) == tmp_path / "x" / "fold-2"


def test_interest_measures_are_loaded_summarised_and_minority_pairs_skip_missing(folds, tmp_path):
    def write(name, fold, recall, minority, cosine, dispersion):
        path = tmp_path / name / f"fold-{fold}" / "per_user.json"
        path.parent.mkdir(parents=True)
        n = len(recall)
        path.write_text(json.dumps({
            "users": [f"u{fold}-{i}" for i in range(n)],
            "model": {m: recall for m in folds.METRICS},
            "mostpop": {m: [0.0] * n for m in folds.METRICS},
            "interests": {"interest_cosine": cosine, "minority_recall@50": minority,
                          "dominant_recall@50": recall, "history_dispersion": dispersion}}))
        return path

    results = {
        "a": [write("a", 0, [1.0, 0.0, 0.5], [1.0, None, 0.0], [0.9, 0.9, 0.9], [0.1, 0.5, 0.9])],
        "b": [write("b", 0, [0.0, 0.0, 0.5], [0.0, None, 0.0], [0.2, 0.4, 0.6], [0.1, 0.5, 0.9])],
    }
    _, fold_of, arrays = folds.load(results)
    assert np.isnan(arrays["a"]["minority_recall@50"][1])
    summary = folds.interest_summary(arrays)
    assert summary["a"]["interest_cosine"] == pytest.approx(0.9)
    assert summary["b"]["interest_cosine"] == pytest.approx(0.4)
    assert summary["a"]["minority_recall@50"] == pytest.approx(0.5)  # the user with none left out
    # terciles of dispersion: one user each; a's low-dispersion user has recall 1
    assert summary["a"]["recall@50_dispersion_low"] == 1.0
    assert summary["b"]["recall@50_dispersion_low"] == 0.0
    pair = folds.compare(arrays["a"], arrays["b"], fold_of, folds.TARGET_SUBSETS)
    assert pair["minority_recall@50"]["users"] == 2
    assert pair["minority_recall@50"]["mean_difference"] == pytest.approx(0.5)
    table = folds.markdown({"means": {}, "pairs": {}, "train_time": {}, "interests": summary,
                            "minority_pairs": {"a vs b": pair}})
    assert "interest_cosine" in table and "(2 users)" in table
