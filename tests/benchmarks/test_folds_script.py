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


def test_training_seconds_summarises_the_runs_metrics(folds, tmp_path):
    paths = []
    for fold, seconds in enumerate([10.0, 30.0]):
        run = tmp_path / f"fold-{fold}"
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"train": {"seconds": seconds}}))
        paths.append(run / "per_user.json")
    assert folds.training_seconds(paths) == {"mean": 20.0, "min": 10.0, "max": 30.0}
    assert folds.training_seconds([tmp_path / "missing" / "per_user.json"]) is None
