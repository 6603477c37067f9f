"""The recall-vs-coverage curve of the per-request `diversity` setting (the service's merge,
service/serving/retrieval.py `merge_diverse`), on the test users of trained runs.

For every run directory (with its checkpoint.pt) and every setting, each test user's K
per-interest top-50 lists are merged as the service merges them, and the list is scored:
Recall@20 and @50, the effective number of interests the top 20 is drawn from (exp of the
entropy of their source interests) and how many interests it holds at all. Prints JSON (and a
markdown table on stderr); means over all users of all runs.

    python benchmarks/diversity.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/diversity
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from service.serving.retrieval import merge_diverse
from trainer.config import TrainConfig
from trainer.training.checkpoint import load_checkpoint
from trainer.training.evaluate import exact_search
from trainer.training.interests import search_interests, source_diversity
from trainer.training.metrics import per_user_metrics

SETTINGS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
PER_INTEREST = 50  # the service's default PER_INTEREST_FANOUT
SERVED = 20


def run_curve(run_dir: Path, settings: tuple[float, ...]) -> dict[float, dict[str, np.ndarray]]:
    """Per setting, per user: recall@20/50, served effective interests, interests held."""
    _, dataset, model = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = TrainConfig.from_dict(json.loads((run_dir / "metrics.json").read_text())["config"])
    split = dataset.eval_split("test", cfg.maxlen)
    model.eval()
    with torch.no_grad():
        interests = model(torch.from_numpy(split.histories)).numpy()
        items = model.item_vectors().numpy()
    users, k, _ = interests.shape
    top, rows = search_interests(interests, exact_search(items), PER_INTEREST)
    out = {}
    for setting in settings:
        ranked, effective, held = [], [], []
        for u in range(users):
            ids, _, which = merge_diverse(top[u], rows[u], PER_INTEREST, setting)
            ranked.append(ids + 1)
            effective.append(source_diversity(which[:SERVED], k))
            held.append(len(np.unique(which[:SERVED])))
        metrics = per_user_metrics(ranked, split.targets)
        out[setting] = {"recall@20": metrics["recall@20"], "recall@50": metrics["recall@50"],
                        f"served_interests@{SERVED}": np.asarray(effective),
                        f"interests_held@{SERVED}": np.asarray(held, dtype=float)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--settings", type=float, nargs="+", default=list(SETTINGS))
    parser.add_argument("--out", type=Path, help="write summary.json and summary.md here")
    args = parser.parse_args()
    for run_dir in args.run_dirs:
        if not (run_dir / "checkpoint.pt").is_file():
            parser.error(f"{run_dir}: no checkpoint.pt (a `python -m trainer train` run dir)")
    settings = tuple(args.settings)
    pooled: dict[float, dict[str, list[np.ndarray]]] = {s: {} for s in settings}
    for run_dir in args.run_dirs:
        for setting, values in run_curve(run_dir, settings).items():
            for name, column in values.items():
                pooled[setting].setdefault(name, []).append(column)
    rows = [{"diversity": s, **{name: round(float(np.concatenate(cols).mean()), 4)
                                for name, cols in pooled[s].items()}} for s in settings]
    summary = {"runs": [str(r) for r in args.run_dirs],
               "users": int(sum(len(c) for c in pooled[settings[0]]["recall@50"])),
               "curve": rows}
    names = [n for n in rows[0] if n != "diversity"]
    table = "\n".join(["| diversity | " + " | ".join(names) + " |",
                       "|---|" + "---|" * len(names)]
                      + [f"| {r['diversity']:g} | " + " | ".join(f"{r[n]:.4f}" for n in names)
                         + " |" for r in rows])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        (args.out / "summary.md").write_text(table + "\n")
    print(table, file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
