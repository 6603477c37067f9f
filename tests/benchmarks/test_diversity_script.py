"""benchmarks/diversity.py: the service's merge on a trained run's test users."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import benchmark_script


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "synthetic"
    subprocess.run([sys.executable, "-m", "trainer", "train", "--dataset", "synthetic",
                    "--epochs", "2", "--dim", "16", "--run-dir", str(run), "--no-progress"],
                   check=True, capture_output=True)
    return run


def test_setting_zero_is_the_evaluated_merge_and_more_spreads_the_list(run_dir):
    with benchmark_script("diversity") as diversity:
        curve = diversity.run_curve(run_dir, (0.0, 1.0))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # at 0 the service's merge is the evaluation's: the same test recall
    assert curve[0.0]["recall@50"].mean() == pytest.approx(metrics["test"]["recall@50"])
    assert curve[0.0]["recall@20"].mean() == pytest.approx(metrics["test"]["recall@20"])
    held = "interests_held@20"
    assert curve[1.0][held].mean() >= curve[0.0][held].mean()
    assert (curve[1.0][held] >= 1).all() and (curve[1.0][held] <= 4).all()


def test_a_directory_without_a_checkpoint_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/diversity.py", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"{tmp_path}: no checkpoint.pt" in proc.stderr
