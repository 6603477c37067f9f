"""Where a training run's time goes: the default config on the embedded data (issue 21).

Two measurements, printed as one JSON object (and written to --out):

1. `full_run`: the whole training as `make demo` runs it (seed 0, split seed 0), timed by the
   loop's own phase clocks (trainer/training/timing.py): data, forward and loss, backward,
   optimiser, evaluation; steps, the best step and the steps spent after it.
2. `profile`: `--profile-steps` steps under torch.profiler (CPU), which splits what the phase
   clocks cannot: the encoder against the K-interest scoring (the `score` range of the encoders'
   losses, and the backward functions of each), and the top operators by self time.

    python benchmarks/profile_train.py --out benchmarks/results/profile/train-before.json

Timings on a shared machine: the load averages at the start and end are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import torch
from torch.profiler import ProfilerActivity, profile

from trainer.config import ScoreDtype, TrainConfig
from trainer.data.dataset import build_dataset
from trainer.data.specs import load_spec
from trainer.training.loop import train
from trainer.training.timing import load_average

RANGES = ("train.data", "train.forward_loss", "score", "train.backward",
          "train.optimiser", "train.evaluate")
# Backward functions of the scoring: the max over interests (BestInterestScore) and the softmax
# cross-entropy; every other backward function belongs to the encoder.
SCORE_BACKWARD = ("BestInterestScore", "LogSoftmaxBackward", "NllLossBackward",
                  "MaskedFillBackward", "CatBackward", "SubBackward")


def full_run(dataset: Any, cfg: TrainConfig) -> dict[str, Any]:
    result = train(dataset, cfg, progress=False)
    phases = result.phase_seconds
    return {
        "seconds": round(result.seconds, 2), "steps": result.steps,
        "seconds_per_step": round(result.seconds / result.steps, 4),
        "best_step": result.best_step, "steps_after_best": result.steps - result.best_step,
        "stopped_by": result.stopped_by, "valid_recall@50": result.best_valid["recall@50"],
        "phase_seconds": phases,
        "phase_share": {k: round(v / result.seconds, 3) for k, v in phases.items()},
        "evaluations": len(result.curve) + 1,
        "load_average": result.load_average,
    }


def profiled(dataset: Any, cfg: TrainConfig, steps: int) -> dict[str, Any]:
    """`steps` training steps (one evaluation at the end, as `eval_every=steps` makes it)."""
    steps_per_epoch = -(-len(dataset.train_windows(cfg.maxlen)[0]) // cfg.batch_size)
    short = replace(cfg, max_epochs=max(1, -(-steps // steps_per_epoch)), eval_every=steps,
                    patience=1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(dataset, short, progress=False)
    events = prof.key_averages()
    ranges = {e.key: round(e.cpu_time_total / 1e3, 1) for e in events if e.key in RANGES}
    # The forward pass less the scoring: the encoder (and, with ESIM, its losses).
    ranges["encode"] = round(ranges.get("train.forward_loss", 0) - ranges.get("score", 0), 1)
    backward: dict[str, float] = {"score": 0.0, "encoder": 0.0}
    for e in events:
        if e.key.startswith("autograd::engine::evaluate_function:"):
            part = "score" if any(s in e.key for s in SCORE_BACKWARD) else "encoder"
            backward[part] += e.cpu_time_total / 1e3
    top = sorted((e for e in events if not e.key.startswith(("train.", "autograd::engine",
                                                               "score"))),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "steps": steps, "ranges_ms": ranges,
        "backward_ms": {k: round(v, 1) for k, v in backward.items()},
        "top_ops_self_ms": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
                             "calls": e.count} for e in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="movielens-small")
    parser.add_argument("--profile-steps", type=int, default=100)
    parser.add_argument("--skip-full", action="store_true", help="the profile only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--score-positions", type=int, default=0,
                        help="train on the last N positions of each window (0: every one)")
    parser.add_argument("--score-dtype", choices=get_args(ScoreDtype), default="auto",
                        help="precision of the loss's scoring products (auto: the default's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    cfg = TrainConfig(seed=0, split_seed=0, threads=args.threads,
                      score_positions=args.score_positions, score_dtype=args.score_dtype)
    dataset = build_dataset(load_spec({"dataset": args.dataset}), **cfg.split())
    report: dict[str, Any] = {
        "dataset": dataset.describe(), "config": {"backbone": cfg.backbone,
                                                  "interests": cfg.interests, "dim": cfg.dim,
                                                  "batch_size": cfg.batch_size,
                                                  "score_positions": cfg.score_positions,
                                                  "score_dtype": cfg.score_dtype},
        "torch_threads": torch.get_num_threads(), "load_average_start": load_average(),
    }
    started = time.perf_counter()
    if not args.skip_full:
        report["full_run"] = full_run(dataset, cfg)
    report["profile"] = profiled(dataset, cfg, args.profile_steps)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["load_average_end"] = load_average()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    print(f"done in {report['wall_seconds']}s", file=sys.stderr)


if __name__ == "__main__":
    main()
