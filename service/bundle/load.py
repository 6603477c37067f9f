"""Loading a bundle for serving: verify checksums, open the ONNX encoder and the FAISS index, check
shapes, run a smoke test.

Loading memory-maps the large files (read-only, `mmap=True`), so that N worker processes
serving one bundle share one copy in the page cache instead of holding N: the FAISS index
(faiss.IO_FLAG_MMAP_IFC, zero-copy; flat, IVF and HNSW indexes all map), the .npy arrays
(numpy memmap), and the encoder's large embedding tables (its N x d item table is as big as
the index; see `service.bundle.mmap`). items.json is parsed into Python objects in each process.
A published bundle's files are never modified in place (a new version is a new directory), which
is what makes mapping them safe: deleting a mapped file keeps its pages alive until unmapped.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort

from service.bundle.format import (
    ENCODER,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    INDEX,
    ITEM_EMBEDDINGS,
    ITEMS,
    MANIFEST,
    NAMING,
    POPULARITY,
    BundleError,
    Manifest,
    read_manifest,
    verify_files,
)
from service.bundle.mmap import IndexReadError, map_encoder_tables, read_index
from service.bundle.naming_files import NamingTables, _load_npy, read_naming

log = logging.getLogger("service.bundle")


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
    # Filterable fields: field -> value -> the rows holding it (int64, ascending).
    fields: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # What is memory-mapped ("index", "item_embeddings.npy", "encoder:<initializer>", ...).
    mapped: tuple[str, ...] = ()
    # Arrays that back the session's mapped initializers: they must outlive the session.
    pinned: tuple[Any, ...] = ()
    naming: NamingTables | None = None  # bundles trained with ESIM
    # Items without any event, placed by their text at export (items.json `text_only`):
    # ascending rows, and the same as a mask by row.
    text_only_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @functools.cached_property
    def is_new(self) -> np.ndarray:
        """[N] bool: the text-only rows (computed once per bundle)."""
        mask = np.zeros(len(self.item_ids), dtype=bool)
        mask[self.text_only_rows] = True
        return mask

    @property
    def version(self) -> int:
        return self.manifest.version

    def encode(self, histories: np.ndarray) -> np.ndarray:
        """Right-aligned int64 histories [B, maxlen] -> interests float32 [B, K, d]."""
        return self.session.run([ENCODER_OUTPUT], {ENCODER_INPUT: histories})[0]

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the top-n items for each query vector; rows are 0-based."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), n)


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
        fields = {str(name): {str(value): np.asarray(rows, dtype=np.int64)
                              for value, rows in values.items()}
                  for name, values in (items.get("fields") or {}).items()}
        text_only = np.unique(np.asarray(items.get("text_only") or [], dtype=np.int64))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError,
            UnicodeDecodeError) as exc:
        raise BundleError(f"{path / ITEMS}: unreadable id map ({exc})") from exc
    if len(item_ids) != n or len(titles) != n:
        raise BundleError(f"{path / ITEMS}: {len(item_ids)} ids, manifest says {n}")
    for name, values in fields.items():
        for value, rows in values.items():
            if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= n)):
                raise BundleError(f"{path / ITEMS}: field {name!r} value {value!r} lists rows "
                                  f"outside the catalogue of {n}")
    if len(text_only) and (text_only[0] < 0 or text_only[-1] >= n):
        raise BundleError(f"{path / ITEMS}: `text_only` lists rows outside the catalogue of {n}")
    naming = read_naming(path, d) if NAMING in manifest.files else None
    bundle = Bundle(path, manifest, session, index, vectors, item_ids, titles, popularity,
                    fields=fields, mapped=tuple(mapped), pinned=tuple(pinned), naming=naming,
                    text_only_rows=text_only)
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
