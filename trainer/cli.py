"""Command line: `python -m trainer train|evaluate|export|nightly|report ...`.

The last line `train` and `evaluate` print on stdout is one JSON object of metrics (with
MostPop's beside them); the same object is written to metrics.json in the run directory.
`nightly --every SECONDS` prints one JSON line per cycle instead, until SIGTERM or SIGINT.

This module parses arguments, calls the work (trainer/training/run.py, trainer/jobs/nightly/,
trainer/report/) and maps errors to exit codes. The `train` flags of the configuration are
derived from the TrainConfig fields (trainer/config.py: type, choices, help, flag, group).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import types
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from service.bundle.format import DEFAULT_MODEL_NAME, BundleError
from service.store.events import EVENT_GROUP
from trainer.config import ESIM_GROUP, FLAG, GROUP, HELP, NOT_ON_CLI, TrainConfig
from trainer.data.loaders import FORMATS, DataError, check_field_names
from trainer.data.specs import BUILTIN_DATASETS, data_spec
from trainer.export import INDEX_KINDS, ExportError, publish_bundle
from trainer.jobs.nightly.lock import LockHeld, NightlyError
from trainer.jobs.nightly.options import NightlySettings
from trainer.jobs.nightly.run import run_nightly
from trainer.jobs.nightly.schedule import run_every
from trainer.semantics.esim.objective import EsimError
from trainer.semantics.llm.prompt import LLMError
from trainer.semantics.text_encoder import TextEncoderError
from trainer.training import distributed, run
from trainer.training.run import Publish

log = logging.getLogger("trainer")


# --- TrainConfig fields -> train flags ----------------------------------------------------------


def config_flag(f: Field[Any]) -> str | None:
    """The `train` flag of a TrainConfig field; None for a field marked not on the CLI."""
    if f.metadata.get(NOT_ON_CLI):
        return None
    return f.metadata.get(FLAG) or "--" + f.name.replace("_", "-")


def config_flags() -> dict[str, str]:
    """TrainConfig field name -> its `train` flag, for the fields on the command line."""
    return {f.name: flag for f in fields(TrainConfig) if (flag := config_flag(f)) is not None}


def flag_dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")  # what argparse makes of it


def flag_options(name: str, annotation: Any, default: Any, help: str) -> dict[str, Any]:
    """add_argument keywords for a field of this type: a Literal gives the choices, a bool
    a switch (off by default), `X | None` an optional X."""
    if get_origin(annotation) is Literal:
        return {"choices": get_args(annotation), "default": default, "help": help}
    if annotation is bool:  # --x, and --no-x for a switch that is on by default
        if default is True:
            return {"action": argparse.BooleanOptionalAction, "default": True, "help": help}
        return {"action": "store_true", "help": help}
    if get_origin(annotation) in (Union, types.UnionType):
        inner = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(inner) == 1 and inner[0] in (int, float, str):
            return {"type": inner[0], "default": default, "help": help}
    if annotation in (int, float, str):
        return {"type": annotation, "default": default, "help": help}
    raise TypeError(f"TrainConfig.{name}: no CLI flag for the type {annotation!r}; mark it "
                    "not on the CLI or teach trainer/cli.py flag_options the type")


def add_config_flags(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """A flag for each TrainConfig field on the command line, in field order, in its argument
    group (metadata) if it has one. Returns the groups made, by title."""
    hints = get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        flag = config_flag(f)
        if flag is None:
            continue
        if f.default is MISSING:
            raise TypeError(f"TrainConfig.{f.name}: a field on the CLI needs a plain default")
        title = f.metadata.get(GROUP)
        if title is not None and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = parser if title is None else groups[title]
        target.add_argument(flag, **flag_options(f.name, hints[f.name], f.default,
                                                 f.metadata[HELP]))
    return groups


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{name: getattr(args, flag_dest(flag))
                          for name, flag in config_flags().items()})


# --- commands -----------------------------------------------------------------------------------


def publisher(args: argparse.Namespace) -> Publish | None:
    """publish_bundle into --out (None: no --out, nothing published)."""
    if args.out is None:
        return None
    return functools.partial(publish_bundle, models_dir=Path(args.out), name=args.name,
                             index_kind=args.index, progress=not args.no_progress)


def cmd_train(args: argparse.Namespace) -> dict[str, Any] | None:
    run.join_processes()  # under torchrun: ranks > 0 return None
    if args.if_missing and (bundle := run.published_bundle(args.out, args.name)) is not None:
        return run.skipped_run(bundle)
    llm_overrides = {key: value for key, value in (
        ("base_url", args.llm_base_url), ("model", args.llm_model),
        ("cache_dir", args.llm_cache)) if value is not None}
    return run.train_run(config_from_args(args), data_spec(args), run_dir=args.run_dir,
                         publish=publisher(args), progress=not args.no_progress,
                         llm_overrides=llm_overrides)


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    publish = publisher(args)
    assert publish is not None  # export's --out has a default
    return run.export_checkpoint(Path(args.checkpoint), publish)


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if (args.checkpoint is None) == (args.bundle is None):
        raise DataError("evaluate: give a CHECKPOINT or --bundle DIR (one of them)")
    if args.bundle is not None:
        return run.evaluate_bundle(Path(args.bundle), args.split)
    return run.evaluate_checkpoint(Path(args.checkpoint), args.split)


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    try:  # matplotlib is needed by this command only: the others run without it
        from trainer.report.page import write_report
    except ImportError as exc:
        raise DataError(f"report needs matplotlib ({exc}); pip install -e '.[train]'") from exc
    return write_report(Path(args.run_dir))


def cmd_nightly(args: argparse.Namespace) -> dict[str, Any] | None:
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["max_epochs"] = args.epochs
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    # The environment's settings (service/settings.py names), the flags given winning.
    given = {name: value for name, value in (
        ("redis_url", args.redis_url), ("event_stream", args.stream),
        ("data_dir", args.data_dir), ("models_dir", args.models), ("model_name", args.name))
        if value is not None}
    opts = NightlySettings(**given).options(
        group=args.group, tolerance=args.tolerance, train_overrides=overrides,
        crash_after_persist=args.crash_after_persist, progress=not args.no_progress)
    if args.every is None:
        return run_nightly(opts)
    run_every(opts, args.every, print_line)  # returns only when SIGTERM or SIGINT stops it
    return None


def print_line(report: dict[str, Any]) -> None:
    # Flushed: stdout is a pipe under a container runtime, and a cycle may be a day apart.
    print(json.dumps(report, separators=(",", ":"), default=str), flush=True)


def field_list(text: str) -> tuple[str, ...]:
    """--item-fields brand,color -> ("brand", "color"), each name checked."""
    try:
        return check_field_names([part.strip() for part in text.split(",") if part.strip()])
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--item-fields: ")) from exc


def interval_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


# --- parser -------------------------------------------------------------------------------------


def add_publish_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--out", type=Path, default=Path("models") if required else None,
                        help="model store to publish a bundle into (models/<name>/<version>)")
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME, help="model name in the store")
    parser.add_argument("--index", choices=INDEX_KINDS, default="auto",
                        help="FAISS index kind (auto: exact up to 100k items, HNSW above)")


def setting_help(name: str) -> str:
    """A nightly flag's help: the setting's description and environment variable."""
    info = NightlySettings.model_fields[name]
    return f"{info.description} (default: ${name.upper()}, else {info.default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer",
                                     description="Train and evaluate multi-interest encoders.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an IBIM encoder and report test metrics")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=BUILTIN_DATASETS, default="movielens-small",
                     help="an embedded dataset (default: movielens-small)")
    src.add_argument("--data", type=Path, help="your interactions file or MovieLens folder")
    t.add_argument("--items", type=Path, help="items file (or Amazon metadata) for --data")
    t.add_argument("--format", choices=FORMATS, default="auto", help="format of --data")
    t.add_argument("--item-fields", type=field_list, default=(), metavar="NAME,..",
                   help="columns of --items the bundle carries as filterable fields beside "
                        "category and year (values '|'-separated), e.g. brand,color")
    t.add_argument("--synthetic", help="synthetic options, e.g. users=2000,items=2000,topics=40")
    groups = add_config_flags(t)
    t.add_argument("--run-dir", type=Path,
                   help="checkpoint + metrics directory (default $RUNS_DIR/<dataset>-"
                        "<backbone>-.., RUNS_DIR defaulting to runs)")
    esim = groups[ESIM_GROUP]  # the LLM endpoint's overrides join the ESIM flags
    esim.add_argument("--llm-base-url", help="overrides LLM_BASE_URL")
    esim.add_argument("--llm-model", help="overrides LLM_MODEL")
    esim.add_argument("--llm-cache", type=Path, help="answer cache (overrides LLM_CACHE_DIR)")
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

    # Defaults from the environment (NightlySettings, read when the command runs).
    n = sub.add_parser("nightly", help="ingest new events, retrain, gate, publish")
    n.add_argument("--redis-url", help=setting_help("redis_url"))
    n.add_argument("--stream", help=setting_help("event_stream"))
    n.add_argument("--group", default=EVENT_GROUP, help="Redis consumer group")
    n.add_argument("--data-dir", help=setting_help("data_dir"))
    n.add_argument("--models", help=setting_help("models_dir"))
    n.add_argument("--name", help=setting_help("model_name"))
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
    except (LLMError, EsimError, TextEncoderError) as exc:
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
