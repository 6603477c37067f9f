"""benchmarks/filtered_search.py on the tiny bundle: its JSON, and exact recall on a flat
index (every selectivity is answered exactly there)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import BENCHMARKS


def test_filtered_search_reports_each_selectivity(tiny_bundle, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "filtered_search.py"), "--bundle",
                           str(tiny_bundle), "--requests", "20", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "filtered_search.json").read_text())
    assert [r["selectivity"] for r in result["filtered"]] == [0.1, 0.01, 0.001]
    assert [r["allowed"] for r in result["filtered"]] == [20, 2, 1]  # of 200 items
    assert all(r["recall_at_k"] == 1.0 and r["path"] == "exact" for r in result["filtered"])
    assert result["unfiltered"]["p50_ms"] > 0 and "| 0.01 | 2 | exact |" in \
        (tmp_path / "filtered_search.md").read_text()
