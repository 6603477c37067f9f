"""Adaptive interests at serving (ADAPTIVE_INTERESTS): does dropping the interests no history
item supports, merging near-duplicates and sharing the list by support change Recall/NDCG?

Paired on the very same trained models, so training noise does not enter: each fold's
checkpoint from benchmarks/folds.py, its test users ranked by the served rule (K lists merged
by score) and by the adaptive rule at each merge cosine (service/serving/retrieval.py, the code the
service runs). Prints the folds.py table (means, paired differences with bootstrap intervals,
wins out of the folds) and a JSON summary with how many interests survive per user.

    python benchmarks/adaptive.py --runs benchmarks/results/folds/tsa \\
        --cosine 0.9 --cosine 0.8 --out benchmarks/results/adaptive
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from folds import METRICS, compare, markdown  # noqa: E402

from service.serving.retrieval import (
    adapt_interests,
    interest_support,
    merge_by_share,
    merge_interest_results,
)
from trainer.training.checkpoint import load_checkpoint
from trainer.training.evaluate import encode_all, exact_search
from trainer.training.loop import encode_numpy
from trainer.training.metrics import per_user_metrics

SERVED = "by-score"
CUTOFF = 50


def rank_fold(checkpoint: Path, cosines: list[float]) -> tuple[dict, dict]:
    """Per-user metrics of one fold's test users under each rule, and survival statistics."""
    ckpt, dataset, model = load_checkpoint(checkpoint)
    split = dataset.eval_split("test", model.maxlen)
    with torch.no_grad():
        items = model.item_vectors().numpy()
    interests = encode_all(encode_numpy(model), split.histories)  # [U, K, d]
    users, k, d = interests.shape
    scores, rows = exact_search(items)(interests.reshape(-1, d), CUTOFF)
    scores, rows = scores.reshape(users, k, CUTOFF), rows.reshape(users, k, CUTOFF)
    lists: dict[str, list[np.ndarray]] = {SERVED: []}
    kept: dict[str, list[int]] = {}
    for u in range(users):
        lists[SERVED].append(merge_interest_results(scores[u], rows[u], CUTOFF)[0] + 1)
        history = split.histories[u][split.histories[u] > 0]
        support = interest_support(interests[u], items[history - 1])
        for cosine in cosines:
            name = f"adaptive-{cosine:g}"
            weights, _ = adapt_interests(interests[u], support, cosine)
            ranked = merge_by_share(scores[u], rows[u], CUTOFF, weights)[0] + 1
            lists.setdefault(name, []).append(ranked)
            kept.setdefault(name, []).append(int((weights > 0).sum()))
    metrics = {name: per_user_metrics(ranked, split.targets) for name, ranked in lists.items()}
    return metrics, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True,
                        help="a variant's folder of benchmarks/folds.py (fold-*/checkpoint.pt)")
    parser.add_argument("--cosine", type=float, action="append", required=True,
                        help="merge cosine of the adaptive rule (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptive"))
    args = parser.parse_args()
    checkpoints = sorted(args.runs.glob("fold-*/checkpoint.pt"),
                         key=lambda p: int(p.parent.name.split("-")[1]))
    if not checkpoints:
        raise SystemExit(f"{args.runs}: no fold-*/checkpoint.pt (run benchmarks/folds.py)")
    values: dict[str, dict[str, list[float]]] = {}
    fold_of: list[int] = []
    kept_all: dict[str, list[int]] = {}
    for fold, checkpoint in enumerate(checkpoints):
        metrics, kept = rank_fold(checkpoint, args.cosine)
        for name, per_user in metrics.items():
            for metric in METRICS:
                values.setdefault(name, {}).setdefault(metric, []).extend(per_user[metric])
        fold_of += [fold] * len(next(iter(metrics.values()))[METRICS[0]])
        for name, counts in kept.items():
            kept_all.setdefault(name, []).extend(counts)
        print(f"fold {fold}: {checkpoint}", file=sys.stderr)
    arrays = {name: {m: np.asarray(v) for m, v in ms.items()} for name, ms in values.items()}
    folds = np.asarray(fold_of)
    summary = {
        "runs": str(args.runs), "users": len(folds), "folds": len(checkpoints),
        "means": {name: {m: float(v.mean()) for m, v in ms.items()} for name, ms in arrays.items()},
        "pairs": {f"{name} vs {SERVED}": compare(arrays[name], arrays[SERVED], folds)
                  for name in arrays if name != SERVED},
        "interests_kept": {name: {"mean": float(np.mean(c)),
                                  "histogram": np.bincount(c).tolist()}
                           for name, c in kept_all.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(markdown(summary), file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
