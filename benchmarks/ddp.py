"""One process vs data-parallel training (torchrun, gloo on CPU): paired quality per user and
the loss / validation curves, on folds of the user-level 10-fold protocol
(docs/architecture.md, "Evaluation protocol").

For every fold it trains, one after the other (never side by side, so each has the machine):

* `one`: `python -m trainer train --threads T` (T = --threads-one, 2 on a 2-core machine);
* `ddp<N>`: `torchrun --standalone --nproc-per-node N -m trainer train --threads 1`
  (OMP_NUM_THREADS=1: the N processes use N cores);
* with --seed-control, `one-seed1`: one process with another seed and one thread, the
  seed-noise yardstick (a data-parallel run draws other negatives and dropout masks than
  `one`, so it can differ from it by this much without training any worse) and the step time
  of one process that does not share its cores between threads.

Same hyper-parameters for all (global batch 128). Then benchmarks/folds.py's paired
comparison (mean per-user difference, bootstrap 95% interval, folds won) of Recall@20/50 and
NDCG@50, per fold and pooled, the wall time of each run with the load average around it,
and curves.png / curves.json (training loss and validation Recall@50 against the step).
Runs already done are reused, so an interrupted benchmark resumes.

    python benchmarks/ddp.py --fold-ids 0,1,2 --out benchmarks/results/ddp
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from folds import METRICS, compare, load, markdown  # benchmarks/folds.py, beside this file


def run(name: str, cmd: list[str], threads: int, run_dir: Path) -> dict:
    """Train once (unless done) and return its report with the wall time and load."""
    bench = run_dir / "bench.json"
    if bench.is_file() and (run_dir / "per_user.json").is_file():
        return json.loads(bench.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {"name": name, "command": shlex.join(cmd), "wall_seconds": round(wall, 1),
              "train_seconds": report["train"]["seconds"], "steps": report["train"]["steps"],
              "best_step": report["train"]["best_step"],
              "stopped_by": report["train"]["stopped_by"],
              "world_size": report["train"].get("world_size", 1),
              "test": report["test"], "valid": report["valid"],
              "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()]}
    bench.write_text(json.dumps(result, indent=1))
    print(f"{name} {run_dir.name}: test recall@50 {report['test']['recall@50']:.4f}, "
          f"{result['steps']} steps ({result['stopped_by']}), {wall:.0f}s wall, load "
          f"{result['load_before'][0]} -> {result['load_after'][0]}", file=sys.stderr)
    return result


def commands(args: argparse.Namespace, fold: int) -> dict[str, tuple[list[str], int, Path]]:
    """Variant -> (command, threads per process, run directory) for one fold."""
    common = ["train", "--dataset", args.dataset, "--folds", str(args.folds), "--fold",
              str(fold), "--no-progress", *shlex.split(args.trainer_args)]
    out = {}

    def add(name: str, prefix: list[str], threads: int, extra: list[str]) -> None:
        run_dir = args.out / name / f"fold-{fold}"
        out[name] = ([*prefix, *common, "--threads", str(threads), "--run-dir", str(run_dir),
                      *extra], threads, run_dir)

    add("one", [sys.executable, "-m", "trainer"], args.threads_one, [])
    if args.seed_control:
        add("one-seed1", [sys.executable, "-m", "trainer"], 1, ["--seed", "1"])
    add(f"ddp{args.nproc}", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", str(args.nproc), "-m", "trainer"], 1, [])
    return out  # "one" first: the pairs compare later variants with earlier ones


def plot_curves(curves: dict[str, dict[str, list[dict]]], path: Path) -> bool:
    """Training loss and validation Recall@50 against the step, one column per fold."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    folds = sorted({fold for runs in curves.values() for fold in runs})
    fig, axes = plt.subplots(2, len(folds), figsize=(4.5 * len(folds), 7), squeeze=False)
    for col, fold in enumerate(folds):
        for name, runs in curves.items():
            points = runs.get(fold, [])
            steps = [p["step"] for p in points]
            axes[0][col].plot(steps, [p["loss"] for p in points], label=name)
            axes[1][col].plot(steps, [p["recall@50"] for p in points], label=name)
        axes[0][col].set_title(f"{fold}: training loss (EMA, global batch)")
        axes[1][col].set_title(f"{fold}: validation Recall@50")
        axes[1][col].set_xlabel("optimiser step (global batch)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--fold-ids", default="0,1,2", help="which folds to run")
    parser.add_argument("--dataset", default="movielens-small")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the torchrun runs")
    parser.add_argument("--threads-one", type=int, default=2,
                        help="torch threads of the one-process runs")
    parser.add_argument("--seed-control", action="store_true",
                        help="also one process with --seed 1 (the seed-noise yardstick)")
    parser.add_argument("--trainer-args", default="", help="extra `trainer train` arguments")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ddp"))
    args = parser.parse_args()
    fold_ids = [int(f) for f in args.fold_ids.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, dict[int, dict]] = {}
    paths: dict[str, list[Path]] = {}
    for fold in fold_ids:  # variants alternate, so they meet the same machine load
        for name, (cmd, threads, run_dir) in commands(args, fold).items():
            runs.setdefault(name, {})[fold] = run(name, cmd, threads, run_dir)
            paths.setdefault(name, []).append(run_dir / "per_user.json")

    users, fold_of, arrays = load(paths)  # fold_of indexes fold_ids
    names = list(paths)
    pairs = {f"{b} vs {a}": compare(arrays[b], arrays[a], fold_of)
             for a, b in itertools.combinations(names, 2)}
    per_fold = {
        f"fold-{fold}": {
            "users": int((fold_of == i).sum()),
            **{name: {m: float(arrays[name][m][fold_of == i].mean()) for m in METRICS}
               for name in names},
            "differences": {f"{b} - {a}": {
                m: float((arrays[b][m] - arrays[a][m])[fold_of == i].mean())
                for m in METRICS} for a, b in itertools.combinations(names, 2)},
            "runs": {name: {k: runs[name][fold][k] for k in (
                "wall_seconds", "train_seconds", "steps", "best_step", "stopped_by",
                "world_size", "load_before", "load_after")} for name in names},
        } for i, fold in enumerate(fold_ids)}
    summary = {
        "dataset": args.dataset, "folds": args.folds, "fold_ids": fold_ids,
        "users": len(users), "variants": {n: runs[n][fold_ids[0]]["command"] for n in names},
        "means": {name: {m: float(v.mean()) for m, v in arrays[name].items()}
                  for name in names + ["mostpop"]},
        "pairs": pairs, "per_fold": per_fold,
        "wall_seconds": {name: float(np.mean([r["wall_seconds"] for r in runs[name].values()]))
                         for name in names},
        # Runs stop at different steps (early stopping): compare the time per step.
        "train_seconds_per_step": {name: float(np.mean(
            [r["train_seconds"] / r["steps"] for r in runs[name].values()])) for name in names},
    }
    curves = {name: {f"fold-{fold}": json.loads(
        (args.out / name / f"fold-{fold}" / "curve.json").read_text()) for fold in fold_ids}
        for name in names}
    (args.out / "curves.json").write_text(json.dumps(
        {name: {fold: [{k: p[k] for k in ("step", "loss", "recall@50")} for p in points]
                for fold, points in folds_.items()} for name, folds_ in curves.items()}))
    plotted = plot_curves(curves, args.out / "curves.png")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown({"means": summary["means"], "pairs": pairs})
    (args.out / "summary.md").write_text(table + "\n")
    print(table, file=sys.stderr)
    if plotted:
        print(f"curves: {args.out / 'curves.png'}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
