"""The whole catalogue: the old default (ComiRec's filter) against the catalogue default on the
long-tail protocol, and how new items are placed.

Per fold of the user-level 10-fold split over *every* item with an interaction
(`--min-item-count 1`) and training seed, a seeded 10% of the catalogue is held out entirely
(new items: their interactions leave training and the histories; they exist only in the items
file). The test users' targets keep every item, rare and new (the last 20% of a user's full
sequence; the first 80%, less the held-out items, is the history). Two trainings per run:

* `old`: the default before issue 34: items with fewer than 5 interactions dropped
  (`--min-item-count 5`), no item text, no text-only items (`--comirec-protocol`);
* `new`: every item with an interaction, item text, text-only items placed by their text.

Lists of 50 over each model's whole catalogue (the `old` model's history keeps the items it
knows; a user it knows none of gets its MostPop list, as serving's fallback would). For the
`new` model, the new (text-only) items are placed by `PLACEMENTS` (the ridge map, or the model's
own text path: trainer/semantics/text_only.py) and may get a direct text
term (`BLENDS`: the new item's score plus gamma x the user's score spread x the cosine of its
MiniLM text and the mean text of the history); the rule is chosen on validation users
(`choose_rule`) and only it meets the test users. Also `content_only` (no model: MiniLM
cosine of every item with the history's mean text) and `new_no_new_items`.

Per user: overall Recall@50, tail Recall@50 (targets with 1-5 training interactions),
new-item Recall@50 (held-out targets); per run: catalogue coverage (the share of the
catalogue in any test user's top 50) and each training's seconds.

    python benchmarks/long_tail.py --folds 10 --seeds 3 --jobs 2 --out benchmarks/results/long-tail
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# A sibling script (its paired interval over runs and users): run as a script, benchmarks/
# is on the path.
import folds as fold_benchmark
import numpy as np

HELD_SHARE = 0.1
N = 50
# Overall Recall@50 a way of showing new items may lose against the ridge placement on score
# alone (what --text-only-items did before), on validation.
TOLERANCE = 0.005
TAIL_MAX = 5
PLACEMENTS = ("ridge", "projected")
LENGTH = 0.95  # --text-only-length's default
BLENDS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
# New-item slots: the last SLOTS places of the list go to new items ranked by SLOT_BLENDS.
SLOTS = (2, 5)
SLOT_BLENDS: tuple[float | str, ...] = (0.0, 1.0, 4.0, "text")
METRICS = ("recall@50", "tail_recall@50", "new_item_recall@50")
TRAININGS = {
    "old": {"min_item_count": 5, "item_text": False},
    "new": {"min_item_count": 1, "item_text": True},
}


def rule_name(placement: str, gamma: float) -> str:
    return f"new_{placement}_blend{gamma:g}"


def slot_rule_name(placement: str, gamma: float | str, slots: int) -> str:
    label = gamma if isinstance(gamma, str) else f"{gamma:g}"
    return f"new_{placement}_slots{slots}_blend{label}"


def run_fold(fold: int, folds: int, seed: int, threads: int) -> dict:
    import torch

    from trainer.config import TrainConfig
    from trainer.data.dataset import build_dataset
    from trainer.data.loaders import load_movielens_small
    from trainer.semantics.item_text import item_text_features, sentence_features
    from trainer.semantics.text_only import TextPath, text_only_sentences, text_only_vectors
    from trainer.training.evaluate import exact_search, retrieve
    from trainer.training.loop import train

    torch.set_num_threads(threads)
    raw = load_movielens_small()
    full = build_dataset(raw, min_item_count=1, folds=folds, fold=fold)
    rng = np.random.default_rng([fold, seed, 23])
    held = set(rng.choice(full.item_ids[1:], int(HELD_SHARE * full.n_items),
                          replace=False).tolist())
    reduced = dataclasses.replace(raw, interactions=raw.interactions[
        ~raw.interactions["item_id"].isin(held)])
    catalogue_size = full.n_items

    # Training interactions per item (training users, held-out items removed).
    lengths = np.diff(full.offsets)
    is_train = np.zeros(full.n_users, bool)
    is_train[full.train_users] = True
    counts = np.bincount(full.flat[np.repeat(is_train, lengths)], minlength=full.n_items + 1)
    train_count = {item: int(c) for item, c in zip(full.item_ids[1:], counts[1:], strict=True)}

    splits = {}
    for split, users in (("valid", full.valid_users), ("test", full.test_users)):
        histories, targets = [], []
        for u in users:
            sequence = full.item_ids[full.sequence(u)].astype(str)
            cut = int(len(sequence) * 0.8)
            histories.append([i for i in sequence[:cut] if i not in held])
            targets.append(list(dict.fromkeys(sequence[cut:])))
        splits[split] = (full.user_ids[users].astype(str).tolist(), histories, targets)

    lists: dict[str, dict[str, list[list[str]]]] = {"valid": {}, "test": {}}
    info: dict = {"held_out_items": len(held), "catalogue": catalogue_size, "seconds": {}}
    for name, overrides in TRAININGS.items():
        data = build_dataset(reduced, folds=folds, fold=fold,
                             min_item_count=overrides["min_item_count"])
        for users in ("valid_users", "test_users"):
            if not np.array_equal(full.user_ids[getattr(full, users)],
                                  data.user_ids[getattr(data, users)]):
                raise SystemExit(f"{name}: the item filter changed the user split")
        cfg = TrainConfig(folds=folds, fold=fold, seed=seed, threads=threads, **overrides)
        started = time.perf_counter()
        result = train(data, cfg, progress=False)
        model = result.model.eval()
        info["seconds"][name] = round(time.perf_counter() - started, 1)
        info.setdefault("steps", {})[name] = result.steps
        info.setdefault("best_step", {})[name] = result.best_step
        info.setdefault("items", {})[name] = data.n_items
        with torch.no_grad():
            warm = model.item_vectors().numpy()
        trained_ids = data.item_ids[1:].astype(str)
        popular = np.argsort(-data.popularity()[1:], kind="stable")[:N]
        searches: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        if name == "old":
            searches["old"] = (trained_ids, None)
        else:
            new_ids = np.asarray(data.text_only.item_ids).astype(str)
            info["text_only_items"] = len(new_ids)
            cold_text = sentence_features(text_only_sentences(data.text_only))
            warm_text = item_text_features(data)[1:]
            placed = {"ridge": text_only_vectors(data, warm, LENGTH),
                      "projected": text_only_vectors(data, warm, LENGTH, TextPath.of(model))}
            searches["new_no_new_items"] = (trained_ids, None)
        row_of = {item: row for row, item in enumerate(trained_ids)}
        search = exact_search(warm)
        for split, (_, histories, _) in splits.items():
            rows = [[row_of[i] + 1 for i in h if i in row_of][-cfg.maxlen:] for h in histories]
            padded = np.array([[0] * (cfg.maxlen - len(r)) + r for r in rows], dtype=np.int64)
            with torch.no_grad():
                interests = model(torch.from_numpy(padded)).numpy()
            ranked = retrieve(interests, search, N)
            known = [len(r) > 0 for r in rows]
            trained_lists = [list(trained_ids[np.asarray(top) - 1]) if k
                             else list(trained_ids[popular]) for top, k in zip(ranked, known,
                                                                              strict=True)]
            if name == "old":
                lists[split]["old"] = trained_lists
                continue
            lists[split]["new_no_new_items"] = trained_lists
            # Scores of the trained top-N (max over interests), and of every new item.
            user_vectors = interests  # [U, K, d]
            top_scores = np.stack([np.max(user_vectors[u] @ warm[np.asarray(ranked[u]) - 1].T,
                                          axis=0) for u in range(len(rows))])
            spread = np.maximum(top_scores[:, 0] - top_scores[:, -1], 1e-6)
            profile = np.stack([warm_text[np.asarray(r, dtype=np.int64) - 1].mean(axis=0)
                                if r else np.zeros(warm_text.shape[1], np.float32)
                                for r in rows])
            profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-12)
            cold_cosine = profile @ cold_text.T  # [U, C]
            for placement, vectors in placed.items():
                model_scores = np.einsum("ukd,cd->ukc", user_vectors, vectors).max(axis=1)
                for gamma in BLENDS:
                    scores = model_scores + gamma * spread[:, None] * cold_cosine
                    merged = []
                    for u in range(len(rows)):
                        pool = np.concatenate([top_scores[u], scores[u]])
                        names = np.concatenate([np.asarray(trained_lists[u]), new_ids])
                        if not known[u]:  # the fallback: MostPop, no new items
                            merged.append(trained_lists[u])
                            continue
                        merged.append(list(names[np.argsort(-pool, kind="stable")[:N]]))
                    lists[split][rule_name(placement, gamma)] = merged
                # Slots: the list's last `slots` places go to the best new items by the
                # blended score (a text-only ranking at gamma "text"), the rest is the model's.
                for gamma in SLOT_BLENDS:
                    scores = (cold_cosine if gamma == "text"
                              else model_scores + gamma * spread[:, None] * cold_cosine)
                    best_new = np.argsort(-scores, axis=1, kind="stable")[:, :max(SLOTS)]
                    for slots in SLOTS:
                        lists[split][slot_rule_name(placement, gamma, slots)] = [
                            trained_lists[u] if not known[u]
                            else trained_lists[u][:N - slots] + list(new_ids[best_new[u, :slots]])
                            for u in range(len(rows))]
            everything = np.concatenate([trained_ids, new_ids])
            texts = np.concatenate([warm_text, cold_text])
            lists[split]["content_only"] = [list(everything[np.argsort(-(texts @ p))[:N]])
                                            for p in profile]

    out: dict = {"_info": info}
    for split, (users, _, targets) in splits.items():
        out[split] = {"users": users}
        for variant, ranked_lists in lists[split].items():
            values: dict[str, list[float]] = {m: [] for m in METRICS}
            for top, wanted in zip(ranked_lists, targets, strict=True):
                hit = np.isin(wanted, top)
                count = np.array([train_count.get(i, 0) if i not in held else -1 for i in wanted])
                values["recall@50"].append(float(hit.mean()))
                for metric, subset in (("tail_recall@50", (count >= 1) & (count <= TAIL_MAX)),
                                       ("new_item_recall@50", count == -1)):
                    values[metric].append(float(hit[subset].mean()) if subset.any() else np.nan)
            values["coverage"] = len(set().union(*map(set, ranked_lists))) / catalogue_size
            out[split][variant] = values
    return out


def choose_rule(valid: dict[str, dict[str, float]]) -> str:
    """On validation: among what the product can serve (either placement; new items on score
    alone, or in SLOTS places ranked by the model's score, NEW_ITEM_SHARE), the rule with the
    best new-item recall among those that keep overall Recall@50 within TOLERANCE of the
    text-only placement as it shipped before (ridge, score alone); else the one with the best
    overall recall. (The text blends
    are measured beside, for the record: serving has no item text.)"""
    floor = valid[rule_name("ridge", 0.0)]["recall@50"] - TOLERANCE
    rules = [rule_name(p, 0.0) for p in PLACEMENTS]
    rules += [slot_rule_name(p, 0.0, m) for p in PLACEMENTS for m in SLOTS]
    keeping = [r for r in rules if valid[r]["recall@50"] >= floor]
    if keeping:
        return max(keeping, key=lambda r: valid[r]["new_item_recall@50"])
    return max(rules, key=lambda r: valid[r]["recall@50"])


def task(args: tuple[int, int, int, int, Path]) -> str:
    fold, folds, seed, threads, path = args
    started = time.perf_counter()
    result = run_fold(fold, folds, seed, threads)
    result["_info"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["_info"]["load_1min"] = os.getloadavg()[0]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return (f"seed {seed} fold {fold}: old {result['_info']['seconds']['old']:.0f}s, new "
            f"{result['_info']['seconds']['new']:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--summarise-only", action="store_true",
                        help="summarise the runs done so far (complete seeds only)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    todo = [(fold, args.folds, seed, args.threads, args.out / f"seed{seed}-fold{fold}.json")
            for seed in range(args.seeds) for fold in range(args.folds)]
    todo = [t for t in todo if not t[-1].is_file()]
    if todo and not args.summarise_only:
        with ProcessPoolExecutor(args.jobs,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            for line in pool.map(task, todo):
                print(line, file=sys.stderr, flush=True)
    seeds = [s for s in range(args.seeds)
             if all((args.out / f"seed{s}-fold{f}.json").is_file() for f in range(args.folds))]
    runs = {(s, f): json.loads((args.out / f"seed{s}-fold{f}.json").read_text())
            for s in seeds for f in range(args.folds)}
    print(json.dumps(summarise(runs, seeds, args, started, load_before)))


def summarise(runs: dict, seeds: list[int], args: argparse.Namespace, started: float,
              load_before: tuple[float, float, float]) -> dict:
    folds = args.folds
    first = runs[seeds[0], 0]
    variants = [v for v in first["test"] if v != "users"]

    def arrays(split: str) -> dict[str, dict[str, np.ndarray]]:
        return {v: {m: np.array([np.concatenate([runs[s, f][split][v][m] for f in range(folds)])
                                 for s in seeds], dtype=float) for m in METRICS}
                for v in variants}

    def fold_of(split: str) -> np.ndarray:
        return np.concatenate([[f] * len(first_fold[split]["users"])
                               for f, first_fold in ((f, runs[seeds[0], f])
                                                     for f in range(folds))])

    def coverage(split: str, variant: str) -> np.ndarray:
        return np.array([runs[s, f][split][variant]["coverage"] for s in seeds
                         for f in range(folds)])

    valid, test = arrays("valid"), arrays("test")
    means = {split: {v: {**{m: float(np.nanmean(a)) for m, a in values.items()},
                         "coverage": float(coverage(split, v).mean())}
                     for v, values in data.items()}
             for split, data in (("valid", valid), ("test", test))}
    rule = choose_rule(means["valid"])
    pairs = {f"{rule} vs {other}": fold_benchmark.compare(test[rule], test[other],
                                                          fold_of("test"), METRICS)
             for other in ("old", "new_no_new_items", rule_name("ridge", 0.0), "content_only")
             if other != rule}
    # The catalogue without new-item places (NEW_ITEM_SHARE 0), and without new items at all,
    # against the old default: where the overall difference comes from.
    for name in (rule_name("projected", 0.0), "new_no_new_items"):
        pairs[f"{name} vs old"] = fold_benchmark.compare(test[name], test["old"],
                                                         fold_of("test"), METRICS)
    seconds = {name: np.array([runs[s, f]["_info"]["seconds"][name] for s in seeds
                               for f in range(folds)]) for name in TRAININGS}
    ratio = seconds["new"] / seconds["old"]
    coverage_ratio = coverage("test", rule) / coverage("test", "old")
    summary = {
        "command": " ".join(sys.argv), "folds": folds, "seeds": len(seeds),
        "held_share": HELD_SHARE, "seconds": round(time.perf_counter() - started, 1),
        "load_average": {"before": load_before, "after": os.getloadavg(),
                         "runs_1min": [r["_info"].get("load_1min") for r in runs.values()]},
        "runs": {f"seed{s}-fold{f}": r["_info"] for (s, f), r in runs.items()},
        "rule_chosen_on_valid": rule, "means": means, "pairs": pairs,
        "coverage_ratio_new_vs_old": {"mean": float(coverage_ratio.mean()),
                                      "min": float(coverage_ratio.min()),
                                      "max": float(coverage_ratio.max())},
        "training_seconds": {name: float(s.mean()) for name, s in seconds.items()},
        "training_time_ratio_new_vs_old": {"mean_of_ratios": float(ratio.mean()),
                                           "ratio_of_means": float(seconds["new"].mean()
                                                                   / seconds["old"].mean()),
                                           "min": float(ratio.min()),
                                           "max": float(ratio.max())},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["| variant | valid R@50 | valid tail | valid new-item | valid coverage | "
             "test R@50 | test tail | test new-item | test coverage |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        cells = [f"{means[s][v][m]:.4f}" for s in ("valid", "test")
                 for m in (*METRICS, "coverage")]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", f"Rule chosen on validation: {rule}; seeds {len(seeds)} x folds {folds}",
              f"Coverage ratio (test, {rule} / old): {summary['coverage_ratio_new_vs_old']}",
              f"Training time new / old: {summary['training_time_ratio_new_vs_old']}", "",
              "| pair | metric | difference [95% CI] | folds won | users |",
              "|---|---|---|---|---|"]
    for pair, result in pairs.items():
        for metric, r in result.items():
            lines.append(f"| {pair} | {metric} | {r['mean_difference']:+.4f} "
                         f"[{r['interval_95'][0]:+.4f}, {r['interval_95'][1]:+.4f}] | "
                         f"{r['wins']}/{r['folds']} | {r['users']} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
