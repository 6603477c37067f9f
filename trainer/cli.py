"""Command line: `python -m trainer train|evaluate|export|nightly|report ...`.

The last line `train` and `evaluate` print on stdout is one JSON object of metrics (with
MostPop's beside them); the same object is written to metrics.json in the run directory.
`nightly --every SECONDS` prints one JSON line per cycle instead, until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.bundle import (
    DEFAULT_MODEL_NAME,
    BundleError,
    latest_version,
    load_bundle,
    read_manifest,
)
from service.history import EVENT_GROUP, EVENT_STREAM
from trainer import distributed
from trainer.config import (
    BACKBONES,
    ESIM_LEVELS,
    INTEREST_LOSSES,
    LLM_BACKENDS,
    LOSSES,
    MATCHING_RULES,
    TrainConfig,
)
from trainer.data import FORMATS, DataError
from trainer.dataset import EvalSplit, SequenceDataset, build_dataset
from trainer.esim import EsimError, esim_setup
from trainer.evaluate import evaluate_encoder, most_popular, popular_rankings, rankings
from trainer.export import INDEX_KINDS, ExportError, publish_bundle
from trainer.llm import LLMError, LLMSettings
from trainer.metrics import CUTOFFS, per_user_metrics
from trainer.naming import naming_from_state, naming_state
from trainer.nets import build_encoder
from trainer.nightly import LockHeld, NightlyError, NightlyOptions, run_every, run_nightly
from trainer.specs import BUILTIN_DATASETS, data_spec, load_spec
from trainer.train import evaluate_model, model_search, train

log = logging.getLogger("trainer")

CHECKPOINT_FORMAT = 1
# Parent of the default run directories; a container's working directory is often not
# writable by its (non-root) user, so it can be pointed elsewhere.
RUNS_DIR_ENV = "RUNS_DIR"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- commands -----------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> dict[str, Any] | None:
    # Under torchrun: join the process group; only rank 0 logs (errors aside), writes the run
    # directory and the bundle, and returns the report (the others return None).
    if distributed.init_from_env() and not distributed.is_main():
        logging.getLogger().setLevel(logging.ERROR)
    if args.if_missing:
        if not args.out:
            raise DataError("--if-missing needs --out (the model store to look in)")
        existing = latest_version(Path(args.out) / args.name)
        if existing is not None:
            path = Path(args.out) / args.name / str(existing)
            log.info("a bundle exists (%s); not training (--if-missing)", path)
            return {"skipped": True, "bundle": str(path)} if distributed.is_main() else None
    cfg = TrainConfig(
        backbone=args.backbone, interests=args.interests, dim=args.dim, maxlen=args.maxlen,
        lr=args.lr, batch_size=args.batch_size, loss=args.loss, interest_loss=args.interest_loss,
        item_text=args.item_text,
        max_epochs=args.epochs,
        eval_every=args.eval_every, patience=args.patience, max_minutes=args.max_minutes,
        seed=args.seed, split_seed=args.split_seed, folds=args.folds, fold=args.fold,
        threads=args.threads,
        esim=args.esim, llm=args.llm, esim_warmup_epochs=args.esim_warmup_epochs,
        esim_clusters=args.esim_clusters, esim_users_per_cluster=args.esim_users_per_cluster,
        esim_llm_budget=args.llm_budget, esim_labels=args.esim_labels,
        esim_alpha=args.esim_alpha, esim_beta=args.esim_beta, esim_tau=args.esim_tau,
        esim_matching=args.esim_matching, esim_level=args.esim_level,
        esim_crowds=args.esim_crowds, esim_crowd_items=args.esim_crowd_items,
        esim_merge_threshold=args.esim_merge_threshold, esim_batch_users=args.esim_batch_users,
    )
    spec = data_spec(args)
    raw = load_spec(spec)
    dataset = build_dataset(raw, **cfg.split())
    log.info("dataset %s", json.dumps(dataset.describe()))
    run_dir = Path(args.run_dir) if args.run_dir else runs_root() / (
        f"{dataset.name}-{cfg.backbone}-k{cfg.interests}-seed{cfg.seed}"
        + (f"-fold{cfg.fold}of{cfg.folds}" if cfg.folds else "")
        + (f"-esim-{cfg.llm}" if cfg.esim else "")
        + (f"-{cfg.esim_level}" if cfg.esim and cfg.esim_level != "individual" else ""))
    if distributed.is_main():  # before training, so a bad location fails in seconds, not hours
        make_run_dir(run_dir)
    llm_settings = LLMSettings(**{k: v for k, v in (
        ("base_url", args.llm_base_url), ("model", args.llm_model),
        ("cache_dir", args.llm_cache)) if v is not None})
    result = train(dataset, cfg, progress=not args.no_progress,
                   esim_setup=esim_setup(dataset, cfg, run_dir, not args.no_progress,
                                         llm_settings))
    if not distributed.is_main():
        return None
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
            "selection_metric": result.selection_metric,
            "seconds": round(result.seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "world_size": result.world_size,  # training processes (torchrun)
        },
        # ESIM settings, typical users and LLM statistics (source "metadata (...)" when no
        # LLM was used); null for IBIM alone.
        "esim": result.esim,
        "config": cfg.to_dict(),
    }
    torch.save(
        {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "data_spec": spec,
         "dataset": dataset.describe(), "state_dict": result.model.state_dict(),
         "naming": naming_state(result.naming) if result.naming is not None else None},
        run_dir / "checkpoint.pt",
    )
    (run_dir / "curve.json").write_text(json.dumps(result.curve, indent=1))
    write_per_user(run_dir / "per_user.json", dataset, test, result.model)
    report["run_dir"] = str(run_dir)
    if args.out:
        bundle = publish_bundle(
            result.model, dataset, cfg, spec, bundle_metrics(report), Path(args.out),
            args.name, args.index, progress=not args.no_progress, naming=result.naming)
        report["bundle"] = str(bundle)
    (run_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    log.info("wrote %s", run_dir)
    return report


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs")


def make_run_dir(run_dir: Path) -> None:
    """Create the run directory or fail with a usable message (not a traceback)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK | os.X_OK):  # exists, but belongs to someone else
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(run_dir))
    except OSError as exc:
        raise DataError(f"{run_dir}: cannot create the run directory ({exc}); set --run-dir or "
                        f"{RUNS_DIR_ENV} to a writable place") from exc


def write_per_user(path: Path, dataset: SequenceDataset, split: EvalSplit,
                   model: torch.nn.Module) -> None:
    """Each test user's metrics (model and MostPop), keyed by external user id: what a
    paired comparison of two models over the same users needs (benchmarks/folds.py)."""
    ranked = rankings(*model_search(model), split, max(CUTOFFS))

    def lists(values: dict[str, np.ndarray]) -> dict[str, list[float]]:
        return {name: column.round(6).tolist() for name, column in values.items()}

    path.write_text(json.dumps({
        "users": dataset.user_ids[split.users].astype(str).tolist(),
        "model": lists(per_user_metrics(ranked, split.targets)),
        "mostpop": lists(per_user_metrics(popular_rankings(dataset, split), split.targets)),
    }))


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
    dataset = dataset_for(ckpt["data_spec"], cfg, ckpt["dataset"]["fingerprint"], path)
    model = build_encoder(dataset.n_items, cfg)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return ckpt, dataset, model


def bundle_metrics(report: dict[str, Any]) -> dict[str, Any]:
    return {key: report[key] for key in ("test", "valid", "mostpop") if key in report}


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    ckpt, dataset, model = load_checkpoint(Path(args.checkpoint))
    cfg = TrainConfig.from_dict(ckpt["config"])
    test = dataset.eval_split("test", cfg.maxlen)
    metrics = {"test": evaluate_model(model, test), "mostpop": most_popular(dataset, test)}
    path = publish_bundle(model, dataset, cfg, ckpt["data_spec"], metrics, Path(args.out),
                          args.name, args.index, progress=not args.no_progress,
                          naming=naming_from_state(ckpt["naming"]) if ckpt.get("naming") else None)
    manifest = read_manifest(path)
    return {"bundle": str(path), "version": manifest.version, "index": manifest.index.model_dump(),
            "parity_max_abs_diff": manifest.extra["parity_max_abs_diff"], **metrics}


def dataset_for(spec: dict[str, Any], cfg: TrainConfig, fingerprint: str,
                where: Path) -> SequenceDataset:
    """Rebuild the dataset a model was trained on; refuse if the data changed since."""
    dataset = build_dataset(load_spec(spec), **cfg.split())
    if dataset.fingerprint != fingerprint:
        raise DataError(f"{where}: the data changed since training (fingerprint "
                        f"{dataset.fingerprint} != {fingerprint})")
    return dataset


def evaluate_bundle(path: Path, which: str) -> dict[str, Any]:
    """Evaluate a published bundle with onnxruntime + its FAISS index only (no torch)."""
    bundle = load_bundle(path)
    m = bundle.manifest
    cfg = TrainConfig.from_dict(m.config)
    dataset = dataset_for(m.data_spec, cfg, m.dataset["fingerprint"], path)
    if not np.array_equal(dataset.item_ids[1:].astype(str), bundle.item_ids.astype(str)):
        raise DataError(f"{path}: the bundle's item id map does not match the dataset")
    split = dataset.eval_split(which, m.maxlen)
    return {
        "bundle": str(path), "version": m.version, "dataset": dataset.describe(),
        "backbone": m.backbone, "interests": m.interests, "split": which,
        which: evaluate_encoder(bundle.encode, bundle.search, split),
        "mostpop": most_popular(dataset, split),
    }


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if (args.checkpoint is None) == (args.bundle is None):
        raise DataError("evaluate: give a CHECKPOINT or --bundle DIR (one of them)")
    if args.bundle is not None:
        return evaluate_bundle(Path(args.bundle), args.split)
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


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    try:  # matplotlib is needed by this command only: the others run without it
        from trainer.report import write_report
    except ImportError as exc:
        raise DataError(f"report needs matplotlib ({exc}); pip install -e '.[train]'") from exc
    return write_report(Path(args.run_dir))


def add_publish_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--out", type=Path, default=Path("models") if required else None,
                        help="model store to publish a bundle into (models/<name>/<version>)")
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME, help="model name in the store")
    parser.add_argument("--index", choices=INDEX_KINDS, default="auto",
                        help="FAISS index kind (auto: exact up to 100k items, HNSW above)")


def cmd_nightly(args: argparse.Namespace) -> dict[str, Any] | None:
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["max_epochs"] = args.epochs
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    opts = NightlyOptions(
        redis_url=args.redis_url, stream=args.stream, group=args.group,
        data_dir=Path(args.data_dir), models_dir=Path(args.models), name=args.name,
        tolerance=args.tolerance, train_overrides=overrides,
        crash_after_persist=args.crash_after_persist, progress=not args.no_progress)
    if args.every is None:
        return run_nightly(opts)
    run_every(opts, args.every, print_line)  # returns only when SIGTERM or SIGINT stops it
    return None


def print_line(report: dict[str, Any]) -> None:
    # Flushed: stdout is a pipe under a container runtime, and a cycle may be a day apart.
    print(json.dumps(report, separators=(",", ":"), default=str), flush=True)


def interval_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


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
    t.add_argument("--interest-loss", choices=INTEREST_LOSSES, default=defaults.interest_loss,
                   help="how the K interests score an item in training: max = the best "
                        "interest's score, as retrieval merges (default); argmax = ComiRec's "
                        "readout of the interest closest to the target")
    t.add_argument("--item-text", action="store_true",
                   help="item vectors also see the items' titles and categories (MiniLM "
                        "features, projected; folded into the item table at export)")
    t.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps")
    t.add_argument("--patience", type=int, default=defaults.patience, help="evaluations")
    t.add_argument("--max-minutes", type=float, default=defaults.max_minutes)
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--split-seed", type=int, default=defaults.split_seed)
    t.add_argument("--folds", type=int, default=defaults.folds,
                   help="user-level cross-validation: N folds (0: the 80/10/10 split)")
    t.add_argument("--fold", type=int, default=defaults.fold,
                   help="with --folds: test on this fold, validate on the next (0..N-1)")
    t.add_argument("--threads", type=int, default=defaults.threads)
    t.add_argument("--run-dir", type=Path,
                   help="checkpoint + metrics directory (default $RUNS_DIR/<dataset>-"
                        "<backbone>-.., RUNS_DIR defaulting to runs)")
    g = t.add_argument_group("ESIM (LLM-named interests of typical users, training only)")
    g.add_argument("--esim", action="store_true", help="add the ESIM losses after a warm-up")
    g.add_argument("--llm", choices=LLM_BACKENDS, default=defaults.llm,
                   help="who names the interests: local SmolLM2 (default), an OpenAI-compatible "
                        "endpoint (LLM_BASE_URL, LLM_MODEL, LLM_API_KEY), item categories "
                        "(metadata, no LLM), or ORACLE: the true planted topics of synthetic "
                        "data (an upper bound, no LLM)")
    g.add_argument("--llm-budget", type=int, help="at most this many LLM-labelled users "
                   "(default clusters x users-per-cluster)")
    g.add_argument("--llm-base-url", help="overrides LLM_BASE_URL")
    g.add_argument("--llm-model", help="overrides LLM_MODEL")
    g.add_argument("--llm-cache", type=Path, help="answer cache (overrides LLM_CACHE_DIR)")
    g.add_argument("--esim-warmup-epochs", type=float, default=defaults.esim_warmup_epochs)
    g.add_argument("--esim-clusters", type=int, default=defaults.esim_clusters, help="C")
    g.add_argument("--esim-users-per-cluster", type=int,
                   default=defaults.esim_users_per_cluster, help="m")
    g.add_argument("--esim-labels", type=int, default=defaults.esim_labels,
                   help="interest vocabulary size")
    g.add_argument("--esim-alpha", type=float, default=defaults.esim_alpha, help="L_pred weight")
    g.add_argument("--esim-beta", type=float, default=defaults.esim_beta, help="L_align weight")
    g.add_argument("--esim-tau", type=float, default=defaults.esim_tau,
                   help="InfoNCE temperature")
    g.add_argument("--esim-matching", choices=MATCHING_RULES, default=defaults.esim_matching)
    g.add_argument("--esim-level", choices=ESIM_LEVELS, default=defaults.esim_level,
                   help="who is supervised: typical users (individual), every member of crowds "
                        "of similar users through one synthesized user per crowd (crowd), both")
    g.add_argument("--esim-crowds", type=int, default=defaults.esim_crowds,
                   help="crowds (one labeller call each) at the crowd level")
    g.add_argument("--esim-crowd-items", type=int, default=defaults.esim_crowd_items,
                   help="items of a synthesized user (max-cover prompt budget)")
    g.add_argument("--esim-merge-threshold", type=float,
                   default=defaults.esim_merge_threshold,
                   help="cosine at which a crowd's interests count as one and are merged")
    g.add_argument("--esim-batch-users", type=int, default=defaults.esim_batch_users,
                   help="supervised users in the ESIM losses per training step")
    add_publish_options(t, required=False)
    t.add_argument("--if-missing", action="store_true",
                   help="do nothing if --out already holds a bundle of --name")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    x = sub.add_parser("export", help="publish a saved checkpoint as a model bundle")
    x.add_argument("checkpoint", type=Path, help="checkpoint.pt of a run")
    add_publish_options(x, required=True)
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.set_defaults(func=cmd_export)

    n = sub.add_parser("nightly", help="ingest new events, retrain, gate, publish")
    n.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    n.add_argument("--stream", default=os.environ.get("EVENT_STREAM", EVENT_STREAM))
    n.add_argument("--group", default=EVENT_GROUP, help="Redis consumer group")
    n.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                   help="event partitions, reports and the lock")
    n.add_argument("--models", default=os.environ.get("MODELS_DIR", "models"))
    n.add_argument("--name", default=os.environ.get("MODEL_NAME", DEFAULT_MODEL_NAME))
    n.add_argument("--tolerance", type=float, default=0.005,
                   help="publish unless Recall@50 drops by more than this (absolute)")
    n.add_argument("--epochs", type=int, help="override the served model's max epochs")
    n.add_argument("--max-minutes", type=float, help="override the training time cap")
    n.add_argument("--no-progress", action="store_true")
    # Only the flag makes it loop (not an environment variable): `docker compose exec nightly
    # python -m trainer nightly` in the scheduler's own container must run one cycle and end.
    n.add_argument("--every", type=interval_seconds, metavar="SECONDS",
                   help="keep running: sleep SECONDS, run a cycle, repeat, until SIGTERM/SIGINT "
                        "(default: run once)")
    n.add_argument("--crash-after-persist", action="store_true", help=argparse.SUPPRESS)
    n.set_defaults(func=cmd_nightly)

    e = sub.add_parser("evaluate", help="re-evaluate a saved checkpoint or a published bundle")
    e.add_argument("checkpoint", type=Path, nargs="?", help="checkpoint.pt of a run")
    e.add_argument("--bundle", type=Path, help="a bundle directory models/<name>/<version>")
    e.add_argument("--split", choices=("valid", "test"), default="test")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("report", help="draw a run: validation curve, loss, ESIM interests "
                                      "(RUN_DIR/report.html and report.png)")
    r.add_argument("run_dir", type=Path, help="a training run directory (metrics.json, "
                                             "curve.json, esim/)")
    r.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        report = args.func(args)
    except LockHeld as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except NightlyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (LLMError, EsimError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (DataError, BundleError, ExportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()  # torchrun's process group, if one was joined
    if report is not None:  # None: `nightly --every` printed its reports as it went
        print(json.dumps(report, separators=(",", ":")))
    return 0
