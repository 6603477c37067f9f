"""benchmarks/availability.py on the tiny bundle: two replicas of two workers, every worker
reaches each change, and the JSON it reports."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import BENCHMARKS


def test_availability_reaches_every_worker_and_is_reported(models_dir, tmp_path):
    out = tmp_path / "availability.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "availability.py"), "--models-dir",
                           str(models_dir), "--name", "tiny", "--rounds", "3", "--out",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result == json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["replicas"], result["workers"], result["rounds"]) == (2, 2, 3)
    for measure in ("to_every_worker", "to_every_answer"):
        times = result[measure]
        assert 0 <= times["p50_ms"] <= times["p99_ms"] <= times["max_ms"] < 10_000
