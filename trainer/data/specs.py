"""Data specs: how a run names its data, so that `evaluate`, `export` and the nightly job can
rebuild exactly the data (and split) a model was trained on."""

from __future__ import annotations

import argparse
from typing import Any

from trainer.data.loaders import DataError, RawData, load_movielens_small, load_path, with_event_log
from trainer.data.synthetic import make_synthetic

BUILTIN_DATASETS = ("movielens-small", "synthetic")


def data_spec(args: argparse.Namespace) -> dict[str, Any]:
    if args.item_fields and not args.data:
        raise DataError("--item-fields: the fields come from your items file (--data with "
                        "--items); the embedded datasets declare none")
    if args.data:
        # Absolute, so that `evaluate` works from any directory.
        return {"data": str(args.data.resolve()),
                "items": str(args.items.resolve()) if args.items else None,
                "format": args.format, "item_fields": list(args.item_fields)}
    if args.dataset == "synthetic":
        return {"synthetic": parse_synthetic(args.synthetic)}
    return {"dataset": args.dataset}


def parse_synthetic(text: str | None) -> dict[str, int | float]:
    """'users=2000,items=2000,topics=40,interests=4' -> make_synthetic keyword arguments."""
    names = {"users": "n_users", "items": "n_items", "topics": "n_topics",
             "interests": "interests_per_user", "min_len": "min_len", "max_len": "max_len",
             "stickiness": "stickiness", "zipf": "zipf", "seed": "seed"}
    out: dict[str, int | float] = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in names or not value:
            raise DataError(f"--synthetic: bad entry {part!r}; keys are {', '.join(names)}")
        number = float(value)
        fractional = key.strip() in ("stickiness", "zipf")
        out[names[key.strip()]] = int(number) if number.is_integer() and not fractional \
            else number
    return out


def load_spec(spec: dict[str, Any]) -> RawData:
    if "events" in spec:  # the nightly job's: base data + the persisted event log
        return with_event_log(load_spec(spec["base"]), spec["events"])
    if "data" in spec:
        return load_path(spec["data"], spec.get("items"), spec.get("format", "auto"),
                         tuple(spec.get("item_fields") or ()))
    if "synthetic" in spec:
        return make_synthetic(**spec["synthetic"])
    if spec.get("dataset") == "movielens-small":
        return load_movielens_small()
    raise DataError(f"unknown dataset {spec!r}")


