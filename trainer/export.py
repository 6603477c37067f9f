"""Export a trained encoder as a model bundle: ONNX graph (parity-checked), FAISS item index
chosen by catalogue size (ANN recall measured on real interest vectors), id map, manifest."""

from __future__ import annotations

import logging
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from service import bundle as fmt
from trainer.config import TrainConfig
from trainer.dataset import SequenceDataset
from trainer.evaluate import encode_all
from trainer.nets import MultiInterestEncoder
from trainer.train import encode_numpy

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
EXACT_MAX_ITEMS = 100_000  # exact search up to here; IVF above (auto)
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
ANN_RECALL_TARGET = 0.95
RECALL_AT = 50


class ExportError(RuntimeError):
    pass


# --- encoder ----------------------------------------------------------------------------------


def export_onnx(model: MultiInterestEncoder, path: Path) -> None:
    model.eval()
    example = torch.zeros(2, model.maxlen, dtype=torch.int64)
    example[:, -3:] = torch.tensor([1, 2, 3])
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but needs no extra package (onnxscript) and
        # handles these small graphs exactly; the parity check below guards the result.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=[fmt.ENCODER_INPUT],
            output_names=[fmt.ENCODER_OUTPUT], opset_version=17, dynamo=False,
            dynamic_axes={fmt.ENCODER_INPUT: {0: "batch"}, fmt.ENCODER_OUTPUT: {0: "batch"}},
        )


def parity_inputs(model: MultiInterestEncoder, real: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Real histories, random ones with random amounts of padding, an empty one, batch of 1."""
    rng = np.random.default_rng(seed)
    random = rng.integers(1, model.n_items + 1, size=(64, model.maxlen))
    lengths = rng.integers(0, model.maxlen + 1, size=64)
    random[np.arange(model.maxlen)[None, :] < (model.maxlen - lengths)[:, None]] = 0
    batches = [random.astype(np.int64), np.zeros((1, model.maxlen), np.int64)]
    if len(real):
        batches += [real[:256].astype(np.int64), real[:1].astype(np.int64)]
    return batches


def check_parity(model: MultiInterestEncoder, onnx_path: Path, batches: list[np.ndarray]) -> float:
    """Max |ONNX - PyTorch| over the batches; raises ExportError above the tolerance."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    encode = encode_numpy(model)
    worst = 0.0
    for batch in batches:
        got = session.run([fmt.ENCODER_OUTPUT], {fmt.ENCODER_INPUT: batch})[0]
        want = encode(batch)
        if got.shape != want.shape:
            raise ExportError(f"{onnx_path}: output shape {got.shape} != PyTorch {want.shape}")
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > PARITY_TOLERANCE:
        raise ExportError(f"{onnx_path}: ONNX output differs from PyTorch by {worst:.2e} "
                          f"(> {PARITY_TOLERANCE:.0e}); export refused")
    return worst


# --- item index -------------------------------------------------------------------------------


def ann_recall(index: faiss.Index, exact: np.ndarray, queries: np.ndarray, k: int) -> float:
    _, got = index.search(queries, k)
    hits = [len(np.intersect1d(g, e, assume_unique=True)) for g, e in zip(got, exact, strict=True)]
    return float(np.mean(hits)) / k


def build_index(
    vectors: np.ndarray, queries: np.ndarray, kind: str = "auto",
    recall_target: float = ANN_RECALL_TARGET, progress: bool = True,
) -> tuple[faiss.Index, dict[str, Any]]:
    """An inner-product index over `vectors`; for ANN kinds the search parameter is the
    smallest that reaches `recall_target` recall@50 against exact search on `queries`."""
    n, d = vectors.shape
    if kind == "auto":
        # IVF over HNSW for large catalogues: on 1M x 64 HNSW32 took minutes to build on
        # 2 cores where IVF takes well under one, at a similar search cost (README).
        kind = "flat" if n <= EXACT_MAX_ITEMS else "ivf"
    if kind not in INDEX_KINDS:
        raise ExportError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(RECALL_AT, n)
    started = time.perf_counter()
    if kind == "flat":
        factory = "Flat"
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        index.add(vectors)
        info = {"kind": kind, "factory": factory, "search_params": {}, "recall_at_50": 1.0,
                "build_seconds": time.perf_counter() - started}
        return index, info
    if kind == "hnsw":
        factory, param, grid = "HNSW32,Flat", "efSearch", (64, 128, 256, 512, 1024)
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        nlist = int(min(65536, max(16, 4 * np.sqrt(n))))
        factory, param, grid = f"IVF{nlist},Flat", "nprobe", (8, 16, 32, 64, 128, 256)
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(0).permutation(n)[: 64 * nlist]]
        index.train(sample)
    chunk = 50_000
    for lo in tqdm(range(0, n, chunk), disable=not progress, desc=f"index {factory}",
                   unit="chunk"):
        index.add(vectors[lo : lo + chunk])
    build_seconds = time.perf_counter() - started

    exact = faiss.IndexFlatIP(d)
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    space = faiss.ParameterSpace()
    for value in grid:
        space.set_index_parameter(index, param, value)
        recall = ann_recall(index, truth, queries, k)
        log.info("index %s %s=%d recall@%d=%.4f", factory, param, value, k, recall)
        if recall >= recall_target:
            break
    if recall < recall_target:
        log.warning("index %s: recall@%d %.3f at %s=%d is below the target %.2f; the item "
                    "vectors may be under-trained, or use --index flat", factory, k, recall,
                    param, value, recall_target)
    info = {"kind": kind, "factory": factory, "search_params": {param: value},
            "recall_at_50": recall, "build_seconds": build_seconds}
    return index, info


# --- the bundle -------------------------------------------------------------------------------


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def publish_bundle(
    model: MultiInterestEncoder,
    dataset: SequenceDataset,
    cfg: TrainConfig,
    data_spec: dict[str, Any],
    metrics: dict[str, Any],
    models_dir: Path,
    name: str,
    index_kind: str = "auto",
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Export, check and publish; returns models_dir/name/<version>."""
    model.eval()
    with torch.no_grad():
        vectors = model.item_vectors().numpy().astype(np.float32)
    real = np.concatenate([dataset.eval_split("valid", cfg.maxlen).histories,
                           dataset.eval_split("test", cfg.maxlen).histories])
    queries = encode_all(encode_numpy(model), real[:2000]).reshape(-1, cfg.dim)
    manifest: dict[str, Any] = {
        "git_commit": git_commit(), "dataset": dataset.describe(), "data_spec": data_spec,
        "config": cfg.to_dict(), "backbone": cfg.backbone, "interests": cfg.interests,
        "dim": cfg.dim, "maxlen": cfg.maxlen, "item_count": dataset.n_items,
        "metrics": metrics, "extra": dict(extra or {}),
    }

    def write_files(staging: Path) -> None:
        # Also fills in what is measured on the way (parity, index); publish() writes the
        # manifest only after this returns.
        started = time.perf_counter()
        export_onnx(model, staging / fmt.ENCODER)
        parity = check_parity(model, staging / fmt.ENCODER, parity_inputs(model, real))
        export_seconds = time.perf_counter() - started
        index, manifest["index"] = build_index(vectors, queries, index_kind, progress=progress)
        faiss.write_index(index, str(staging / fmt.INDEX))
        np.save(staging / fmt.ITEM_EMBEDDINGS, vectors)
        np.save(staging / fmt.POPULARITY, dataset.popularity()[1:])
        fmt.write_items(staging / fmt.ITEMS, dataset.item_ids[1:].tolist(),
                        dataset.titles[1:].tolist())
        manifest["extra"].update(parity_max_abs_diff=parity, export_seconds=export_seconds)

    path = fmt.publish(models_dir, name, write_files, manifest)
    log.info("published %s (parity %.1e, index %s recall@50 %.4f)", path,
             manifest["extra"]["parity_max_abs_diff"], manifest["index"]["factory"],
             manifest["index"]["recall_at_50"])
    return path
