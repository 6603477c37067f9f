"""Attempts to make ESIM help: variations of the ESIM settings for one backbone, judged on the
VALIDATION split only (the test split is for the ablation table).

The baseline rows (IBIM alone and default ESIM, same seeds, same --threads) are read from the
ablation's results file when present, so the comparison is on equal footing. The LLM is the
metadata baseline unless --llm says otherwise (the local LLM costs minutes per run).

Usage: python benchmarks/esim_tuning.py --seeds 3 --out benchmarks/results -- --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import esim_ablation  # beside this file
import numpy as np

TRIALS = {
    "beta 1.0 (stronger alignment)": ["--esim-beta", "1.0"],
    "alpha 1.0, beta 1.0": ["--esim-alpha", "1.0", "--esim-beta", "1.0"],
    "warm-up 3 epochs": ["--esim-warmup-epochs", "3"],
    "128 typical users (C=32, m=4)": ["--esim-clusters", "32", "--esim-users-per-cluster", "4"],
    "similarity matching": ["--esim-matching", "similarity"],
    "beta 1.0 + 128 typical users": ["--esim-beta", "1.0", "--esim-clusters", "32",
                                     "--esim-users-per-cluster", "4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--backbone", default="comirec-sa")
    parser.add_argument("--llm", default="metadata")
    parser.add_argument("--trials", nargs="+", default=list(TRIALS), choices=list(TRIALS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("extra", nargs="*", help="extra trainer arguments for every run")
    args = parser.parse_args()

    log_path = args.out / "esim_tuning.jsonl"
    rows = [json.loads(line) for line in log_path.read_text().splitlines()] \
        if log_path.exists() else []
    done = {(r["trial"], r["seed"]) for r in rows}
    for trial in args.trials:
        esim_ablation.VARIANTS[trial] = ["--esim", "--llm", args.llm, *TRIALS[trial]]
        for seed in range(args.seeds):
            if (trial, seed) in done:
                continue
            row = esim_ablation.run_one(args.backbone, trial, seed, args.extra, args.out)
            row["trial"] = trial
            rows.append(row)
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{trial} seed {seed}: valid recall@50 {row['valid']['recall@50']:.4f}",
                  file=sys.stderr, flush=True)

    results: dict[str, list[float]] = {}
    ablation = args.out / "esim_ablation.jsonl"
    if ablation.exists():
        for line in ablation.read_text().splitlines():
            r = json.loads(line)
            if r["backbone"] == args.backbone and r["seed"] < args.seeds \
                    and r["extra"] == args.extra:
                results.setdefault(f"[ablation] {r['variant']}", []).append(
                    r["valid"]["recall@50"])
    for r in rows:
        if r["seed"] < args.seeds and r["extra"] == args.extra and r["trial"] in args.trials:
            results.setdefault(r["trial"], []).append(r["valid"]["recall@50"])
    summary = {name: {"valid_recall@50_mean": float(np.mean(v)),
                      "valid_recall@50_std": float(np.std(v)), "n": len(v)}
               for name, v in results.items()}
    lines = ["| setting | valid recall@50 | seeds |", "|---|---|---|"]
    lines += [f"| {name} | {s['valid_recall@50_mean']:.4f} ± {s['valid_recall@50_std']:.4f} | "
              f"{s['n']} |" for name, s in summary.items()]
    (args.out / "esim_tuning.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"backbone": args.backbone, "llm": args.llm, "summary": summary},
                     indent=1))


if __name__ == "__main__":
    main()
