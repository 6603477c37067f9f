"""The index sweep (benchmarks/index_sweep.py) and the operating point it hands to export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from service.bundle.format import IndexInfo
from service.bundle.load import load_bundle
from tests.helpers import benchmark_script
from trainer.export import IndexSpec, build_index, index_spec


@pytest.fixture(scope="module")
def sweep():
    with benchmark_script("index_sweep") as module:
        yield module


def clustered(n: int, d: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((clusters, d)).astype(np.float32) * 3
    return centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors_and_queries():
    rng = np.random.default_rng(0)
    vectors = clustered(6000, 16, 30, rng)
    # Interest-like queries: near cluster centres, 4 per "request".
    queries = clustered(400, 16, 30, rng)
    return vectors, queries


@pytest.fixture(scope="module")
def result(sweep, vectors_and_queries):
    vectors, queries = vectors_and_queries
    cands = sweep.candidates(len(vectors), vectors.shape[1], ("flat", "ivf", "hnsw"),
                             ivf_lists_grid=[32, 64], hnsw_m=[8])
    return sweep.run_sweep(vectors, queries, interests=4, target=0.95, requests=40,
                           cands=cands, min_batch_seconds=0.01)


def test_the_chosen_point_is_the_fastest_that_meets_the_target(result):
    chosen = result["chosen"]
    assert chosen["meets_target"] and chosen["recall_at_50"] >= 0.95
    meeting = [p for p in result["points"] if p["recall_at_50"] >= 0.95]
    assert chosen["p50_ms"] == min(p["p50_ms"] for p in meeting)
    # Every family was swept, the exact baseline included, each grid cheapest first.
    assert {p["family"] for p in result["points"]} == {"flat", "ivf", "hnsw"}
    flat = [p for p in result["points"] if p["family"] == "flat"]
    assert len(flat) == 1 and flat[0]["recall_at_50"] == 1.0
    ivf32 = [p["search_params"]["nprobe"] for p in result["points"]
             if p["factory"] == "IVF32,Flat"]
    assert ivf32 == sorted(ivf32) and ivf32[0] == 1


def test_the_json_has_the_fields_and_a_plot_is_written(sweep, result, tmp_path):
    json_path, png_path = sweep.write(result, tmp_path)
    body = json.loads(json_path.read_text())
    assert {"items", "dim", "queries", "interests", "k", "target", "search_threads",
            "machine", "points", "chosen"} <= body.keys()
    assert {"loadavg_start", "loadavg_end", "cpus"} <= body["machine"].keys()
    for point in body["points"]:
        assert {"family", "factory", "search_params", "recall_at_50", "p50_ms", "p99_ms",
                "batch_rps", "bytes", "build_seconds"} <= point.keys()
        assert point["p99_ms"] >= point["p50_ms"] > 0 and point["bytes"] > 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_choose_without_a_point_at_the_target_takes_the_most_accurate(sweep):
    points = [{"recall_at_50": 0.7, "p50_ms": 1.0, "p99_ms": 2.0},
              {"recall_at_50": 0.9, "p50_ms": 3.0, "p99_ms": 4.0}]
    chosen = sweep.choose(points, 0.95)
    assert chosen["recall_at_50"] == 0.9 and chosen["meets_target"] is False
    points.append({"recall_at_50": 0.96, "p50_ms": 5.0, "p99_ms": 6.0})
    points.append({"recall_at_50": 0.99, "p50_ms": 4.0, "p99_ms": 9.0})
    assert sweep.choose(points, 0.95)["p50_ms"] == 4.0


def test_the_chosen_point_is_what_export_builds_and_records(sweep, result,
                                                            vectors_and_queries):
    vectors, queries = vectors_and_queries
    spec = sweep.spec_from_point(result["chosen"])
    index, info = build_index(vectors, queries, spec, progress=False)
    assert info["factory"] == result["chosen"]["factory"]
    if spec.tune is not None:  # the guard starts at the chosen value and may only raise it
        assert info["search_params"][spec.tune] >= spec.search_params[spec.tune]
    assert info["recall_at_50"] >= 0.95
    assert info["chosen_by"].startswith("benchmarks/index_sweep.py")
    assert info["search_ms_p99"] >= info["search_ms_p50"] > 0
    assert info["recall_queries"] == len(queries) and info["search_threads"] == 1
    # It validates as the manifest's index section and round-trips.
    assert IndexInfo.model_validate(info).model_dump()["chosen_by"] == info["chosen_by"]


def test_the_export_guard_raises_a_search_parameter_that_falls_short(vectors_and_queries):
    vectors, queries = vectors_and_queries
    spec = IndexSpec("ivf", "IVF64,Flat", {"nprobe": 1}, "nprobe", (1, 2, 4, 8, 16, 32, 64),
                     chosen_by="test")
    _, info = build_index(vectors, queries, spec, recall_target=0.99, progress=False)
    assert info["search_params"]["nprobe"] > 1 and info["recall_at_50"] >= 0.99


def test_auto_large_catalogue_rule_and_new_kind():
    assert index_spec("auto", 50_000, 64).kind == "flat"
    large = index_spec("auto", 1_000_000, 64)
    assert large.kind != "flat" and large.chosen_by.startswith("auto")
    pq = index_spec("ivfpq", 1_000_000, 64)
    assert pq.factory == "IVF4000,PQ32x4fs,RFlat" and pq.tune == "nprobe"


def test_an_old_manifest_index_section_still_loads():
    old = {"kind": "ivf", "factory": "IVF3999,Flat", "search_params": {"nprobe": 256},
           "recall_at_50": 0.55, "build_seconds": 24.0}
    info = IndexInfo.model_validate(old)
    assert info.search_ms_p50 is None and info.chosen_by is None and info.build_params == {}


def test_publish_records_the_operating_point(tiny_dataset, tmp_path):
    from trainer.config import TrainConfig
    from trainer.encoders.registry import build_encoder
    from trainer.export import publish_bundle

    cfg = TrainConfig(dim=16)
    model = build_encoder(tiny_dataset.n_items, cfg).eval()  # untrained: only the record counts
    spec = IndexSpec("hnsw", "HNSW8,Flat", {"efSearch": 16}, "efSearch", (16, 32, 64, 128),
                     {"efConstruction": 40}, chosen_by="sweep test")
    path = publish_bundle(model, tiny_dataset, cfg, {"synthetic": "tiny"}, {}, tmp_path,
                          "swept", index_kind=spec, progress=False)
    index = load_bundle(path).manifest.index
    assert index.factory == "HNSW8,Flat" and index.chosen_by == "sweep test"
    assert index.build_params == {"efConstruction": 40}
    assert index.search_params["efSearch"] >= 16 and index.recall_target == 0.95
    assert index.search_ms_p50 is not None and index.recall_queries > 0


def test_load_benchmark_sums_pss_over_the_process_tree():
    with benchmark_script("service_load") as module:
        _check_pss(module)


def _check_pss(module):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while child.pid not in module.process_tree(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in module.process_tree(os.getpid())
        assert module.pss_mb(os.getpid()) > module.pss_mb(child.pid) > 0
    finally:
        child.kill()
        child.wait()
