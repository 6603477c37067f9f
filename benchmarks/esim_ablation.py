"""ESIM ablation on the embedded data: for each backbone, IBIM alone vs IBIM+ESIM(metadata) vs
IBIM+ESIM(local LLM), over several seeds; test metrics mean ± std, LLM time and calls.

Each run is a separate `python -m trainer train` process. Results are appended to
<out>/esim_ablation.jsonl as they come (a rerun skips runs already there), then summarised as
JSON on stdout and a Markdown table in <out>/esim_ablation.md.

Usage: python benchmarks/esim_ablation.py --seeds 5 [--out benchmarks/results] [-- extra args]
The LLM answer cache is <out>/llm-cache: delete it to time the LLM from scratch.
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
VARIANTS = {
    "IBIM": [],
    "IBIM+ESIM(metadata, no LLM)": ["--esim", "--llm", "metadata"],
    "IBIM+ESIM(local SmolLM2)": ["--esim", "--llm", "local"],
}


def run_one(backbone: str, variant: str, seed: int, extra: list[str], out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "trainer", "train", "--dataset", "movielens-small",
               "--backbone", backbone, "--seed", str(seed), "--no-progress", "--run-dir", tmp,
               "--llm-cache", str(out / "llm-cache"), *VARIANTS[variant], *extra]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"backbone": backbone, "variant": variant, "seed": seed, "extra": extra,
            "test": report["test"], "valid": report["valid"], "mostpop": report["mostpop"],
            "train": report["train"], "esim": report.get("esim"),
            "wall_seconds": time.perf_counter() - started}


def stat(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        out.setdefault(row["backbone"], {}).setdefault(row["variant"], []).append(row)
    summary: dict = {}
    for backbone, variants in out.items():
        for variant, runs in variants.items():
            llm = [r["esim"]["llm"] for r in runs if r.get("esim")]
            summary.setdefault(backbone, {})[variant] = {
                "seeds": sorted(r["seed"] for r in runs),
                "test": {m: stat([r["test"][m] for r in runs]) for m in METRICS},
                "valid_recall@50": stat([r["valid"]["recall@50"] for r in runs]),
                "train_seconds": stat([r["train"]["seconds"] for r in runs]),
                "llm_seconds": stat([x["seconds"] for x in llm]) if llm else None,
                "llm_calls": int(sum(x["calls"] for x in llm)) if llm else None,
                "llm_cached": int(sum(x["cached"] for x in llm)) if llm else None,
                "labelled_rate": stat([x["valid_rate"] for x in llm]) if llm else None,
                "source": llm[0]["source"] if llm else None,
            }
    return summary


def table(summary: dict) -> str:
    head = ("| backbone | variant | " + " | ".join(METRICS)
            + " | LLM s/run | LLM calls (all seeds) | labelled |")
    lines = [head, "|" + "---|" * (len(METRICS) + 5)]
    for backbone, variants in summary.items():
        for variant, s in variants.items():
            cells = [f"{s['test'][m]['mean']:.4f} ± {s['test'][m]['std']:.4f}" for m in METRICS]
            llm_s = f"{s['llm_seconds']['mean']:.0f}" if s["llm_seconds"] else "-"
            calls = (f"{s['llm_calls']} (+{s['llm_cached']} cached)"
                     if s["llm_calls"] is not None else "-")
            rate = f"{s['labelled_rate']['mean']:.0%}" if s["labelled_rate"] else "-"
            lines.append(f"| {backbone} | {variant} (n={len(s['seeds'])}) | "
                         + " | ".join(cells) + f" | {llm_s} | {calls} | {rate} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="esim_ablation", help="results file name")
    parser.add_argument("extra", nargs="*", help="extra trainer arguments, after --")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"{args.tag}.jsonl"
    rows = [json.loads(line) for line in log_path.read_text().splitlines()] \
        if log_path.exists() else []
    done = {(r["backbone"], r["variant"], r["seed"], tuple(r["extra"])) for r in rows}
    # Seed-major, so that an interrupted run already has every cell for the first seeds.
    for seed in range(args.seeds):
        for backbone in args.backbones:
            for variant in args.variants:
                if (backbone, variant, seed, tuple(args.extra)) in done:
                    continue
                row = run_one(backbone, variant, seed, args.extra, args.out)
                rows.append(row)
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                llm = (row["esim"] or {}).get("llm") or {}
                print(f"{backbone} {variant} seed {seed}: test recall@50 "
                      f"{row['test']['recall@50']:.4f}, valid {row['valid']['recall@50']:.4f}, "
                      f"train {row['train']['seconds']:.0f}s, LLM {llm.get('seconds', 0):.0f}s "
                      f"{llm.get('calls', 0)} calls", file=sys.stderr, flush=True)
    rows = [r for r in rows if tuple(r["extra"]) == tuple(args.extra)]
    summary = summarise(rows)
    (args.out / f"{args.tag}.md").write_text(table(summary) + "\n")
    print(json.dumps({"extra": args.extra, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
