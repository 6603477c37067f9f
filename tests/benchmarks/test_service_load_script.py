"""benchmarks/service_load.py end to end on the tiny bundle: the real service on loopback with
its own redis-server, an unfiltered, a filtered and a rows level, both clients where present."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from service.bundle.load import load_bundle
from tests.helpers import BENCHMARKS


@pytest.mark.parametrize("client", ["httpx", "wrk"])
def test_service_load_reports_plain_and_filtered_levels(tiny_bundle, tmp_path, client):
    if client == "wrk" and shutil.which("wrk") is None:
        pytest.skip("Debian's wrk is not installed (the script falls back to httpx)")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make redis-server)")
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "service_load.py"), "--bundle", str(tiny_bundle),
         "--users", "20", "--history", "5", "--k", "5", "--seconds", "1", "--floor-seconds",
         "0.5", "--warmup-seconds", "0.3", "--concurrency", "2", "--filter-share", "0.2",
         "--rows", "3",         "--out", str(out), *(["--httpx"] if client == "httpx" else [])],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text()) and result["client"] == client
    bundle = result["bundles"][0]
    plain, filtered = bundle["http_c2"], bundle["http_c2_filter0.2"]
    rows = bundle["http_c2_rows3"]
    # Every request answered 200: a filter or rows body the service refused would count as an
    # error.
    for level in (plain, filtered, rows):
        assert level["requests"] > 0 and level["errors"] == 0, level
    assert filtered["p50_over_unfiltered_p50"] == round(
        filtered["p50_ms"] / plain["p50_ms"], 2)
    # The filters include whole categories until they hold at least the share asked for.
    categories = load_bundle(tiny_bundle, verify=False).fields["category"]
    assert 0.2 <= filtered["allowed_share"] < 1.0 and len(categories) > 1
    # The tables beside the JSON: one row per level, the filtered one with its share.
    table = out.with_suffix(".md").read_text()
    assert f"| 2 | 0.2 ({filtered['allowed_share']:.2%}) | {filtered['rps']:,.0f} " in table
    assert f"| 2 | - | {plain['rps']:,.0f} " in table
    assert rows["rows"] == 3 and rows["p50_over_list_p50"] == round(
        rows["p50_ms"] / plain["p50_ms"], 2)
    assert f"| 2 | rows 3 | {rows['rps']:,.0f} " in table
