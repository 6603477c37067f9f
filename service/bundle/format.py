"""The model bundle format: written by the trainer, read by the service (no torch here).

A bundle is a directory `models/<name>/<version>/` (integer versions, TF Serving style):

    encoder.onnx         item_ids int64 [batch, maxlen] -> interests float32 [batch, K, d]
    item_embeddings.npy  float32 [N, d]; row i is internal item id i + 1
    items.faiss          FAISS index over the item embeddings (FAISS's own format)
    items.json           {"item_ids": [N external ids], "titles": [N titles]}
    popularity.npy       int64 [N] training interaction counts (popularity fallback)
    manifest.json        written last; lists every other file with its size and sha256

and, from a model trained with ESIM (optional; a bundle without them answers unnamed):

    naming.json             {"names": [L], "sizes": [L], "min_confidence": c, "calibration": {}}
    naming_vocabulary.npy   float32 [L, 384] unit label vectors (MiniLM space)
    naming_projection.npy   float32 [384, d + 1]: g(v) = P[:, :d] @ v + P[:, d]

A version directory without a manifest is not a bundle and is never chosen. Bundles are built
in a staging directory beside the versions and published by one atomic rename. Nothing is
loaded with pickle.

Loading memory-maps the large files (read-only, `mmap=True`), so that N worker processes
serving one bundle share one copy in the page cache instead of holding N: the FAISS index
(faiss.IO_FLAG_MMAP_IFC, zero-copy; flat, IVF and HNSW indexes all map), the .npy arrays
(numpy memmap), and the encoder's large embedding tables (its N x d item table is as big as
the index; see `service.mapping`). items.json is parsed into Python objects in each process.
A published bundle's files are never modified in place (a new version is a new directory), which
is what makes mapping them safe: deleting a mapped file keeps its pages alive until unmapped.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ValidationError

from service.mapping import IndexReadError, map_encoder_tables, read_index
from service.names import DEFAULT_MODEL_NAME  # noqa: F401 (service.bundle.DEFAULT_MODEL_NAME)

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


@dataclass(frozen=True)
class NamingTables:
    """The interest vocabulary and ESIM's projection g (module docstring, DESIGN 5.8)."""

    names: list[str]
    sizes: list[int]
    vocabulary: np.ndarray  # [L, 384]
    projection: np.ndarray  # [384, d]
    bias: np.ndarray  # [384]
    min_confidence: float
    calibration: dict[str, Any]


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    session: ort.InferenceSession
    index: faiss.Index
    item_vectors: np.ndarray  # [N, d]
    item_ids: np.ndarray  # external ids (str), row i = internal id i + 1
    titles: np.ndarray
    popularity: np.ndarray  # [N]
    # What is memory-mapped ("index", "item_embeddings.npy", "encoder:<initializer>", ...).
    mapped: tuple[str, ...] = ()
    # Arrays that back the session's mapped initializers: they must outlive the session.
    pinned: tuple[Any, ...] = ()
    naming: NamingTables | None = None  # bundles trained with ESIM

    @property
    def version(self) -> int:
        return self.manifest.version

    def encode(self, histories: np.ndarray) -> np.ndarray:
        """Right-aligned int64 histories [B, maxlen] -> interests float32 [B, K, d]."""
        return self.session.run([ENCODER_OUTPUT], {ENCODER_INPUT: histories})[0]

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the top-n items for each query vector; rows are 0-based."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), n)


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


def load_bundle(path: Path | str, threads: int = 1, verify: bool = True,
                mmap: bool = True) -> Bundle:
    """Load and check a bundle; any defect raises BundleError naming the file. With `mmap`,
    the large files are memory-mapped where the format allows (module docstring)."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    n, d = manifest.item_count, manifest.dim
    mapped: list[str] = []
    pinned: list[Any] = []
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if mmap:
            for name, array in map_encoder_tables(path / ENCODER):
                value = ort.OrtValue.ortvalue_from_numpy(array)  # no copy: wraps the mapping
                options.add_initializer(name, value)
                pinned += [array, value]
                mapped.append(f"encoder:{name}")
        session = ort.InferenceSession(str(path / ENCODER), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"{path / ENCODER}: cannot load ({exc})") from exc
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [ENCODER_INPUT] or outputs != [ENCODER_OUTPUT]:
        raise BundleError(f"{path / ENCODER}: graph has inputs {inputs} and outputs {outputs}")
    # The manifest has no checksum of its own: check what it says against the graph.
    _check_dims(path, "input", session.get_inputs()[0].shape, [None, manifest.maxlen],
                ["maxlen"])
    _check_dims(path, "output", session.get_outputs()[0].shape,
                [None, manifest.interests, manifest.dim], ["interests", "dim"])
    try:
        index, index_mapped = read_index(path / INDEX, mmap)
    except IndexReadError as exc:
        raise BundleError(str(exc)) from exc
    if index_mapped:
        mapped.append("index")
    if index.ntotal != n or index.d != d:
        raise BundleError(f"{path / INDEX}: {index.ntotal} x {index.d}, manifest says {n} x {d}")
    for key, value in manifest.index.search_params.items():
        try:
            faiss.ParameterSpace().set_index_parameter(index, key, value)
        except RuntimeError as exc:
            raise BundleError(f"{path / MANIFEST}: bad index parameter {key}={value}") from exc
    vectors = _load_npy(path / ITEM_EMBEDDINGS, (n, d), np.float32, mmap)
    popularity = _load_npy(path / POPULARITY, (n,), np.int64, mmap)
    if mmap:
        mapped += [ITEM_EMBEDDINGS, POPULARITY]
    try:
        items = json.loads((path / ITEMS).read_text())
        item_ids = np.array([str(i) for i in items["item_ids"]], dtype=object)
        titles = np.array(items.get("titles") or [""] * n, dtype=object)
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path / ITEMS}: unreadable id map ({exc})") from exc
    if len(item_ids) != n or len(titles) != n:
        raise BundleError(f"{path / ITEMS}: {len(item_ids)} ids, manifest says {n}")
    naming = read_naming(path, d) if NAMING in manifest.files else None
    bundle = Bundle(path, manifest, session, index, vectors, item_ids, titles, popularity,
                    mapped=tuple(mapped), pinned=tuple(pinned), naming=naming)
    smoke_test(bundle)
    return bundle


def _check_dims(path: Path, which: str, shape: list[Any], expected: list[int | None],
                names: list[str]) -> None:
    """Static dimensions of the encoder's input/output must be what the manifest says
    (None: any; a symbolic dimension such as "batch" matches anything)."""
    if len(shape) != len(expected):
        raise BundleError(f"{path / ENCODER}: {which} has shape {shape}, expected "
                          f"{len(expected)} dimensions")
    for got, want, name in zip(shape[1:], expected[1:], names, strict=True):
        if isinstance(got, int) and got != want:
            raise BundleError(f"{path / ENCODER}: {which} dimension {got}, but the manifest "
                              f"says {name}={want}")


def smoke_test(bundle: Bundle) -> None:
    """One inference and one search, as a request would run them, before the bundle may
    serve: a bundle that loads but cannot answer is refused here, not at the first user."""
    m = bundle.manifest
    row = np.zeros((1, m.maxlen), dtype=np.int64)
    row[0, -min(m.maxlen, m.item_count):] = np.arange(1, min(m.maxlen, m.item_count) + 1)
    try:
        interests = bundle.encode(row)
        if interests.shape != (1, m.interests, m.dim):
            raise BundleError(f"{bundle.path / ENCODER}: test inference gave shape "
                              f"{list(interests.shape)}, manifest says "
                              f"[1, {m.interests}, {m.dim}]")
        if not np.isfinite(interests).all():
            raise BundleError(f"{bundle.path / ENCODER}: test inference gave non-finite values")
        scores, rows = bundle.search(interests[0], min(10, m.item_count))
    except BundleError:
        raise
    except Exception as exc:  # onnxruntime and FAISS raise their own types
        raise BundleError(f"{bundle.path}: test inference failed ({exc})") from exc
    if rows.shape != (m.interests, min(10, m.item_count)) or rows.max() >= m.item_count:
        raise BundleError(f"{bundle.path / INDEX}: test search returned rows outside the "
                          f"catalogue")


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


def write_items(path: Path, item_ids: list[str], titles: list[str]) -> None:
    with open(path, "w") as fh:
        json.dump({"item_ids": item_ids, "titles": titles}, fh)



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
