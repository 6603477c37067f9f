"""Compare models with user-level 10-fold cross-validation: paired per user
(docs/architecture.md, "Evaluation protocol").

Every variant is trained once per fold and training seed (`python -m trainer train --folds N
--fold F --seed S`: test on fold F, validate on F + 1, train on the rest; `--seeds S` gives
seeds 0..S-1), two processes at a time on this machine; every user is tested exactly once per
seed. For each pair of variants (MostPop included) it prints the mean per-user difference of
Recall@20, Recall@50 and NDCG@50 with a bootstrap 95% interval that resamples, in every fold,
the training runs (seeds) and the users, and in how many folds the first was better. Runs
already done are reused (per_user.json in their run directory), so an interrupted benchmark
resumes.

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

from trainer.training.rows_eval import ROW_MEASURES

METRICS = ("recall@20", "recall@50", "ndcg@50")
# Interest measures per user (trainer/training/interests.py), in per_user.json's "interests".
DISTINCTNESS = ("interest_cosine", "effective_interests", "distinct_items@50", "head_overlap",
                "served_interests@20", "category_coverage@50", "intra_list_diversity@50",
                "interest_purity@50", "topics_covered")
# Recall@50 on subsets of a user's targets (NaN where the user has none): outside and inside
# the dominant model-free interest, and rarely seen items (at most 5 training interactions).
TARGET_SUBSETS = ("minority_recall@50", "dominant_recall@50", "tail_recall@50")
# Interest rows (trainer/training/rows_eval.py): the rows' union against the list at the same
# size, and what the page shows (rows per user, two or more names, coherence, planted topics).
ROWS = ROW_MEASURES
ROWS_PAIRED = {"recall": ("rows_recall", "list_recall_at_rows"),
               "minority_recall": ("rows_minority_recall", "list_minority_recall_at_rows")}
DISPERSION = "history_dispersion"
MOSTPOP = "mostpop"


def run_dir_of(out: Path, name: str, seed: int, fold: int, seeds: int) -> Path:
    """out/NAME/fold-F, or out/NAME/seed-S/fold-F with several training seeds."""
    return out / name / (f"seed-{seed}" if seeds > 1 else "") / f"fold-{fold}"


def run_fold(name: str, args: list[str], fold: int, folds: int, dataset: str, out: Path,
             threads: int, seed: int = 0, seeds: int = 1) -> Path:
    run_dir = run_dir_of(out, name, seed, fold, seeds)
    result = run_dir / "per_user.json"
    if result.is_file():
        return result
    cmd = [sys.executable, "-m", "trainer", "train", "--dataset", dataset, "--folds", str(folds),
           "--fold", str(fold), "--run-dir", str(run_dir), "--threads", str(threads),
           "--no-progress", *args, *(["--seed", str(seed)] if seeds > 1 else [])]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name} seed {seed} fold {fold}: test recall@50 {report['test']['recall@50']:.4f} "
          f"(MostPop {report['mostpop']['recall@50']:.4f}), {report['train']['seconds']:.0f}s "
          f"train, {time.perf_counter() - started:.0f}s in all", file=sys.stderr)
    return result


def load(results: dict[str, list[Path]] | dict[str, list[list[Path]]]
         ) -> tuple[list[str], np.ndarray, dict]:
    """Users (all folds, in fold order), their fold, and metric arrays per variant: [U] with
    one seed (a list of per-fold paths), [S, U] with several (a list per seed). MostPop does
    not depend on the training seed: [U]."""
    users: list[str] = []
    fold_of: list[int] = []
    values: dict[str, dict[str, list[list[float]]]] = {}
    first = next(iter(results))
    nested = isinstance(results[first][0], list)
    for name, runs in results.items():
        per_seed = runs if nested else [runs]
        for s, paths in enumerate(per_seed):
            for fold, path in enumerate(paths):
                data = json.loads(path.read_text())
                if name == first and s == 0:
                    users += data["users"]
                    fold_of += [fold] * len(data["users"])
                    for metric in METRICS:
                        values.setdefault(MOSTPOP, {}).setdefault(metric, [[]])[0].extend(
                            data["mostpop"][metric])
                measures = {**data["model"], **data.get("interests", {})}
                for metric in (*METRICS, *DISTINCTNESS, *TARGET_SUBSETS, DISPERSION, *ROWS):
                    if metric not in measures:
                        continue
                    rows = values.setdefault(name, {}).setdefault(metric, [])
                    while len(rows) <= s:
                        rows.append([])
                    rows[s].extend(np.nan if v is None else v for v in measures[metric])
    arrays = {name: {m: (np.asarray(v) if nested and name != MOSTPOP else np.asarray(v[0]))
                     for m, v in metrics.items()} for name, metrics in values.items()}
    for name, metrics in arrays.items():
        if any(v.shape[-1] != len(users) for v in metrics.values()):
            raise SystemExit(f"{name}: per-user results do not cover the same users")
    return users, np.asarray(fold_of), arrays


def bootstrap_interval(diff: np.ndarray, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of paired per-user differences."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def runs_and_users_interval(diff: np.ndarray, folds: np.ndarray, resamples: int = 10_000,
                            seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean paired difference diff [S, U] (S training seeds),
    resampling both levels: in every fold, its S runs (seeds) and its users, with
    replacement. With S = 1 it is a user bootstrap stratified by fold."""
    rng = np.random.default_rng(seed)
    n_seeds, n_users = diff.shape
    totals = np.zeros(resamples)
    for fold in np.unique(folds):
        block = diff[:, folds == fold]  # [S, n_f]
        seeds = rng.integers(0, n_seeds, (resamples, n_seeds))
        users = rng.integers(0, block.shape[1], (resamples, block.shape[1]))
        totals += block[seeds[:, :, None], users[:, None, :]].sum(axis=(1, 2))
    low, high = np.percentile(totals / (n_seeds * n_users), [2.5, 97.5])
    return float(low), float(high)


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], folds: np.ndarray,
            metrics: tuple[str, ...] = METRICS) -> dict:
    """A - B per user (per seed and user with several seeds; MostPop is seed-free and
    broadcasts): the mean, an interval that resamples runs and users, and fold wins. Users
    without a value (NaN: no minority target) are left out of that metric."""
    out = {}
    for metric in metrics:
        if metric not in a or metric not in b:
            continue
        diff = np.atleast_2d(a[metric]) - np.atleast_2d(b[metric])  # [S, U]
        has = ~np.isnan(diff).any(axis=0)
        diff, folds_of = diff[:, has], folds[has]
        low, high = runs_and_users_interval(diff, folds_of)
        per_fold = [float(diff[:, folds_of == f].mean()) for f in np.unique(folds_of)]
        out[metric] = {"mean_difference": float(diff.mean()), "interval_95": [low, high],
                       "excludes_zero": bool(low > 0 or high < 0),
                       "wins": int(sum(d > 0 for d in per_fold)), "folds": len(per_fold),
                       "seeds": int(diff.shape[0]), "users": int(has.sum())}
    return out


def interest_summary(arrays: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per variant: the mean of every interest measure, and Recall@50 by tercile of how
    dispersed the user's history is over the model-free item clusters (the terciles are the
    users', the same for every variant)."""
    dispersion = next((v[DISPERSION] for v in arrays.values() if DISPERSION in v), None)
    edges = None
    if dispersion is not None:
        flat = np.atleast_2d(dispersion)[0]
        edges = np.quantile(flat, [1 / 3, 2 / 3])
        tercile = np.digitize(flat, edges)
    out = {}
    for name, values in arrays.items():
        row = {m: float(np.nanmean(values[m])) for m in (*DISTINCTNESS, *TARGET_SUBSETS, *ROWS)
               if m in values}
        if edges is not None:
            recall = np.atleast_2d(values["recall@50"])
            for t, label in enumerate(("low", "mid", "high")):
                row[f"recall@50_dispersion_{label}"] = float(recall[:, tercile == t].mean())
        if row:
            out[name] = row
    return out


def rows_vs_list(arrays: dict[str, dict[str, np.ndarray]], folds: np.ndarray) -> dict:
    """Per variant whose runs measured rows: the rows' recall minus the list's at the same
    per-user size, overall and on minority-interest targets, paired per user (and run)."""
    out = {}
    for name, values in arrays.items():
        if all(a in values and b in values for a, b in ROWS_PAIRED.values()):
            out[name] = compare({k: values[a] for k, (a, _) in ROWS_PAIRED.items()},
                                {k: values[b] for k, (_, b) in ROWS_PAIRED.items()}, folds,
                                tuple(ROWS_PAIRED))
    return out


def training_time(paths: list[Path]) -> dict[str, float] | None:
    """Training time of a variant's runs (metrics.json beside per_user.json), means over the
    runs: wall seconds, steps, seconds per step, the step of the best evaluation, the steps
    spent after it, and the 1-minute load average at the start and end. These runs share the
    machine (`--jobs`), so they are slower than one run alone: compare variants of one run."""
    rows = []
    for path in paths:
        metrics = path.parent / "metrics.json"
        if metrics.is_file():
            rows.append(json.loads(metrics.read_text())["train"])
    if not rows:
        return None

    def mean(key: str) -> float | None:
        values = [row[key] for row in rows if row.get(key) is not None]
        return float(np.mean(values)) if values else None

    loads = [row["load_average"][when][0] for row in rows if row.get("load_average")
             for when in ("start", "end")]
    return {"runs": len(rows), "seconds": mean("seconds"),
            "seconds_min": float(min(r["seconds"] for r in rows)),
            "seconds_max": float(max(r["seconds"] for r in rows)),
            "steps": mean("steps"), "seconds_per_step": mean("seconds_per_step"),
            "best_step": mean("best_step"), "steps_after_best": mean("steps_after_best"),
            "load_1min": float(np.mean(loads)) if loads else None}


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

    def cell(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    interests = summary.get("interests") or {}
    columns = sorted({c for row in interests.values() for c in row},
                     key=lambda c: (c not in DISTINCTNESS, c))
    if columns:
        lines += ["", "| variant | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        lines += [f"| {name} | " + " | ".join(cell(row.get(c), ".4f") for c in columns) + " |"
                  for name, row in interests.items()]
    for pair, result in (summary.get("minority_pairs") or {}).items():
        cells = [f"{m} {r['mean_difference']:+.4f} [{r['interval_95'][0]:+.4f}, "
                 f"{r['interval_95'][1]:+.4f}] {r['wins']}/{r['folds']} ({r['users']} users)"
                 for m, r in result.items()]
        if cells:
            lines.append(f"\n{pair}: " + "; ".join(cells))
    for name, result in (summary.get("rows_vs_list") or {}).items():
        cells = [f"{m} {r['mean_difference']:+.4f} [{r['interval_95'][0]:+.4f}, "
                 f"{r['interval_95'][1]:+.4f}] {r['wins']}/{r['folds']}"
                 for m, r in result.items()]
        lines.append(f"\n{name}, rows minus the list at the same size: " + "; ".join(cells))
    lines += ["", "| variant | train s (min-max) | steps | s/step | best step | after best | "
              "load 1m |", "|---|---|---|---|---|---|---|"]
    for name, t in summary["train_time"].items():
        if t is None:
            continue
        lines.append(f"| {name} | {t['seconds']:.1f} ({t['seconds_min']:.0f}-"
                     f"{t['seconds_max']:.0f}) | {cell(t['steps'], '.0f')} | "
                     f"{cell(t['seconds_per_step'], '.3f')} | {cell(t['best_step'], '.0f')} | "
                     f"{cell(t['steps_after_best'], '.0f')} | {cell(t['load_1min'], '.2f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=ARGS",
                        help="a name and the trainer arguments of one variant (repeatable)")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--first-folds", type=int, default=None, metavar="M",
                        help="train and compare on folds 0..M-1 of the N-fold split only (a "
                             "screen: those folds' users); default all N")
    parser.add_argument("--seeds", type=int, default=1,
                        help="training seeds per fold (0..N-1); intervals then resample runs "
                             "as well as users")
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
    used = range(args.folds if args.first_folds is None else min(args.first_folds, args.folds))
    jobs = [(name, seed, fold) for seed in range(args.seeds) for fold in used
            for name in variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(jobs, pool.map(
            lambda job: run_fold(job[0], variants[job[0]], job[2], args.folds, args.dataset,
                                 args.out, args.threads, job[1], args.seeds), jobs),
            strict=True))
    per_seed = {name: [[done[(name, s, f)] for f in used]
                       for s in range(args.seeds)] for name in variants}
    results = per_seed if args.seeds > 1 else {n: runs[0] for n, runs in per_seed.items()}
    users, folds, arrays = load(results)
    summary = {
        "dataset": args.dataset, "folds": args.folds, "folds_used": len(used),
        "seeds": args.seeds, "users": len(users),
        "variants": {name: shlex.join(a) for name, a in variants.items()},
        "means": {name: {m: float(v[m].mean()) for m in METRICS} for name, v in arrays.items()},
        "train_time": {name: training_time([p for runs in per_seed[name] for p in runs])
                       for name in variants},
        "pairs": {f"{a} vs {b}": compare(arrays[a], arrays[b], folds)
                  for a, b in itertools.combinations(arrays, 2)},
        "interests": interest_summary(arrays),
        "minority_pairs": {f"{a} vs {b}": compare(arrays[a], arrays[b], folds, TARGET_SUBSETS)
                           for a, b in itertools.combinations(arrays, 2)},
        "rows_vs_list": rows_vs_list(arrays, folds),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(markdown(summary) + "\n")
    print(markdown(summary), file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
