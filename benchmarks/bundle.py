"""Export and index-build time, bundle size and ANN recall@50: embedded data and a synthetic
1M-item catalogue (d=64). Prints one JSON object.

The 1M model is trained briefly (sampled softmax, --train-minutes) so that the recall is
measured on real interest vectors, not random ones. Usage:

    python benchmarks/bundle.py [--items 1000000] [--train-minutes 3] [--keep DIR]

--keep DIR leaves the published bundles in DIR (for the service load benchmark).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

from service.bundle import load_bundle
from trainer.config import TrainConfig
from trainer.data import load_movielens_small
from trainer.dataset import build_dataset
from trainer.export import publish_bundle
from trainer.synthetic import make_synthetic
from trainer.train import train


def measure(name: str, raw, spec: dict, cfg: TrainConfig, store: Path) -> dict:
    started = time.perf_counter()
    dataset = build_dataset(raw, min_item_count=cfg.min_item_count)
    data_seconds = time.perf_counter() - started
    result = train(dataset, cfg, progress=False)
    started = time.perf_counter()
    path = publish_bundle(result.model, dataset, cfg, spec, {"valid": result.best_valid}, store,
                          name, progress=True)
    publish_seconds = time.perf_counter() - started
    started = time.perf_counter()
    bundle = load_bundle(path)
    load_seconds = time.perf_counter() - started
    m = bundle.manifest
    return {
        "items": m.item_count,
        "interactions": dataset.describe()["interactions"],
        "data_seconds": round(data_seconds, 1),
        "train_seconds": round(result.seconds, 1),
        "train_steps": result.steps,
        "publish_seconds": round(publish_seconds, 1),
        "onnx_export_and_parity_seconds": round(m.extra["export_seconds"], 1),
        "parity_max_abs_diff": m.extra["parity_max_abs_diff"],
        "index": m.index.model_dump(),
        "load_and_verify_seconds": round(load_seconds, 1),
        "bundle_mb": round(sum(f.bytes for f in m.files.values()) / 2**20, 1),
        "files_mb": {k: round(v.bytes / 2**20, 1) for k, v in m.files.items()},
        "path": str(path),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--train-minutes", type=float, default=6.0)
    parser.add_argument("--keep", type=Path, help="publish into this model store and keep it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        store = args.keep or Path(tmp)
        out = {"embedded": measure(
            "movielens-small", load_movielens_small(), {"dataset": "movielens-small"},
            TrainConfig(max_epochs=3), store)}
        users = args.interactions // 40
        # Flat popularity inside a topic and no item filter, so all 1M items stay in the
        # catalogue (with ComiRec's >= 5 filter and Zipf, 10M events keep about 360k).
        spec = {"n_users": users, "n_items": args.items, "n_topics": max(10, args.items // 500),
                "min_len": 20, "max_len": 60, "zipf": 0.0, "seed": 0}
        # One shared negative per example (not ComiRec's 10): 10x cheaper steps, so the few
        # minutes of training see enough data for item vectors to take the topic structure.
        cfg = TrainConfig(loss="sampled", max_epochs=1, eval_every=10**9, min_item_count=1,
                          max_minutes=args.train_minutes, batch_size=1024,
                          negatives_per_example=1)
        out[f"synthetic_{args.items}"] = measure(
            "synthetic-1m", make_synthetic(**spec), {"synthetic": spec}, cfg, store)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
