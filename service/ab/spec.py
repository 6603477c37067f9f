"""AB_VARIANTS and AB_EXPERIMENT, parsed and checked once at start (the settings refuse bad
ones)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VARIANT = "default"  # the one variant served when AB_VARIANTS is unset
VARIANT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")  # a metric label and a Redis key part
MODEL_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")  # one directory, no "..".
EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ENTRY = re.compile(r"^(?P<name>[^=]*)=(?P<model>[^@:]*)(?:@(?P<version>[^:]*))?"
                    r"(?::(?P<share>.*))?$")
SHARE_TOLERANCE = 1e-6  # shares must add up to 1 within this


@dataclass(frozen=True)
class VariantSpec:
    name: str
    model: str  # model name: the bundles in MODELS_DIR/<model>/
    version: int | None  # pinned version; None: the newest, hot-reloaded
    share: float  # fraction of users, in [0, 1]

    @property
    def label(self) -> str:
        return self.model if self.version is None else f"{self.model}@{self.version}"


def parse_variants(text: str, models_dir: Path | None = None) -> list[VariantSpec]:
    """AB_VARIANTS -> the variants, or ValueError saying what is wrong.

    Shares: if none is given the users are split equally; otherwise at most one variant may
    leave its share out and gets what the others leave; they must add up to 1. With
    `models_dir`, every model directory (and pinned version) must exist: a typo would
    otherwise leave the service unready forever.
    """
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise ValueError("AB_VARIANTS is empty: give at least one name=model[@version][:share]")
    parsed: list[tuple[str, str, int | None, float | None]] = []
    for entry in entries:
        match = _ENTRY.fullmatch(entry)
        if match is None:
            raise ValueError(f"AB_VARIANTS entry {entry!r}: expected name=model[@version][:share]"
                             f", e.g. control=recommender:0.5")
        name, model = match["name"].strip(), match["model"].strip()
        if not VARIANT_NAME.fullmatch(name):
            raise ValueError(f"AB_VARIANTS entry {entry!r}: variant name {name!r} must be 1..32 "
                             f"letters, digits, '_' or '-'")
        if not MODEL_NAME.fullmatch(model):
            raise ValueError(f"AB_VARIANTS entry {entry!r}: model name {model!r} must be a "
                             f"directory name in MODELS_DIR (letters, digits, '.', '_', '-')")
        version: int | None = None
        if match["version"] is not None:
            if not re.fullmatch(r"[0-9]+", match["version"]) or int(match["version"]) < 1:
                raise ValueError(f"AB_VARIANTS entry {entry!r}: version {match['version']!r} "
                                 f"must be a positive integer")
            version = int(match["version"])
        share: float | None = None
        if match["share"] is not None:
            try:
                share = float(match["share"])
            except ValueError:
                raise ValueError(f"AB_VARIANTS entry {entry!r}: share {match['share']!r} is "
                                 f"not a number") from None
            if not 0 <= share <= 1:  # also refuses NaN
                raise ValueError(f"AB_VARIANTS entry {entry!r}: share {share} is not in [0, 1]")
        parsed.append((name, model, version, share))

    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"AB_VARIANTS: variant names must differ; repeated: {', '.join(dupes)}")
    given = [p[3] for p in parsed if p[3] is not None]
    missing = len(parsed) - len(given)
    if not given:
        shares = [1 / len(parsed)] * len(parsed)
    elif missing > 1:
        raise ValueError("AB_VARIANTS: give every variant's share, or leave out exactly one "
                         "(it gets the rest), or none (equal split)")
    else:
        rest = 1 - sum(given)
        if missing and rest < -SHARE_TOLERANCE:
            raise ValueError(f"AB_VARIANTS: the shares given add up to {sum(given):g}, over 1")
        shares = [p[3] if p[3] is not None else max(rest, 0.0) for p in parsed]
    if abs(sum(shares) - 1) > SHARE_TOLERANCE:
        raise ValueError(f"AB_VARIANTS: shares add up to {sum(shares):g}; they must add up to 1")
    specs = [VariantSpec(n, m, v, s) for (n, m, v, _), s in zip(parsed, shares, strict=True)]
    if models_dir is not None:
        for spec in specs:
            root = Path(models_dir) / spec.model
            if not root.is_dir():
                raise ValueError(f"AB_VARIANTS: variant {spec.name!r}: no model {spec.model!r} "
                                 f"({root} is not a directory)")
            if spec.version is not None and not (root / str(spec.version)).is_dir():
                raise ValueError(f"AB_VARIANTS: variant {spec.name!r}: pinned version "
                                 f"{spec.version} of {spec.model!r} does not exist "
                                 f"({root / str(spec.version)})")
    return specs


def check_experiment(name: str) -> str:
    if not EXPERIMENT_NAME.fullmatch(name):  # match: `$` passes a final \n
        raise ValueError(f"AB_EXPERIMENT={name!r}: 1..64 letters, digits, '.', '_' or '-' (it "
                         f"is part of Redis key names)")
    return name
