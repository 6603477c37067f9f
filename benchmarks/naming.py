"""What naming interests costs a request: the compute floor (one ONNX run, one FAISS search,
merge, naming) with the bundle's interest vocabulary and without it, interleaved in one process
over the same histories, one request at a time. Also prints one named answer.

    python benchmarks/naming.py models/recommender/3 --user 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from service.bundle.load import load_bundle
from service.serving.recommender import InterestDetail, Recommender


def paired_floor_ms(named: Recommender, unnamed: Recommender, histories: list[list[str]],
                    rounds: int) -> tuple[list[float], list[float]]:
    """Each history computed with naming and without, back to back (order alternating), so a
    change in machine load hits both alike; the cost is the median paired difference."""
    on, off = [], []
    for r in range(rounds):
        for i, history in enumerate(histories):
            pair = (named, unnamed) if (r + i) % 2 == 0 else (unnamed, named)
            for model in pair:
                started = time.perf_counter()
                model.recommend(history, 20)
                (on if model is named else off).append((time.perf_counter() - started) * 1000)
    return on, off


def served_name_count(served_by: list[int | None], details: list[InterestDetail]) -> int:
    """Different names among the interests that serve an item of the answer (None: the
    popularity fallback, no interest)."""
    return len({details[i].name for i in set(served_by) - {None}} - {None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="a bundle trained with ESIM (has naming files)")
    parser.add_argument("--requests", type=int, default=200, help="histories per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--user", help="a user whose history (from the bundle's dataset) to "
                                       "show named")
    args = parser.parse_args()
    named = Recommender(load_bundle(args.bundle))
    if named.namer is None:
        raise SystemExit(f"{args.bundle}: no naming files (train with --esim)")
    unnamed = Recommender(load_bundle(args.bundle))
    unnamed.namer = None
    rng = np.random.default_rng(0)
    ids = named.bundle.item_ids.tolist()
    histories = [[ids[i] for i in rng.integers(0, len(ids), rng.integers(5, 40))]
                 for _ in range(args.requests)]
    paired_floor_ms(named, unnamed, histories[:20], 1)  # warm-up
    load_before = os.getloadavg()
    on, off = paired_floor_ms(named, unnamed, histories, args.rounds)
    p = {name: {"p50": float(np.percentile(t, 50)), "p99": float(np.percentile(t, 99))}
         for name, t in (("with_naming", on), ("without_naming", off))}
    result = {"bundle": str(args.bundle), "requests": len(on), "floor_ms": p,
              "naming_adds_p50_ms": float(np.median(np.subtract(on, off))),
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "vocabulary": named.namer.names, "min_confidence": named.namer.min_confidence}
    # How often interests get a name, over the bundle's own test users (never trained on).
    from trainer.config import TrainConfig
    from trainer.training.checkpoint import dataset_for

    manifest = named.bundle.manifest
    dataset = dataset_for(manifest.data_spec, TrainConfig.from_dict(manifest.config),
                          manifest.dataset["fingerprint"], args.bundle)
    answers = [named.recommend(dataset.item_ids[dataset.sequence(u)].tolist(), 20)
               for u in dataset.test_users]
    shown = [d.name is not None for a in answers for d in a.interest_details]
    result["named_share_test_users"] = float(np.mean(shown))
    # Whether the names tell a user's interests apart: the names of the interests that serve
    # at least one item of the top 20, two or more different ones.
    result["two_names_share_test_users"] = float(np.mean(
        [served_name_count(a.interests, a.interest_details) >= 2 for a in answers]))
    if args.user:
        user = int(np.flatnonzero(dataset.user_ids == args.user)[0])
        history = dataset.item_ids[dataset.sequence(user)].tolist()
        answer = named.recommend(history, 20)
        titles = dict(zip(named.bundle.item_ids.tolist(), named.bundle.titles.tolist(),
                          strict=True))
        result["answer"] = {
            "user_id": args.user, "recent_history": [titles[i] for i in history[-10:]],
            "interests": [{"interest": i, "name": d.name, "confidence": d.confidence,
                           "weight": d.weight,
                           "items": [t for t, w in zip(answer.titles, answer.interests,
                                                       strict=True) if w == i][:5]}
                          for i, d in enumerate(answer.interest_details)]}
    print(json.dumps(result, indent=1))
    print(f"naming adds {result['naming_adds_p50_ms']:.3f} ms (median paired difference; "
          f"floor p50 {p['without_naming']['p50']:.3f} -> {p['with_naming']['p50']:.3f} ms)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
