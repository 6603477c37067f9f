"""Command line: `python -m trainer train|evaluate ...`.

The last line `train` and `evaluate` print on stdout is one JSON object of metrics (with
MostPop's beside them); the same object is written to metrics.json in the run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from trainer.config import BACKBONES, LOSSES, TrainConfig
from trainer.data import FORMATS, DataError, RawData, load_movielens_small, load_path
from trainer.dataset import SequenceDataset, build_dataset
from trainer.evaluate import most_popular
from trainer.nets import build_encoder
from trainer.synthetic import make_synthetic
from trainer.train import evaluate_model, train

log = logging.getLogger("trainer")

BUILTIN_DATASETS = ("movielens-small", "synthetic")
CHECKPOINT_FORMAT = 1


# --- data specs: how a run names its data, so `evaluate` can rebuild the same split ---------


def data_spec(args: argparse.Namespace) -> dict[str, Any]:
    if args.data:
        return {"data": str(args.data), "items": str(args.items) if args.items else None,
                "format": args.format}
    if args.dataset == "synthetic":
        return {"synthetic": parse_synthetic(args.synthetic)}
    return {"dataset": args.dataset}


def parse_synthetic(text: str | None) -> dict[str, int | float]:
    """'users=2000,items=2000,topics=40,interests=4' -> make_synthetic keyword arguments."""
    names = {"users": "n_users", "items": "n_items", "topics": "n_topics",
             "interests": "interests_per_user", "min_len": "min_len", "max_len": "max_len",
             "stickiness": "stickiness", "seed": "seed"}
    out: dict[str, int | float] = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in names or not value:
            raise DataError(f"--synthetic: bad entry {part!r}; keys are {', '.join(names)}")
        number = float(value)
        out[names[key.strip()]] = int(number) if number.is_integer() and key != "stickiness" \
            else number
    return out


def load_spec(spec: dict[str, Any]) -> RawData:
    if "data" in spec:
        return load_path(spec["data"], spec.get("items"), spec.get("format", "auto"))
    if "synthetic" in spec:
        return make_synthetic(**spec["synthetic"])
    if spec.get("dataset") == "movielens-small":
        return load_movielens_small()
    raise DataError(f"unknown dataset {spec!r}")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- commands -----------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    cfg = TrainConfig(
        backbone=args.backbone, interests=args.interests, dim=args.dim, maxlen=args.maxlen,
        lr=args.lr, batch_size=args.batch_size, loss=args.loss, max_epochs=args.epochs,
        eval_every=args.eval_every, patience=args.patience, max_minutes=args.max_minutes,
        seed=args.seed, split_seed=args.split_seed, threads=args.threads,
    )
    spec = data_spec(args)
    raw = load_spec(spec)
    dataset = build_dataset(raw, min_item_count=cfg.min_item_count,
                            min_user_count=cfg.min_user_count, split_seed=cfg.split_seed)
    log.info("dataset %s", json.dumps(dataset.describe()))
    result = train(dataset, cfg, progress=not args.no_progress)
    test = dataset.eval_split("test", cfg.maxlen)
    report = {
        "dataset": dataset.describe(),
        "backbone": cfg.backbone,
        "interests": cfg.interests,
        "seed": cfg.seed,
        "test": evaluate_model(result.model, test),
        "mostpop": most_popular(dataset, test),
        "valid": result.best_valid,
        "train": {
            "loss": result.loss_mode, "steps": result.steps, "epochs": round(result.epochs, 2),
            "best_step": result.best_step, "stopped_by": result.stopped_by,
            "seconds": round(result.seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
        },
        "config": cfg.to_dict(),
    }
    out = Path(args.out) if args.out else Path("runs") / (
        f"{dataset.name}-{cfg.backbone}-k{cfg.interests}-seed{cfg.seed}")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "data_spec": spec,
         "dataset": dataset.describe(), "state_dict": result.model.state_dict()},
        out / "checkpoint.pt",
    )
    (out / "curve.json").write_text(json.dumps(result.curve, indent=1))
    report["run_dir"] = str(out)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    log.info("wrote %s", out)
    return report


def load_checkpoint(path: Path) -> tuple[dict[str, Any], SequenceDataset, torch.nn.Module]:
    """A checkpoint, its dataset (rebuilt from the recorded spec, fingerprint checked) and
    its model."""
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise DataError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a trainer checkpoint (format {CHECKPOINT_FORMAT})")
    cfg = TrainConfig.from_dict(ckpt["config"])
    dataset = build_dataset(load_spec(ckpt["data_spec"]), min_item_count=cfg.min_item_count,
                            min_user_count=cfg.min_user_count, split_seed=cfg.split_seed)
    if dataset.fingerprint != ckpt["dataset"]["fingerprint"]:
        raise DataError(f"{path}: the data changed since training (fingerprint "
                        f"{dataset.fingerprint} != {ckpt['dataset']['fingerprint']})")
    model = build_encoder(dataset.n_items, cfg)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return ckpt, dataset, model


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    ckpt, dataset, model = load_checkpoint(Path(args.checkpoint))
    cfg = TrainConfig.from_dict(ckpt["config"])
    split = dataset.eval_split(args.split, cfg.maxlen)
    return {
        "checkpoint": str(args.checkpoint),
        "dataset": dataset.describe(),
        "backbone": cfg.backbone,
        "interests": cfg.interests,
        "split": args.split,
        args.split: evaluate_model(model, split),
        "mostpop": most_popular(dataset, split),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer",
                                     description="Train and evaluate multi-interest encoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = TrainConfig()

    t = sub.add_parser("train", help="train an IBIM encoder and report test metrics")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=BUILTIN_DATASETS, default="movielens-small",
                     help="an embedded dataset (default: movielens-small)")
    src.add_argument("--data", type=Path, help="your interactions file or MovieLens folder")
    t.add_argument("--items", type=Path, help="items file (or Amazon metadata) for --data")
    t.add_argument("--format", choices=FORMATS, default="auto", help="format of --data")
    t.add_argument("--synthetic", help="synthetic options, e.g. users=2000,items=2000,topics=40")
    t.add_argument("--backbone", choices=BACKBONES, default=defaults.backbone)
    t.add_argument("--interests", type=int, default=defaults.interests, help="K")
    t.add_argument("--dim", type=int, default=defaults.dim)
    t.add_argument("--maxlen", type=int, default=defaults.maxlen)
    t.add_argument("--epochs", type=int, default=defaults.max_epochs, help="maximum epochs")
    t.add_argument("--lr", type=float, default=defaults.lr)
    t.add_argument("--batch-size", type=int, default=defaults.batch_size)
    t.add_argument("--loss", choices=LOSSES, default=defaults.loss)
    t.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps")
    t.add_argument("--patience", type=int, default=defaults.patience, help="evaluations")
    t.add_argument("--max-minutes", type=float, default=defaults.max_minutes)
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--split-seed", type=int, default=defaults.split_seed)
    t.add_argument("--threads", type=int, default=defaults.threads)
    t.add_argument("--out", type=Path, help="run directory (default runs/<dataset>-<backbone>-..)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="re-evaluate a saved checkpoint")
    e.add_argument("checkpoint", type=Path, help="checkpoint.pt of a run")
    e.add_argument("--split", choices=("valid", "test"), default="test")
    e.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        report = args.func(args)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, separators=(",", ":")))
    return 0
