"""ANN index sweep: recall@50 against exact search vs search latency, on a trained model's item
vectors and real interest vectors (held-out users), to choose the index operating point.

Full scale: benchmarks/bundle.py trains the 1M-item model, runs this sweep on its vectors,
publishes the bundle with the chosen operating point and writes the JSON and the plot:

    python benchmarks/bundle.py --keep /var/tmp/bench-store --sweep-out benchmarks/results/index

Standalone, on the vectors and queries that run saved (1M x 64: about 20 minutes on an idle
2-core machine; 200k items took 5 minutes on a busy one):

    python benchmarks/index_sweep.py --bundle /var/tmp/bench-store/synthetic-1m/1 \\
        --queries /var/tmp/bench-store/synthetic-1m.queries.npy --out benchmarks/results/index

Each index is built once (all cores); for each search setting it measures recall@50 against
exact search over all queries, the latency of one request's search (its K interest vectors in
one call, 1 FAISS thread, as the service's unbatched path; p50/p99 over --requests calls), the
throughput of batches of 64 requests (1 thread), the serialized size and the build time. The
default is the fastest point (p50) whose recall@50 reaches the target (0.95). Writes
<out>/index_sweep.json and <out>/index_sweep.png (recall vs p50 latency).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from trainer.export import (
    ANN_RECALL_TARGET,
    RECALL_AT,
    IndexSpec,
    ann_recall,
    exact_top,
    ivf_lists,
    make_index,
    search_latency,
)

log = logging.getLogger("index_sweep")

FAMILIES = ("flat", "ivf", "hnsw", "ivfpq")
NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
EF_SEARCH = (50, 64, 96, 128, 192, 256, 384, 512)  # FAISS searches max(efSearch, k) anyway
BATCH_REQUESTS = 64  # the service's default BATCH_MAX_SIZE
STOP_RECALL = 0.995  # a grid stops past this: higher settings only cost time


@dataclass(frozen=True)
class Candidate:
    """One index (factory + build parameters) and the search settings tried on it, cheapest
    first: `fixed` always, `tune` taking each of `values`."""

    family: str
    factory: str
    tune: str | None = None
    values: tuple[int, ...] = ()
    fixed: dict[str, int] = field(default_factory=dict)
    build_params: dict[str, int] = field(default_factory=dict)

    def label(self) -> str:
        extra = [f"{k}={v}" for k, v in {**self.build_params, **self.fixed}.items()]
        return self.factory + (f" ({', '.join(extra)})" if extra else "")

    def settings(self) -> list[dict[str, int]]:
        if self.tune is None:
            return [dict(self.fixed)]
        return [{**self.fixed, self.tune: v} for v in self.values]


def pow2(x: float) -> int:
    return int(2 ** round(np.log2(max(1.0, x))))


def candidates(n: int, d: int, families: Sequence[str] = FAMILIES,
               ivf_lists_grid: Sequence[int] | None = None,
               hnsw_m: Sequence[int] = (16, 32)) -> list[Candidate]:
    """The sweep's grid for n items of dimension d: IVF with about sqrt(n) and 4 sqrt(n)
    lists (powers of two), HNSW with M in hnsw_m (efConstruction 80, as export),
    IVF-PQ with exact re-ranking (8-bit PQ over 4-dim and 4-bit fast-scan PQ over 2-dim
    sub-vectors, at export's nlist)."""
    out: list[Candidate] = []
    if "flat" in families:
        out.append(Candidate("flat", "Flat"))
    if "ivf" in families:
        # More lists did not mean fewer vectors scanned for the same recall (50k trained
        # items: IVF1024 needed twice IVF256's p50 to pass 0.95), so 8 sqrt(n) is not swept.
        grid = ivf_lists_grid or sorted({pow2(c * np.sqrt(n)) for c in (1, 4)})
        for nlist in grid:
            if nlist > n // 39:  # FAISS wants about 39 training points per list
                continue
            out.append(Candidate("ivf", f"IVF{nlist},Flat", "nprobe",
                                 tuple(p for p in NPROBES if p <= nlist)))
    if "hnsw" in families:
        for m in hnsw_m:
            out.append(Candidate("hnsw", f"HNSW{m},Flat", "efSearch", EF_SEARCH,
                                 build_params={"efConstruction": 80}))
    if "ivfpq" in families:
        nlist = ivf_lists(n)
        if nlist <= n // 39:
            probes = tuple(p for p in NPROBES if p <= nlist)
            for pq in (f"PQ{max(1, d // 4)}x8", f"PQ{max(1, d // 2)}x4fs"):
                for k_factor in (2, 4):
                    out.append(Candidate("ivfpq", f"IVF{nlist},{pq},RFlat", "nprobe", probes,
                                         fixed={"k_factor_rf": k_factor}))
    return out


def batch_rps(index: faiss.Index, queries: np.ndarray, rows: int, k: int,
              min_seconds: float = 0.5) -> float:
    """Requests per second when BATCH_REQUESTS requests (rows vectors each) are searched in
    one call, 1 FAISS thread."""
    batch = queries[: BATCH_REQUESTS * rows]
    requests = len(batch) // rows
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        calls, started = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - started < min_seconds:
            index.search(batch, k)
            calls += 1
        elapsed = time.perf_counter() - started
    finally:
        faiss.omp_set_num_threads(previous)
    return calls * requests / elapsed


def choose(points: list[dict[str, Any]], target: float = ANN_RECALL_TARGET
           ) -> dict[str, Any]:
    """The fastest point (p50, then p99) with recall@50 >= target; if none reaches it, the
    most accurate one, marked meets_target False."""
    meeting = [p for p in points if p["recall_at_50"] >= target]
    if meeting:
        best = min(meeting, key=lambda p: (p["p50_ms"], p["p99_ms"]))
        return {**best, "meets_target": True}
    best = max(points, key=lambda p: (p["recall_at_50"], -p["p50_ms"]))
    return {**best, "meets_target": False}


def spec_from_point(point: dict[str, Any], source: str = "benchmarks/index_sweep.py"
                    ) -> IndexSpec:
    """The export operating point of a sweep point: the chosen settings as the start, and the
    tuned parameter free to rise (export's recall guard) along the same grid."""
    tune = point.get("tune")
    grid = tuple(point.get("grid") or ())
    return IndexSpec(
        kind=point["family"], factory=point["factory"],
        search_params={k: int(v) for k, v in point["search_params"].items()},
        tune=tune, grid=grid, build_params=dict(point.get("build_params") or {}),
        chosen_by=f"{source}: fastest with recall@50 >= {point['target']} "
                  f"({point['recall_at_50']:.3f} at {point['p50_ms']:.3f} ms p50 in the sweep)")


def run_sweep(vectors: np.ndarray, queries: np.ndarray, interests: int,
              target: float = ANN_RECALL_TARGET, requests: int = 300,
              cands: list[Candidate] | None = None, min_batch_seconds: float = 0.5
              ) -> dict[str, Any]:
    """Sweep `cands` (default: candidates(n, d)) over `vectors` [N, d]; `queries` [Q, d] are
    interest vectors, `interests` consecutive rows per request. Returns the JSON body."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, d = vectors.shape
    k = min(RECALL_AT, n)
    cands = candidates(n, d) if cands is None else cands
    load_start = os.getloadavg()
    started = time.perf_counter()
    truth = exact_top(vectors, queries, k)
    points: list[dict[str, Any]] = []
    flat_p50 = None
    built: tuple[Any, ...] = ()  # (factory, build params, index, seconds, bytes) of the last
    for cand in cands:
        if built[:2] != (cand.factory, cand.build_params):  # e.g. IVF-PQ: one build, 2 k_factors
            built = ()  # free the previous index first
            t0 = time.perf_counter()
            index = make_index(IndexSpec(cand.family, cand.factory,
                                         build_params=cand.build_params), vectors)
            built = (cand.factory, cand.build_params, index, time.perf_counter() - t0,
                     int(faiss.serialize_index(index).nbytes))
        index, build_seconds, size = built[2:]
        space = faiss.ParameterSpace()
        for params in cand.settings():
            for key, value in params.items():
                space.set_index_parameter(index, key, value)
            recall = 1.0 if cand.family == "flat" else ann_recall(index, truth, queries, k)
            p50, p99 = search_latency(index, queries, interests, k, requests=requests)
            point = {
                "family": cand.family, "factory": cand.factory, "label": cand.label(),
                "search_params": params, "build_params": cand.build_params,
                "tune": cand.tune, "grid": list(cand.values), "target": target,
                "recall_at_50": round(recall, 5), "p50_ms": round(p50, 4),
                "p99_ms": round(p99, 4),
                "batch_rps": round(batch_rps(index, queries, interests, k, min_batch_seconds),
                                   1),
                "bytes": size, "build_seconds": round(build_seconds, 2),
            }
            points.append(point)
            log.info("%s %s: recall@%d %.4f, p50 %.3f ms, p99 %.3f ms", cand.label(), params,
                     k, recall, p50, p99)
            if cand.family == "flat":
                flat_p50 = p50
            if recall >= STOP_RECALL or (flat_p50 is not None and p50 > 1.5 * flat_p50):
                break  # past the useful part of the curve
        del index
    chosen = choose(points, target)
    return {
        "items": n, "dim": d, "queries": len(queries), "interests": interests,
        "requests_per_point": requests, "k": k, "target": target,
        "search_threads": 1, "batch_requests": BATCH_REQUESTS,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "faiss": faiss.__version__},
        "seconds": round(time.perf_counter() - started, 1),
        "points": points, "chosen": chosen,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    by_label: dict[str, list[dict[str, Any]]] = {}
    for p in result["points"]:
        by_label.setdefault(p["label"], []).append(p)
    for label, pts in by_label.items():
        ax.plot([p["p50_ms"] for p in pts], [p["recall_at_50"] for p in pts],
                marker="o", markersize=3, label=label)
    chosen = result["chosen"]
    ax.plot([chosen["p50_ms"]], [chosen["recall_at_50"]], marker="*", markersize=16,
            color="black", linestyle="none",
            label=f"chosen: {chosen['label']} {chosen['search_params']}")
    ax.axhline(result["target"], color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("search p50 per request (ms; K interest vectors, 1 FAISS thread)")
    ax.set_ylabel("recall@50 vs exact")
    ax.set_ylim(max(0.0, min(p["recall_at_50"] for p in result["points"]) - 0.02), 1.005)
    load = result["machine"]["loadavg_start"][0]
    ax.set_title(f"{result['items']:,} items x {result['dim']}, {result['queries']:,} "
                 f"interest vectors; load average {load} on {result['machine']['cpus']} cores")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "index_sweep.json", out / "index_sweep.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png_path)
    return json_path, png_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="a bundle directory (its item_embeddings)")
    source.add_argument("--vectors", type=Path, help="item vectors [N, d] (.npy)")
    parser.add_argument("--queries", type=Path, required=True,
                        help="interest vectors (.npy): [U, K, d], or [Q, d] with --interests")
    parser.add_argument("--interests", type=int, help="rows per request for [Q, d] queries")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--ivf-lists", type=int, nargs="+", help="IVF nlist values to try")
    parser.add_argument("--hnsw-m", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--target", type=float, default=ANN_RECALL_TARGET)
    parser.add_argument("--requests", type=int, default=300, help="timed searches per point")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/index"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    path = args.bundle / "item_embeddings.npy" if args.bundle else args.vectors
    vectors = np.load(path, mmap_mode="r")
    queries = np.load(args.queries)
    interests = queries.shape[1] if queries.ndim == 3 else (args.interests or 1)
    queries = queries.reshape(-1, vectors.shape[1])
    cands = candidates(len(vectors), vectors.shape[1], args.families, args.ivf_lists,
                       args.hnsw_m)
    result = run_sweep(np.asarray(vectors), queries, interests, args.target, args.requests,
                       cands)
    json_path, png_path = write(result, args.out)
    print(json.dumps({"chosen": result["chosen"], "json": str(json_path),
                      "plot": str(png_path)}))


if __name__ == "__main__":
    main()
