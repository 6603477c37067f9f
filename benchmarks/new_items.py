"""New items from day one: Recall@50 on targets that are items no training user touched.

Per fold (user-level 10-fold cross-validation, `python -m trainer train --folds 10` splits) a
seeded 10% of the catalogue is held out entirely: all its interactions leave the training
data and the test users' histories, so those items reach the bundle as text-only items
(trainer/semantics/text_only.py), placed by their text. The test users' targets keep them
(the first 80% of a user's full sequence is the history, the rest the targets). Lists of 50
over the whole catalogue (trained items + every text-only item, as published), per user,
on the validation and the test users of the fold:

* `text_only_<length>`: the model, the text-only items placed by their text (what ships),
  for each length of `text_only_vectors` (`--text-only-length`, or `ridge`: the map's own);
  the length is chosen on validation (`choose_length`) and only it is compared on test;
* `no_new_items`: the model over its trained items alone (held-out targets unreachable): the
  overall-recall reference;
* `random_placement_<length>`: the same vectors permuted among the text-only items (is it the
  text, or only the vectors' presence?);
* `content_only`: no model: every item scored by the MiniLM cosine between its text and the
  mean text of the user's history.

    python benchmarks/new_items.py --folds 10 --seeds 1 --out benchmarks/results/new-items
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

# A sibling script (its paired interval over runs and users): run as a script, benchmarks/
# is on the path.
import folds as fold_benchmark
import numpy as np
import pandas as pd
import torch

from trainer.config import TrainConfig
from trainer.data.dataset import build_dataset
from trainer.data.loaders import load_movielens_small
from trainer.semantics.item_text import item_text_features, sentence_features
from trainer.semantics.text_only import text_only_sentences, text_only_vectors
from trainer.training.evaluate import exact_search, retrieve
from trainer.training.loop import train

HELD_SHARE = 0.1
N = 50
# text_only_vectors' lengths (x the rarest trained items' median norm; None: ridge's own)
LENGTHS = (1.0, 0.95, 0.9, 0.85, 0.8, None)
TOLERANCE = 0.005  # overall Recall@50 a catalogue with new items may lose


def label(length: float | None) -> str:
    return "ridge" if length is None else f"{length:g}"


def run_fold(fold: int, folds: int, seed: int, threads: int) -> dict[str, dict]:
    """Per split (valid, test) and variant: each user's overall and new-item Recall@50."""
    raw = load_movielens_small()
    full = build_dataset(raw, folds=folds, fold=fold)
    rng = np.random.default_rng([fold, seed, 23])
    held_ids = set(rng.choice(full.item_ids[1:], int(HELD_SHARE * full.n_items),
                              replace=False).tolist())
    reduced = dataclasses.replace(raw, interactions=raw.interactions[
        ~raw.interactions["item_id"].isin(held_ids)])
    data = build_dataset(reduced, folds=folds, fold=fold)
    for users in ("valid_users", "test_users"):
        if not np.array_equal(full.user_ids[getattr(full, users)],
                              data.user_ids[getattr(data, users)]):
            raise SystemExit("holding items out changed the user split")

    torch.set_num_threads(threads)
    cfg = TrainConfig(folds=folds, fold=fold, seed=seed, threads=threads)
    model = train(data, cfg, progress=False).model.eval()
    with torch.no_grad():
        warm = model.item_vectors().numpy()
    catalogue = np.concatenate([data.item_ids[1:], data.text_only.item_ids]).astype(str)
    row_of = {item: row for row, item in enumerate(catalogue)}
    held_rows = np.array(sorted(row_of[i] for i in held_ids))
    texts = np.concatenate([item_text_features(data)[1:],
                            sentence_features(text_only_sentences(data.text_only))])
    shuffle = np.random.default_rng([fold, seed, 7]).permutation(len(data.text_only))
    searches = {"no_new_items": exact_search(warm)}
    for length in LENGTHS:
        placed = text_only_vectors(data, warm, length)
        searches[f"text_only_{label(length)}"] = exact_search(np.concatenate([warm, placed]))
        searches[f"random_placement_{label(length)}"] = exact_search(
            np.concatenate([warm, placed[shuffle]]))

    out: dict[str, dict] = {"_info": {
        "held_out_items": len(held_ids), "trained_items": len(warm),
        "text_only_items": len(data.text_only)}}
    for split, users in (("valid", full.valid_users), ("test", full.test_users)):
        # History: the first 80% of the full sequence without the held-out items.
        histories, targets = [], []
        for u in users:
            sequence = full.item_ids[full.sequence(u)].astype(str)
            cut = int(len(sequence) * 0.8)
            seen = [row_of[i] + 1 for i in sequence[:cut] if i not in held_ids][-cfg.maxlen:]
            histories.append([0] * (cfg.maxlen - len(seen)) + seen)
            targets.append(np.array([row_of[i] for i in pd.unique(sequence[cut:])]))
        history_rows = np.array(histories, dtype=np.int64)
        with torch.no_grad():
            interests = model(torch.from_numpy(history_rows)).numpy()
        ranked = {name: retrieve(interests, search, N) for name, search in searches.items()}
        profile = np.stack([texts[h[h > 0] - 1].mean(axis=0) for h in history_rows])
        ranked["content_only"] = [np.argsort(-(texts @ p))[:N] + 1 for p in profile]
        out[split] = {"users": full.user_ids[users].astype(str).tolist()}
        for name, lists in ranked.items():
            overall, new = [], []
            for top, wanted in zip(lists, targets, strict=True):
                hit = np.isin(wanted, np.asarray(top) - 1)
                overall.append(float(hit.mean()))
                is_new = np.isin(wanted, held_rows)
                new.append(float(hit[is_new].mean()) if is_new.any() else np.nan)
            out[split][name] = {"recall@50": overall, "new_item_recall@50": new}
        out["_info"][f"held_targets_{split}"] = int(sum(np.isin(t, held_rows).sum()
                                                       for t in targets))
    return out


def choose_length(means: dict[str, dict[str, float]]) -> str:
    """On validation: the length with the best new-item recall among those that keep
    overall Recall@50 within TOLERANCE of the catalogue without new items; else the one with
    the best overall recall."""
    floor = means["no_new_items"]["recall@50"] - TOLERANCE
    rules = [label(length) for length in LENGTHS]
    keeping = [r for r in rules if means[f"text_only_{r}"]["recall@50"] >= floor]
    if keeping:
        return max(keeping, key=lambda r: means[f"text_only_{r}"]["new_item_recall@50"])
    return max(rules, key=lambda r: means[f"text_only_{r}"]["recall@50"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    runs = {}
    for seed in range(args.seeds):
        for fold in range(args.folds):
            path = args.out / f"seed{seed}-fold{fold}.json"
            if not path.is_file():  # resumable
                path.write_text(json.dumps(run_fold(fold, args.folds, seed, args.threads)))
            runs[seed, fold] = json.loads(path.read_text())
            print(f"seed {seed} fold {fold}: done", file=sys.stderr)

    metrics = ("recall@50", "new_item_recall@50")
    variants = [v for v in runs[0, 0]["test"] if v != "users"]

    def arrays(split: str) -> dict[str, dict[str, np.ndarray]]:
        return {v: {m: np.array([np.concatenate([runs[s, f][split][v][m]
                                                 for f in range(args.folds)])
                                 for s in range(args.seeds)], dtype=float) for m in metrics}
                for v in variants}

    def fold_of(split: str) -> np.ndarray:
        return np.concatenate([[f] * len(runs[0, f][split]["users"])
                               for f in range(args.folds)])

    valid, test = arrays("valid"), arrays("test")
    means = {split: {v: {m: float(np.nanmean(a)) for m, a in values.items()}
                     for v, values in data.items()}
             for split, data in (("valid", valid), ("test", test))}
    rule = choose_length(means["valid"])
    ours = f"text_only_{rule}"
    summary = {
        "command": " ".join(sys.argv), "folds": args.folds, "seeds": args.seeds,
        "held_share": HELD_SHARE, "seconds": round(time.perf_counter() - started, 1),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "runs": {f"seed{s}-fold{f}": r["_info"] for (s, f), r in runs.items()},
        "length_rule_chosen_on_valid": rule, "means": means,
        "pairs": {f"{ours} vs {other}": fold_benchmark.compare(
            test[ours], test[other], fold_of("test"), metrics)
                  for other in ("no_new_items", f"random_placement_{rule}", "content_only")},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["| variant | valid Recall@50 | valid new-item | test Recall@50 | test new-item |",
             "|---|---|---|---|---|"]
    lines += [f"| {v} | {means['valid'][v]['recall@50']:.4f} | "
              f"{means['valid'][v]['new_item_recall@50']:.4f} | "
              f"{means['test'][v]['recall@50']:.4f} | "
              f"{means['test'][v]['new_item_recall@50']:.4f} |" for v in variants]
    lines += ["", f"Length rule chosen on validation: {rule}"]
    lines += ["", "| pair | metric | difference [95% CI] | folds won | users |",
              "|---|---|---|---|---|"]
    for pair, result in summary["pairs"].items():
        for metric, r in result.items():
            lines.append(f"| {pair} | {metric} | {r['mean_difference']:+.4f} "
                         f"[{r['interval_95'][0]:+.4f}, {r['interval_95'][1]:+.4f}] | "
                         f"{r['wins']}/{r['folds']} | {r['users']} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
