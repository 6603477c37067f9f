"""Interest rows: which policy chooses them (service/serving/rows.py), and how they compare with
the list at the same size, on the very same trained models (training noise does not enter
a policy comparison).

Each run of a `benchmarks/folds.py` output (RUNS/NAME[/seed-S]/fold-F/checkpoint.pt) is
re-evaluated on its validation users (`--split valid`: tune here) or its test users (`--split
test`: once per decision) under every policy given: rows' recall (the union of the rows'
items) against the list's Recall at the same per-user size, overall and on minority-interest
targets, rows per user, the share with two or more differently named rows, coherence, and on
planted-topic data the planted topics the rows recover (trainer/training/rows_eval.py). Paired
intervals resample runs (seeds) and users within each fold, as folds.py's do.

    python benchmarks/rows.py --runs /work/runs/ml-3x10/default --split valid \\
        --policy mass="" --policy history="history_weight=1" \\
        --policy blend="history_weight=0.5" --out benchmarks/results/rows/policy-valid
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from folds import compare, rows_vs_list  # noqa: E402

from service.serving.row_policy import RowPolicy
from trainer.training.checkpoint import load_checkpoint
from trainer.training.evaluate import encode_all
from trainer.training.interests import item_clusters
from trainer.training.loop import encode_numpy
from trainer.training.rows_eval import MEASURED_ROWS, ROW_MEASURES, row_measures


def parse_policy(text: str) -> RowPolicy:
    """'history_weight=0.5,min_size=none' -> RowPolicy (the measured default otherwise)."""
    kinds = {f.name: f.type for f in fields(RowPolicy)}
    values: dict[str, float | int | None] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in kinds:
            raise SystemExit(f"--policy: unknown key {key!r}; keys: {', '.join(kinds)}")
        kind = str(kinds[key])
        values[key] = (None if value.lower() == "none" and "None" in kind
                       else int(value) if kind.startswith("int") else float(value))
    return replace(MEASURED_ROWS, **values)


def run_dirs(root: Path) -> list[list[Path]]:
    """[seed][fold] run directories under a folds.py variant directory."""
    seeds = sorted(root.glob("seed-*"), key=lambda p: int(p.name.split("-")[1])) or [root]
    return [sorted((d for d in s.glob("fold-*") if (d / "checkpoint.pt").is_file()),
                   key=lambda p: int(p.name.split("-")[1])) for s in seeds]


def measure_run(run: Path, split_name: str, policies: dict[str, RowPolicy]
                ) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    _, dataset, model = load_checkpoint(run / "checkpoint.pt")
    split = dataset.eval_split(split_name, model.maxlen)
    with torch.no_grad():
        items = model.item_vectors().numpy()
    interests = encode_all(encode_numpy(model), split.histories)
    clusters = item_clusters(dataset.flat, dataset.offsets, dataset.train_users,
                             dataset.n_items)
    users = dataset.user_ids[split.users].astype(str).tolist()
    return users, {name: row_measures(dataset, split, interests, items, clusters, policy)
                   for name, policy in policies.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True,
                        help="a folds.py variant directory (seed-S/fold-F/checkpoint.pt)")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--policy", action="append", required=True, metavar="NAME=K=V,...")
    parser.add_argument("--out", type=Path, help="write summary.json and summary.md here")
    args = parser.parse_args()
    policies = {}
    for spec in args.policy:
        name, _, rest = spec.partition("=")
        policies[name] = parse_policy(rest.strip("\"'"))
    grid = run_dirs(args.runs)
    if not grid or not grid[0]:
        parser.error(f"{args.runs}: no fold-F/checkpoint.pt runs")
    # values[policy][measure]: [S, U], users in fold order (the same for every seed).
    values: dict[str, dict[str, list[list[float]]]] = {n: {} for n in policies}
    users: list[str] = []
    fold_of: list[int] = []
    for s, folds in enumerate(grid):
        for run in folds:
            fold = int(run.name.split("-")[1])
            names, measured = measure_run(run, args.split, policies)
            if s == 0:
                users += names
                fold_of += [fold] * len(names)
            for policy, columns in measured.items():
                for measure, column in columns.items():
                    rows = values[policy].setdefault(measure, [])
                    while len(rows) <= s:
                        rows.append([])
                    rows[s].extend(column.tolist())
            print(f"{run}: {len(names)} {args.split} users", file=sys.stderr)
    folds_arr = np.asarray(fold_of)
    arrays = {p: {m: np.asarray(v) for m, v in ms.items()} for p, ms in values.items()}
    summary: dict = {"runs": str(args.runs), "split": args.split, "seeds": len(grid),
                     "folds": len(grid[0]), "users": len(users),
                     "policies": {n: vars(p) for n, p in policies.items()},
                     "means": {p: {m: float(np.nanmean(v)) for m, v in ms.items()}
                               for p, ms in arrays.items()},
                     "pairs": {}}
    summary["rows_vs_list"] = rows_vs_list(arrays, folds_arr)
    for x, y in itertools.combinations(arrays, 2):
        summary["pairs"][f"{x} vs {y}"] = compare(arrays[x], arrays[y], folds_arr,
                                                  ("rows_recall", "rows_minority_recall"))
    table = markdown(summary)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        (args.out / "summary.md").write_text(table + "\n")
    print(table, file=sys.stderr)
    print(json.dumps(summary))


def markdown(summary: dict) -> str:
    shown = [m for m in ROW_MEASURES if any(m in v for v in summary["means"].values())]
    lines = [f"{summary['split']} users: {summary['users']}, {summary['seeds']} seeds x "
             f"{summary['folds']} folds", "",
             "| policy | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for name, means in summary["means"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{means[m]:.4f}" if m in means else "n/a" for m in shown) + " |")

    def cell(r: dict) -> str:
        return (f"{r['mean_difference']:+.4f} [{r['interval_95'][0]:+.4f}, "
                f"{r['interval_95'][1]:+.4f}] {r['wins']}/{r['folds']}")

    lines += ["", "| rows minus the list at the same size | recall | minority recall |",
              "|---|---|---|"]
    for name, result in summary["rows_vs_list"].items():
        lines.append(f"| {name} | {cell(result['recall'])} | "
                     f"{cell(result['minority_recall'])} |")
    if summary["pairs"]:
        lines += ["", "| A vs B | rows recall | rows minority recall |", "|---|---|---|"]
        for pair, result in summary["pairs"].items():
            lines.append(f"| {pair} | {cell(result['rows_recall'])} | "
                         f"{cell(result['rows_minority_recall'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
