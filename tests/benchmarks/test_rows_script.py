"""benchmarks/rows.py end to end: two tiny fold runs, re-evaluated under two row policies on
their validation users, paired with the list at the same size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import BENCHMARKS
from trainer.cli import main as cli_main

SYNTHETIC = "users=300,items=200,topics=10,min_len=10,max_len=20"


@pytest.mark.slow
def test_rows_benchmark_compares_policies_on_the_same_models(tmp_path, capsys):
    runs = tmp_path / "runs" / "tiny"
    for fold in (0, 1):
        assert cli_main(["train", "--dataset", "synthetic", "--synthetic", SYNTHETIC,
                         "--folds", "3", "--fold", str(fold), "--epochs", "2",
                         "--eval-every", "10", "--dim", "16", "--no-progress",
                         "--run-dir", str(runs / f"fold-{fold}")]) == 0
    capsys.readouterr()
    out = tmp_path / "summary"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "rows.py"), "--runs", str(runs), "--split", "valid",
         "--policy", "decided=", "--policy", "two=min_support=2,history_weight=1",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["folds"] == 2 and summary["seeds"] == 1 and summary["users"] == 200
    assert summary["policies"]["two"]["min_support"] == 2
    assert summary["policies"]["two"]["history_weight"] == 1.0
    for name in ("decided", "two"):
        means = summary["means"][name]
        assert means["rows_coherence"] == 1.0 and 1 <= means["rows_per_user"] <= 4
        paired = summary["rows_vs_list"][name]["recall"]
        assert paired["mean_difference"] == pytest.approx(
            means["rows_recall"] - means["list_recall_at_rows"], abs=1e-9)
        assert paired["users"] == 200 and paired["folds"] == 2
    # the stricter policy shows no more rows than the decided one, user for user on average
    assert summary["means"]["two"]["rows_per_user"] <= summary["means"]["decided"][
        "rows_per_user"]
    assert "decided vs two" in summary["pairs"]
    assert "rows minus the list at the same size" in (out / "summary.md").read_text()
