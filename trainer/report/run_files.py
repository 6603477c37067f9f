"""A finished training run's files, read and checked: metrics.json, curve.json and, with ESIM,
esim/interests.json, esim/crowds.json and esim/vocabulary.json (what `trainer.report` draws).

A missing or malformed file is a DataError naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.data.loaders import DataError


@dataclass
class Named:
    """One interest the labeller named for one typical user or crowd."""

    name: str
    description: str
    items: list[str]  # the prompt lines (title, year, categories) it was given
    members: int | None = None  # crowd members that inherit it (crowd level only)


@dataclass
class Labelled:
    """A typical user, or a crowd's synthesized user, and what the labeller said."""

    who: str
    prompt_items: int
    interests: list[Named]
    members: int | None = None  # crowd only: members, supervised members, before merging
    supervised: int | None = None
    before_merge: int | None = None


@dataclass
class InterestSize:
    """An interest name over the whole run: whom and what it covers."""

    name: str
    description: str
    users: int = 0  # typical users it was named for
    crowds: int = 0  # crowds it was named for
    members: int = 0  # crowd members that inherit it
    items: set[str] = field(default_factory=set)  # distinct items given to it

    @property
    def covered(self) -> int:
        return self.users + self.members


@dataclass
class Run:
    path: Path
    metrics: dict[str, Any]
    curve: list[dict[str, Any]]
    users: list[Labelled] = field(default_factory=list)
    crowds: list[Labelled] = field(default_factory=list)
    vocabulary: dict[str, list[str]] = field(default_factory=dict)

    @property
    def train(self) -> dict[str, Any]:
        return self.metrics["train"]

    @property
    def selection(self) -> str:
        return self.train.get("selection_metric", "recall@50")  # runs before it was recorded

    @property
    def esim(self) -> dict[str, Any] | None:
        return self.metrics.get("esim")


def read_json(path: Path, required: bool = True) -> Any:
    if not path.is_file():
        if required:
            raise DataError(f"{path}: not found (is {path.parent} a finished training run?)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from exc


def check(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise DataError(f"{path}: {what}")


def named(raw: dict[str, Any], lines: Sequence[str]) -> Named:
    # Item numbers are 1-based positions in the prompt's list.
    return Named(name=str(raw["name"]).strip(), description=str(raw.get("description", "")),
                 items=[str(lines[n - 1]) for n in raw.get("items", []) if 0 < n <= len(lines)],
                 members=raw.get("members"))


def load_run(run_dir: Path) -> Run:
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: not a run directory")
    path = run_dir / "metrics.json"
    metrics = read_json(path)
    check(isinstance(metrics, dict), path, "not a training report (expected a JSON object)")
    for key in ("train", "valid", "test"):
        check(isinstance(metrics.get(key), dict), path, f"no {key!r} object (not a training "
              "report of `python -m trainer train`)")
    check(isinstance(metrics["train"].get("best_step"), int), path, "no train.best_step")
    check(isinstance(metrics.get("esim"), dict | None), path, "'esim' is not an object")
    path = run_dir / "curve.json"
    curve = read_json(path)
    check(isinstance(curve, list) and all(isinstance(p, dict) and isinstance(p.get("step"), int)
                                          for p in curve),
          path, "not a validation curve (expected a list of objects with a step)")
    run = Run(run_dir, metrics, curve)
    if run.esim is None:  # esim/ files left by an earlier run in this directory are not its
        return run

    esim_dir = run_dir / "esim"
    path = esim_dir / "interests.json"
    raw = read_json(path, required=False)
    try:  # the ESIM files are the trainer's own; a KeyError means a damaged or foreign file
        run.users = [Labelled(who=str(u["user_id"]), prompt_items=len(u["items"]),
                              interests=[named(i, u["items"]) for i in u["interests"]])
                     for u in raw or []]
        path = esim_dir / "crowds.json"
        raw = read_json(path, required=False)
        run.crowds = [Labelled(who=f"crowd {c['crowd']}", prompt_items=c["synthesized_items"],
                               interests=[named(i, c.get("items", []))
                                          for i in c.get("interests", [])],
                               members=c["members"], supervised=c["supervised_members"],
                               before_merge=c["interests_before_merge"])
                      for c in raw or []]
        path = esim_dir / "vocabulary.json"
        raw = read_json(path, required=False)
        run.vocabulary = {str(label): [str(t) for t in texts]
                          for label, texts in (raw or {}).items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: unexpected content ({type(exc).__name__}: {exc})") from exc
    return run


def interest_sizes(run: Run) -> list[InterestSize]:
    """Every interest name with the users, crowd members and distinct items it covers, the
    widest first."""
    sizes: dict[str, InterestSize] = {}
    for labelled in [*run.users, *run.crowds]:
        for interest in labelled.interests:
            size = sizes.setdefault(interest.name, InterestSize(interest.name,
                                                                interest.description))
            if labelled.members is None:
                size.users += 1
            else:
                size.crowds += 1
                size.members += interest.members or 0  # older runs did not record it
            size.items.update(interest.items)
    return sorted(sizes.values(), key=lambda s: (-s.covered, -len(s.items), s.name))
