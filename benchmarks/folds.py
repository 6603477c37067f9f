"""Compare models with user-level 10-fold cross-validation: paired per user
(docs/architecture.md, "Evaluation protocol").

Every variant is trained once per fold (`python -m trainer train --folds N --fold F`: test on
fold F, validate on F + 1, train on the rest), two processes at a time on this machine; every
user is tested exactly once. For each pair of variants (MostPop included) it prints the mean
per-user difference of Recall@20, Recall@50 and NDCG@50 with a bootstrap 95% interval, and in
how many folds the first was better. Runs already done are reused (per_user.json in their run
directory), so an interrupted benchmark resumes.

    python benchmarks/folds.py --variant sa="--backbone comirec-sa" \\
        --variant sasrec="--backbone sasrec" --out benchmarks/results/folds

Tune on validation only: the test metrics this prints are for decisions, once each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

METRICS = ("recall@20", "recall@50", "ndcg@50")
MOSTPOP = "mostpop"


def run_fold(name: str, args: list[str], fold: int, folds: int, dataset: str, out: Path,
             threads: int) -> Path:
    run_dir = out / name / f"fold-{fold}"
    result = run_dir / "per_user.json"
    if result.is_file():
        return result
    cmd = [sys.executable, "-m", "trainer", "train", "--dataset", dataset, "--folds", str(folds),
           "--fold", str(fold), "--run-dir", str(run_dir), "--threads", str(threads),
           "--no-progress", *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name} fold {fold}: test recall@50 {report['test']['recall@50']:.4f} "
          f"(MostPop {report['mostpop']['recall@50']:.4f}), {report['train']['seconds']:.0f}s "
          f"train, {time.perf_counter() - started:.0f}s in all", file=sys.stderr)
    return result


def load(results: dict[str, list[Path]]) -> tuple[list[str], np.ndarray, dict]:
    """Users (all folds, in fold order), their fold, and metric arrays per variant."""
    users: list[str] = []
    fold_of: list[int] = []
    values: dict[str, dict[str, list[float]]] = {}
    first = next(iter(results))
    for name, paths in results.items():
        for fold, path in enumerate(paths):
            data = json.loads(path.read_text())
            if name == first:
                users += data["users"]
                fold_of += [fold] * len(data["users"])
                for metric in METRICS:
                    values.setdefault(MOSTPOP, {}).setdefault(metric, []).extend(
                        data["mostpop"][metric])
            for metric in METRICS:
                values.setdefault(name, {}).setdefault(metric, []).extend(data["model"][metric])
    arrays = {name: {m: np.asarray(v) for m, v in metrics.items()}
              for name, metrics in values.items()}
    for name, metrics in arrays.items():
        if any(len(v) != len(users) for v in metrics.values()):
            raise SystemExit(f"{name}: per-user results do not cover the same users")
    return users, np.asarray(fold_of), arrays


def bootstrap_interval(diff: np.ndarray, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of paired per-user differences."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], folds: np.ndarray) -> dict:
    out = {}
    for metric in METRICS:
        diff = a[metric] - b[metric]
        low, high = bootstrap_interval(diff)
        per_fold = [float(diff[folds == f].mean()) for f in np.unique(folds)]
        out[metric] = {"mean_difference": float(diff.mean()), "interval_95": [low, high],
                       "excludes_zero": bool(low > 0 or high < 0),
                       "wins": int(sum(d > 0 for d in per_fold)), "folds": len(per_fold)}
    return out


def training_seconds(paths: list[Path]) -> dict[str, float] | None:
    """Training time of a variant's runs (metrics.json beside per_user.json): these runs
    share the machine (`--jobs`), so they are slower than one run alone."""
    seconds = []
    for path in paths:
        metrics = path.parent / "metrics.json"
        if metrics.is_file():
            seconds.append(json.loads(metrics.read_text())["train"]["seconds"])
    if not seconds:
        return None
    return {"mean": float(np.mean(seconds)), "min": float(min(seconds)),
            "max": float(max(seconds))}


def markdown(summary: dict) -> str:
    lines = ["| variant | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, means in summary["means"].items():
        lines.append(f"| {name} | " + " | ".join(f"{means[m]:.4f}" for m in METRICS) + " |")
    lines += ["", "| A vs B | " + " | ".join(f"{m} diff [95% CI] wins" for m in METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for pair, result in summary["pairs"].items():
        cells = [f"{r['mean_difference']:+.4f} [{r['interval_95'][0]:+.4f}, "
                 f"{r['interval_95'][1]:+.4f}] {r['wins']}/{r['folds']}"
                 for r in (result[m] for m in METRICS)]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=ARGS",
                        help="a name and the trainer arguments of one variant (repeatable)")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--dataset", default="movielens-small")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/folds"))
    args = parser.parse_args()

    variants = {}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        if not name or name == MOSTPOP or name in variants:
            parser.error(f"--variant {spec!r}: give a new NAME=ARGS ({MOSTPOP!r} is built in)")
        variants[name] = shlex.split(rest)
    jobs = [(name, fold) for name in variants for fold in range(args.folds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(jobs, pool.map(
            lambda job: run_fold(job[0], variants[job[0]], job[1], args.folds, args.dataset,
                                 args.out, args.threads), jobs), strict=True))
    results = {name: [done[(name, f)] for f in range(args.folds)] for name in variants}
    users, folds, arrays = load(results)
    summary = {
        "dataset": args.dataset, "folds": args.folds, "users": len(users),
        "variants": {name: shlex.join(a) for name, a in variants.items()},
        "means": {name: {m: float(v[m].mean()) for m in METRICS} for name, v in arrays.items()},
        "train_seconds": {name: training_seconds(paths) for name, paths in results.items()},
        "pairs": {f"{a} vs {b}": compare(arrays[a], arrays[b], folds)
                  for a, b in itertools.combinations(arrays, 2)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(markdown(summary) + "\n")
    print(markdown(summary), file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
