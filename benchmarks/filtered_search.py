"""Filtered retrieval: latency and recall of the service's filtered search path against the
unfiltered one, per selectivity (docs/architecture.md, "Filters").

For each request (K interest vectors from the bundle's encoder on a history of items drawn by
popularity) and each selectivity s, a seeded random s x N of the catalogue is allowed; the
service's `Recommender.search_rows` answers (exact over few rows, the index restricted by an
IDSelector above EXACT_FILTER_MAX_ROWS) and is timed (1 FAISS thread, as the unbatched path),
beside the unfiltered `Recommender.search` of the same requests in the same run. recall@k: the
merged top-k against an exact filtered search (every allowed item scored by its best
interest).

    python benchmarks/filtered_search.py --bundle models/recommender/1 \\
        --out benchmarks/results/filtered

Prints and writes <out>/filtered_search.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np

from service.bundle.load import load_bundle
from service.serving.filters import EXACT_FILTER_MAX_ROWS
from service.serving.recommender import Recommender
from service.serving.retrieval import merge_interest_results

SELECTIVITIES = (0.1, 0.01, 0.001)


def requests_of(model: Recommender, count: int, seed: int) -> np.ndarray:
    """Interest vectors [count, K, d] of histories drawn by popularity."""
    rng = np.random.default_rng(seed)
    weights = model.bundle.popularity.astype(np.float64) + 1.0
    rows = rng.choice(model.item_count, size=(count, model.maxlen), p=weights / weights.sum())
    return model.encode(rows.astype(np.int64) + 1)


def exact_filtered(model: Recommender, interests: np.ndarray, allowed: np.ndarray, k: int
                   ) -> np.ndarray:
    scores = (np.asarray(model.bundle.item_vectors[allowed]) @ interests.T).max(axis=1)
    return allowed[np.argsort(-scores, kind="stable")[:k]]


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return tuple(float(v) for v in np.percentile(np.array(times) * 1000, [50, 99]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--fanout", type=int, default=50, help="candidates per interest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/filtered"))
    args = parser.parse_args()

    faiss.omp_set_num_threads(1)
    model = Recommender(load_bundle(args.bundle))
    n_items, info = model.item_count, model.bundle.manifest.index
    requests = requests_of(model, args.requests, args.seed)
    load_start = os.getloadavg()
    it = iter(range(10**9))

    def unfiltered() -> None:
        model.search(requests[next(it) % len(requests)][None], args.fanout)

    base_p50, base_p99 = timed(unfiltered, args.requests)
    rows = []
    rng = np.random.default_rng(args.seed)
    for selectivity in SELECTIVITIES:
        allowed = np.sort(rng.choice(n_items, max(1, round(selectivity * n_items)),
                                     replace=False))
        recalls = []
        for interests in requests:
            scores, found = model.search_rows(interests, args.fanout, allowed)
            ids, _, _ = merge_interest_results(scores, found, args.k)
            truth = exact_filtered(model, interests, allowed, args.k)
            recalls.append(len(set(ids.tolist()) & set(truth.tolist())) / max(len(truth), 1))
        j = iter(range(10**9))
        p50, p99 = timed(lambda allowed=allowed, j=j: model.search_rows(
            requests[next(j) % len(requests)], args.fanout, allowed), args.requests)
        rows.append({"selectivity": selectivity, "allowed": len(allowed),
                     "path": "exact" if len(allowed) <= EXACT_FILTER_MAX_ROWS else
                     f"{info.kind} + IDSelector",
                     "recall_at_k": float(np.mean(recalls)), "p50_ms": p50, "p99_ms": p99,
                     "p50_vs_unfiltered": p50 / base_p50})
    result = {"bundle": str(args.bundle), "items": n_items, "index": info.factory,
              "search_params": info.search_params, "k": args.k, "fanout": args.fanout,
              "requests": args.requests, "faiss_threads": 1,
              "unfiltered": {"p50_ms": base_p50, "p99_ms": base_p99}, "filtered": rows,
              "load_average": {"start": load_start, "end": os.getloadavg()}}
    lines = [f"Filtered search on {n_items} items ({info.factory}, {info.search_params}), "
             f"k={args.k}, {args.requests} requests, 1 FAISS thread; unfiltered p50 "
             f"{base_p50:.3f} ms, p99 {base_p99:.3f} ms; load {load_start[0]:.2f} -> "
             f"{result['load_average']['end'][0]:.2f}", "",
             "| selectivity | allowed | path | recall@k | p50 ms | p99 ms | p50 / unfiltered |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['selectivity']} | {r['allowed']} | {r['path']} | {r['recall_at_k']:.4f} | "
              f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['p50_vs_unfiltered']:.2f} |"
              for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "filtered_search.json").write_text(json.dumps(result, indent=1))
    (args.out / "filtered_search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
