"""The model bundle format: written by the trainer, read by the service (no torch here).

A bundle is a directory `models/<name>/<version>/` (integer versions, TF Serving style):

    encoder.onnx         item_ids int64 [batch, maxlen] -> interests float32 [batch, K, d]
    item_embeddings.npy  float32 [N, d]; row i is internal item id i + 1
    items.faiss          FAISS index over the item embeddings (FAISS's own format)
    items.json           {"item_ids": [N external ids], "titles": [N titles],
                          "text_only": [rows placed by their text],
                          "fields": {field: {value: [rows holding it]}}}
    popularity.npy       int64 [N] training interaction counts (popularity fallback)
    manifest.json        written last; lists every other file with its size and sha256

and, from a model trained with ESIM (optional; a bundle without them answers unnamed):

    naming.json             {"names": [L], "sizes": [L], "min_confidence": c, "calibration": {}}
    naming_vocabulary.npy   float32 [L, 384] unit label vectors (MiniLM space)
    naming_projection.npy   float32 [384, d + 1]: g(v) = P[:, :d] @ v + P[:, d]

A version directory without a manifest is not a bundle and is never chosen. Bundles are built
in a staging directory beside the versions and published by one atomic rename. Nothing is
loaded with pickle.

This module is the format, defined once: file names, the manifest, publishing and listing
versions. It imports neither numpy, FAISS nor onnxruntime, so the trainer and the service's
settings can use it cheaply; loading lives in `service.bundle.load`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENCODER = "encoder.onnx"
ITEM_EMBEDDINGS = "item_embeddings.npy"
INDEX = "items.faiss"
ITEMS = "items.json"
POPULARITY = "popularity.npy"
REQUIRED_FILES = (ENCODER, ITEM_EMBEDDINGS, INDEX, ITEMS, POPULARITY)
NAMING = "naming.json"
NAMING_VOCABULARY = "naming_vocabulary.npy"
NAMING_PROJECTION = "naming_projection.npy"
NAMING_FILES = (NAMING, NAMING_VOCABULARY, NAMING_PROJECTION)
ENCODER_INPUT = "item_ids"
ENCODER_OUTPUT = "interests"
STAGING_PREFIX = ".staging-"
SEMANTIC_DIM = 384  # all-MiniLM-L6-v2's vectors: the interest vocabulary's space
log = logging.getLogger("service.bundle")


class BundleError(RuntimeError):
    """A bundle that cannot be published or loaded; the message names the file."""


class FileInfo(BaseModel):
    bytes: int
    sha256: str


class IndexInfo(BaseModel):
    kind: str  # "flat" (exact), "hnsw" or "ivf"
    factory: str  # faiss.index_factory string it was built from
    search_params: dict[str, int] = {}  # applied at load (efSearch, nprobe)
    recall_at_50: float  # against exact search, on real interest vectors; 1.0 for flat
    build_seconds: float
    # The operating point as measured at export (optional: older bundles lack them).
    build_params: dict[str, int] = {}  # e.g. HNSW efConstruction
    recall_target: float | None = None  # the export's guard raised search_params to reach it
    recall_queries: int | None = None  # interest vectors the recall was measured on
    search_ms_p50: float | None = None  # one request's K interest vectors, 1 FAISS thread
    search_ms_p99: float | None = None
    search_threads: int | None = None
    chosen_by: str | None = None  # "auto (...)", "kind ivf", or the sweep that chose it


class Manifest(BaseModel):
    format_version: int
    name: str
    version: int
    created: str
    git_commit: str | None
    dataset: dict[str, Any]
    data_spec: dict[str, Any]
    config: dict[str, Any]
    backbone: str
    interests: int
    dim: int
    maxlen: int
    item_count: int
    metrics: dict[str, Any]
    index: IndexInfo
    files: dict[str, FileInfo]
    extra: dict[str, Any] = {}


# --- writing -----------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_dirs(root: Path) -> list[int]:
    """All integer-named version directories, complete or not, ascending."""
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def complete_versions(root: Path) -> list[int]:
    """Versions that have a manifest (the only ones that count as bundles), ascending."""
    return [v for v in version_dirs(root) if (root / str(v) / MANIFEST).is_file()]


def latest_version(root: Path) -> int | None:
    versions = complete_versions(root)
    return versions[-1] if versions else None


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def publish(
    models_dir: Path, name: str, write_files: Callable[[Path], None], manifest: dict[str, Any]
) -> Path:
    """Build a bundle in a staging directory, then rename it to the next integer version.

    `write_files(staging)` writes every REQUIRED_FILES entry; `manifest` holds the descriptive
    fields (name, version, created, checksums and format version are filled in here).
    """
    root = Path(models_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0700; a non-root service must read it
        write_files(staging)
        missing = [f for f in REQUIRED_FILES if not (staging / f).is_file()]
        if missing:
            raise BundleError(f"{staging}: bundle is missing {', '.join(missing)}")
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(staging.iterdir()) if p.is_file() and p.name != MANIFEST
        }
        for path in staging.iterdir():  # make the data durable before the manifest exists
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        body = {**manifest, "format_version": FORMAT_VERSION, "name": name,
                "created": datetime.now(UTC).isoformat(timespec="seconds"), "files": files}
        while True:
            version = (version_dirs(root) or [0])[-1] + 1
            body["version"] = version
            Manifest.model_validate(body)
            _write_json_atomic(staging / MANIFEST, body)  # the manifest is written last
            try:
                # Renaming a directory onto an existing non-empty one fails: another
                # publisher took this version, so take the next one.
                os.rename(staging, root / str(version))
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
            return root / str(version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def republish(source: Path, models_dir: Path, name: str,
              extra: dict[str, Any] | None = None) -> Path:
    """Publish the files of an existing bundle as the next version of `name` (e.g. a
    candidate that passed a quality gate); `extra` is merged into the manifest's extra."""
    manifest = read_manifest(source).model_dump()
    body = {k: v for k, v in manifest.items()
            if k not in ("files", "version", "name", "created", "format_version")}
    body["extra"] = {**body.get("extra", {}), **(extra or {})}

    def copy_files(staging: Path) -> None:
        for file in manifest["files"]:
            shutil.copy2(Path(source) / file, staging / file)

    return publish(models_dir, name, copy_files, body)


# --- reading -----------------------------------------------------------------------------------


def read_manifest(path: Path) -> Manifest:
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise BundleError(f"{file}: no manifest (not a complete bundle)")
    try:
        manifest = Manifest.model_validate(json.loads(file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{file}: not valid JSON ({exc})") from exc
    except ValidationError as exc:
        raise BundleError(f"{file}: invalid manifest ({exc.error_count()} errors: "
                          f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']})") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise BundleError(f"{file}: format version {manifest.format_version}, "
                          f"this code reads {FORMAT_VERSION}")
    return manifest


def verify_files(path: Path, manifest: Manifest) -> None:
    """Every listed file exists with its recorded size and checksum; required files listed."""
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise BundleError(f"{path / name}: not listed in the manifest")
    for name, info in manifest.files.items():
        file = path / name
        if Path(name).name != name:
            raise BundleError(f"{path / MANIFEST}: bad file name {name!r}")
        if not file.is_file():
            raise BundleError(f"{file}: missing")
        size = file.stat().st_size
        if size != info.bytes:
            raise BundleError(f"{file}: {size} bytes, manifest says {info.bytes} (truncated?)")
        if sha256_file(file) != info.sha256:
            raise BundleError(f"{file}: checksum mismatch (file changed after publishing)")


# The filterable item fields every bundle carries (items.json "fields"), from the items file:
# `category` (its '|'-separated categories) and `year`. Values are strings. An items file's
# declared fields (the trainer's --item-fields, e.g. brand) are carried beside them.
CATEGORY_FIELD, YEAR_FIELD = "category", "year"
ITEM_FIELDS = (CATEGORY_FIELD, YEAR_FIELD)
# A bundle trained with ESIM also carries each item's ESIM labels (the interest vocabulary's
# names of the semantic interests its supervision put the item in; most items have none).
ESIM_LABEL_FIELD = "esim_label"

FieldPostings = dict[str, dict[str, list[int]]]  # field -> value -> rows (ascending)
VALUE_SEPARATOR = "|"  # an item's several values of one field in an items file: "a|b"


def split_values(joined: str) -> list[str]:
    """'a|b' -> ['a', 'b'] (blank parts dropped): an item's values of a field."""
    return [part.strip() for part in str(joined).split(VALUE_SEPARATOR) if part.strip()]


def field_postings(values_per_item: dict[str, list[list[str]]]) -> FieldPostings:
    """Per field, each item's values (row i: item_ids[i]) -> value -> the rows holding it:
    what a filter needs, in a form that loads without a pass over every item."""
    postings: FieldPostings = {}
    for name, per_item in values_per_item.items():
        by_value: dict[str, list[int]] = {}
        for row, values in enumerate(per_item):
            for value in dict.fromkeys(values):
                by_value.setdefault(value, []).append(row)
        postings[name] = by_value
    return postings


def write_items(path: Path, item_ids: list[str], titles: list[str],
                text_only: list[int] | None = None,
                fields: dict[str, list[list[str]]] | None = None) -> None:
    """items.json: the id map (row i of the index and the item table is item_ids[i]), the
    titles, `text_only`: the rows of items without any interaction, placed by their text
    (trainer/semantics/text_only.py), and `fields`: each item's values per filterable field
    (ITEM_FIELDS), stored as postings (field_postings)."""
    for name, per_item in (fields or {}).items():
        if len(per_item) != len(item_ids):
            raise BundleError(f"{path}: field {name!r} has {len(per_item)} rows, "
                              f"{len(item_ids)} items")
    with open(path, "w") as fh:
        json.dump({"item_ids": item_ids, "titles": titles, "text_only": text_only or [],
                   "fields": field_postings(fields or {})}, fh)


DEFAULT_MODEL_NAME = "recommender"  # models/<name>/: the trainer's default and the service's
