"""The optional naming files of a bundle (ESIM's interest vocabulary and projection g): written
by the trainer, read by the service.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle.format import (
    NAMING,
    NAMING_FILES,
    NAMING_PROJECTION,
    NAMING_VOCABULARY,
    SEMANTIC_DIM,
    BundleError,
)

log = logging.getLogger("service.bundle")


@dataclass(frozen=True)
class NamingTables:
    """The interest vocabulary and ESIM's projection g (module docstring;
    docs/architecture.md, "Named interests")."""

    names: list[str]
    sizes: list[int]
    vocabulary: np.ndarray  # [L, 384]
    projection: np.ndarray  # [384, d]
    bias: np.ndarray  # [384]
    min_confidence: float
    calibration: dict[str, Any]
    # Training only (the bundle carries them as the item field ESIM_LABEL_FIELD): internal item
    # id -> the vocabulary rows of the semantic interests ESIM's supervision put it in.
    item_labels: dict[int, tuple[int, ...]] = field(default_factory=dict)


def _load_npy(file: Path, shape: tuple[int, ...], dtype: type, mmap: bool = False
              ) -> np.ndarray:
    try:
        array = np.load(file, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError) as exc:
        raise BundleError(f"{file}: cannot load ({exc})") from exc
    if array.shape != shape or array.dtype != dtype:
        raise BundleError(f"{file}: {array.dtype}{list(array.shape)}, expected "
                          f"{np.dtype(dtype)}{list(shape)}")
    return array


def write_naming(directory: Path, naming: NamingTables) -> None:
    """The naming files of a bundle (written by the trainer into its staging directory)."""
    with open(directory / NAMING, "w") as fh:
        json.dump({"names": naming.names, "sizes": naming.sizes,
                   "min_confidence": naming.min_confidence,
                   "calibration": naming.calibration}, fh, indent=1)
    np.save(directory / NAMING_VOCABULARY, naming.vocabulary.astype(np.float32))
    np.save(directory / NAMING_PROJECTION,
            np.concatenate([naming.projection, naming.bias[:, None]], axis=1).astype(np.float32))


def read_naming(path: Path, dim: int) -> NamingTables:
    missing = [f for f in NAMING_FILES if not (path / f).is_file()]
    if missing:
        raise BundleError(f"{path / missing[0]}: missing (the bundle has {NAMING})")
    try:
        meta = json.loads((path / NAMING).read_text())
        names = [str(n) for n in meta["names"]]
        sizes = [int(n) for n in meta["sizes"]]
        min_confidence = float(meta["min_confidence"])
        calibration = dict(meta.get("calibration") or {})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path / NAMING}: unreadable ({exc})") from exc
    vocabulary = _load_npy(path / NAMING_VOCABULARY, (len(names), SEMANTIC_DIM), np.float32)
    projection = _load_npy(path / NAMING_PROJECTION, (SEMANTIC_DIM, dim + 1), np.float32)
    if len(sizes) != len(names) or not names:
        raise BundleError(f"{path / NAMING}: {len(names)} names and {len(sizes)} sizes")
    return NamingTables(names=names, sizes=sizes, vocabulary=vocabulary,
                        projection=np.ascontiguousarray(projection[:, :dim]),
                        bias=np.ascontiguousarray(projection[:, dim]),
                        min_confidence=min_confidence, calibration=calibration)
