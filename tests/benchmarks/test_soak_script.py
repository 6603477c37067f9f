"""The pure helpers of benchmarks/soak.py (no processes, no network)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import httpx
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def records(soak, *spec):
    return [soak.Record(t, "/recommend", s, 0.01) for t, s in spec]


def test_schedule_one_cycle_for_short_runs(soak):
    assert soak.schedule(60) == [(12.0, "redis_restart"), (24.0, "publish"),
                                 (36.0, "kill9_restart")]


def test_schedule_repeats_the_cycle_from_300_seconds(soak):
    plan = soak.schedule(600)
    assert [k for _, k in plan] == ["redis_restart", "publish", "kill9_restart"] * 2
    assert [t for t, _ in plan] == [120.0, 240.0, 360.0, 420.0, 480.0, 540.0]
    assert len(soak.schedule(299)) == 3


def test_longest_non_200_picks_the_longest_run_in_completion_order(soak):
    rs = records(soak, (0.0, "200"), (1.0, "503"), (1.5, "500"), (2.0, "200"),
                 (3.0, "error:ConnectError"), (3.2, "503"), (3.4, "503"), (5.0, "200"))
    assert soak.longest_non_200(list(reversed(rs))) == {
        "seconds": 0.5, "requests": 2, "from_s": 1.0, "to_s": 1.5}


def test_longest_non_200_counts_requests_on_a_tie_and_a_trailing_run(soak):
    rs = records(soak, (1.0, "503"), (1.0, "503"), (2.0, "200"), (3.0, "503"), (3.0, "503"),
                 (3.0, "503"))
    assert soak.longest_non_200(rs) == {"seconds": 0.0, "requests": 3, "from_s": 3.0,
                                        "to_s": 3.0}


def test_longest_non_200_without_failures(soak):
    assert soak.longest_non_200(records(soak, (1.0, "200"))) == {
        "seconds": 0.0, "requests": 0, "from_s": None, "to_s": None}
    assert soak.longest_non_200([])["requests"] == 0


def test_longest_without_200_includes_the_edges(soak):
    rs = records(soak, (1.0, "200"), (2.0, "503"), (4.5, "200"), (5.0, "200"))
    assert soak.longest_without_200(rs, 6.0) == {"seconds": 3.5, "from_s": 1.0, "to_s": 4.5}
    assert soak.longest_without_200([], 6.0) == {"seconds": 6.0, "from_s": 0.0, "to_s": 6.0}


def test_status_counts_by_endpoint_and_overall(soak):
    rs = [soak.Record(0, "/recommend", "200", 0), soak.Record(0, "/events", "503", 0),
          soak.Record(0, "/events", "200", 0), soak.Record(0, "/events", "503", 0)]
    by_endpoint, overall = soak.status_counts(rs)
    assert by_endpoint == {"/events": {"200": 1, "503": 2}, "/recommend": {"200": 1}}
    assert overall == {"200": 2, "503": 2}


def test_window_statuses_is_half_open(soak):
    rs = records(soak, (1.0, "200"), (2.0, "503"), (3.0, "200"))
    assert soak.window_statuses(rs, 1.0, 3.0) == {"200": 1, "503": 1}


def test_lost_events_keeps_order_and_caps_the_list(soak):
    acked = [f"e{i}" for i in range(20)]
    assert soak.lost_events(acked, set(acked)) == (0, [])
    assert soak.lost_events(acked, {"e0"}, limit=3) == (19, ["e1", "e2", "e3"])


def test_status_name_and_percentiles(soak):
    assert soak.status_name(httpx.ConnectError("refused")) == "error:ConnectError"
    assert soak.percentiles_ms([]) == {"p50_ms": None, "p99_ms": None}
    assert soak.percentiles_ms([0.001, 0.003]) == {"p50_ms": 2.0, "p99_ms": 2.98}


def test_parse_args_defaults_and_bounds(soak):
    args = soak.parse_args([])
    assert (args.seconds, args.concurrency, args.name) == (600.0, 8, "recommender")
    assert args.models_dir == Path("models") and args.out is None and not args.keep
    with pytest.raises(SystemExit):
        soak.parse_args(["--seconds", "0"])


def test_no_bundle_exits_2_with_a_hint(soak, tmp_path, capsys):
    assert soak.main(["--models-dir", str(tmp_path), "--seconds", "1"]) == 2
    assert "make train" in capsys.readouterr().err
