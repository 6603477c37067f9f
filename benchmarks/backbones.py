"""Train every backbone on the embedded data over several seeds; print JSON, write a table.

Each run is a separate `python -m trainer train` process, so its wall time and peak RSS are its
own. Usage: python benchmarks/backbones.py --seeds 5 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METRICS = ("recall@20", "recall@50", "ndcg@20", "ndcg@50", "hitrate@20", "hitrate@50")
BACKBONES = ("comirec-sa", "comirec-dr", "mind")


def run_one(backbone: str, seed: int, extra: list[str], workdir: Path) -> dict:
    out = workdir / f"{backbone}-{seed}"
    cmd = [sys.executable, "-m", "trainer", "train", "--dataset", "movielens-small",
           "--backbone", backbone, "--seed", str(seed), "--no-progress", "--run-dir", str(out),
           *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["wall_seconds"] = time.perf_counter() - started
    return report


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def table(results: dict[str, list[dict]]) -> str:
    head = "| model | " + " | ".join(METRICS) + " | train s | peak RSS MB |"
    lines = [head, "|" + "---|" * (len(METRICS) + 3)]
    for backbone, runs in results.items():
        cells = [mean_std([r["test"][m] for r in runs]) for m in METRICS]
        secs = mean_std([r["train"]["seconds"] for r in runs]).replace(".0000", "")
        rss = f"{max(r['train']['peak_rss_mb'] for r in runs):.0f}"
        lines.append(f"| {backbone} | " + " | ".join(cells) + f" | {secs} | {rss} |")
    mostpop = next(iter(results.values()))
    cells = [mean_std([r["mostpop"][m] for r in mostpop]) for m in METRICS]
    lines.append("| MostPop | " + " | ".join(cells) + " | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("extra", nargs="*", help="extra trainer arguments, after --")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            for seed in range(args.seeds):
                report = run_one(backbone, seed, args.extra, Path(tmp))
                results.setdefault(backbone, []).append(report)
                print(f"{backbone} seed {seed}: test recall@50 {report['test']['recall@50']:.4f} "
                      f"(MostPop {report['mostpop']['recall@50']:.4f}), "
                      f"{report['train']['seconds']:.0f}s", file=sys.stderr)
    summary = {
        backbone: {
            "test": {m: {"mean": float(np.mean([r["test"][m] for r in runs])),
                         "std": float(np.std([r["test"][m] for r in runs]))} for m in METRICS},
            "mostpop_recall@50": runs[0]["mostpop"]["recall@50"],
            "beats_mostpop_recall@50_every_seed": all(
                r["test"]["recall@50"] > r["mostpop"]["recall@50"] for r in runs),
            "train_seconds_max": max(r["train"]["seconds"] for r in runs),
            "peak_rss_mb_max": max(r["train"]["peak_rss_mb"] for r in runs),
            "per_seed_recall@50": [r["test"]["recall@50"] for r in runs],
        }
        for backbone, runs in results.items()
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backbones.json").write_text(json.dumps({"summary": summary, "runs": results},
                                                        indent=1))
    (args.out / "backbones.md").write_text(table(results) + "\n")
    print(table(results), file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
