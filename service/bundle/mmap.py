"""Memory-mapped loading of a bundle's large files (service.bundle's `load_bundle(mmap=True)`).

N worker processes serving one bundle then share one copy in the page cache instead of holding
N: the FAISS index (faiss.IO_FLAG_MMAP_IFC, zero-copy) and the encoder's embedding tables,
read in place out of encoder.onnx by a minimal protobuf walk (the `onnx` package is a trainer
dependency, not a service one). Anything unexpected maps nothing and says why in the log.
"""

from __future__ import annotations

import logging
import mmap as mmap_module
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger("service.bundle")

# Encoder initializers at least this large are memory-mapped (the item embedding table); the
# rest (attention weights, a few KB to MB) are left to onnxruntime.
MMAP_MIN_BYTES = 1 << 20


class IndexReadError(RuntimeError):
    """The index file cannot be read at all (service.bundle turns it into a BundleError)."""


def read_index(file: Path, mmap: bool) -> tuple[faiss.Index, bool]:
    """The FAISS index, memory-mapped read-only where this FAISS supports it (True), else read
    into memory (False, with the reason logged)."""
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", None)  # FAISS >= 1.11: zero-copy for any index
    if mmap and flag is not None:
        try:
            return faiss.read_index(str(file), flag | faiss.IO_FLAG_READ_ONLY), True
        except RuntimeError as exc:
            log.warning("index not memory-mapped; reading it into memory",
                        extra={"index": str(file), "reason": str(exc).splitlines()[0][:300]})
    elif mmap:
        log.warning("index not memory-mapped; reading it into memory",
                    extra={"index": str(file), "reason": f"faiss {faiss.__version__} has no "
                                                         f"IO_FLAG_MMAP_IFC (needs >= 1.11)"})
    try:
        return faiss.read_index(str(file)), False
    except RuntimeError as exc:
        raise IndexReadError(f"{file}: cannot load ({exc})") from exc


# ONNX TensorProto data types that map onto numpy dtypes one to one.
_ONNX_DTYPES: dict[int, type] = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32,
                                 7: np.int64, 10: np.float16, 11: np.float64}


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Any:
    """(field number, wire type, varint value, (start, end) of a length-delimited value) of
    one protobuf message; values are not copied, so walking a 1 GB model is cheap."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, None
        elif wire == 2:
            size, pos = _varint(buf, pos)
            yield number, wire, 0, (pos, pos + size)
            pos += size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, wire, 0, (pos, pos + size)
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")


def _encoder_tables(buf: Any, min_bytes: int) -> list[tuple[str, type, list[int], int]]:
    """(name, dtype, dims, file offset) of the model's large raw initializers that are only
    ever read by Gather as its data input (embedding tables). Gather copies rows with no
    alignment needs, which is what lets a table be used in place from the file."""
    graph = next((span for number, wire, _, span in _fields(buf, 0, len(buf))
                  if number == 7 and wire == 2), None)  # ModelProto.graph
    if graph is None:
        return []
    tables: dict[str, tuple[type, list[int], int]] = {}
    gather_data: set[str] = set()
    other_uses: set[str] = set()
    for number, wire, _, span in _fields(buf, *graph):
        if number == 1 and wire == 2:  # GraphProto.node
            op, inputs = "", []
            for n, w, _, s in _fields(buf, *span):
                if n == 1 and w == 2:
                    inputs.append(bytes(buf[s[0]:s[1]]).decode())
                elif n == 4 and w == 2:
                    op = bytes(buf[s[0]:s[1]]).decode()
            if op in ("If", "Loop", "Scan"):  # subgraphs may use any name: map nothing
                return []
            if op == "Gather" and inputs:
                gather_data.add(inputs[0])
                other_uses.update(inputs[1:])
            else:
                other_uses.update(inputs)
        elif number == 5 and wire == 2:  # GraphProto.initializer (a TensorProto)
            dims: list[int] = []
            dtype, name, raw, external = 0, "", None, False
            for n, w, v, s in _fields(buf, *span):
                if n == 1 and w == 0:
                    dims.append(v)
                elif n == 1 and w == 2:  # packed dims
                    pos = s[0]
                    while pos < s[1]:
                        v, pos = _varint(buf, pos)
                        dims.append(v)
                elif n == 2 and w == 0:
                    dtype = v
                elif n == 8 and w == 2:
                    name = bytes(buf[s[0]:s[1]]).decode()
                elif n == 9 and w == 2:
                    raw = s
                elif n == 14 and w == 0:
                    external = v == 1
            np_dtype = _ONNX_DTYPES.get(dtype)
            if (raw is not None and not external and np_dtype is not None and name
                    and raw[1] - raw[0] >= min_bytes
                    and raw[1] - raw[0] == int(np.prod(dims)) * np.dtype(np_dtype).itemsize):
                tables[name] = (np_dtype, dims, raw[0])
    return [(name, *info) for name, info in tables.items()
            if name in gather_data and name not in other_uses]


def map_encoder_tables(file: Path, min_bytes: int | None = None
                        ) -> list[tuple[str, np.ndarray]]:
    """The encoder's embedding tables as read-only memory maps of encoder.onnx itself.

    The item table is N x d, as large as the FAISS index; onnxruntime would copy it into each
    process. Handed to the session as user initializers, the mapped arrays are used in place
    and shared by every process through the page cache. Anything unexpected maps nothing
    (logged): onnxruntime then loads the model as usual.
    """
    try:
        with open(file, "rb") as fh, \
                mmap_module.mmap(fh.fileno(), 0, access=mmap_module.ACCESS_READ) as buf:
            found = _encoder_tables(buf, MMAP_MIN_BYTES if min_bytes is None else min_bytes)
        return [(name, np.memmap(file, dtype=dtype, mode="r", offset=offset,
                                 shape=tuple(dims)))
                for name, dtype, dims, offset in found]
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
        log.warning("encoder tables not memory-mapped; onnxruntime loads them",
                    extra={"encoder": str(file), "reason": str(exc)[:300]})
        return []
