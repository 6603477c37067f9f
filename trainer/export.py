"""Export a trained encoder as a model bundle: ONNX graph (parity-checked), FAISS item index
chosen by catalogue size (ANN recall measured on real interest vectors), id map, manifest."""

from __future__ import annotations

import copy
import logging
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from service.bundle.format import (
    CATEGORY_FIELD,
    ENCODER,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    ESIM_LABEL_FIELD,
    INDEX,
    ITEM_EMBEDDINGS,
    ITEMS,
    POPULARITY,
    YEAR_FIELD,
    publish,
    split_values,
    write_items,
)
from service.bundle.naming_files import NamingTables, write_naming
from trainer.config import TrainConfig
from trainer.data.dataset import SequenceDataset
from trainer.encoders.base import MultiInterestEncoder
from trainer.semantics.text_only import TextPath, text_only_vectors
from trainer.training.evaluate import encode_all
from trainer.training.loop import encode_numpy

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
EXACT_MAX_ITEMS = 100_000  # exact search up to here; LARGE_CATALOGUE_KIND above (auto)
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
# auto above EXACT_MAX_ITEMS, chosen by benchmarks/index_sweep.py on trained item and
# interest vectors: HNSW32 was the fastest family to reach recall@50 0.95 (figures in
# docs/results.md, "The index sweep (recall vs latency)"). An inner-product top 50 is spread
# over many of IVF's L2 clusters (popular items have large norms), so IVF scans a share of
# the catalogue that grows with it. HNSW memory-maps like IVF; it builds slower.
LARGE_CATALOGUE_KIND = "hnsw"
IVF_LISTS_PER_SQRT_N = 4  # nlist = 4 sqrt(n): 4,000 lists for 1M items
LATENCY_REQUESTS = 200  # single-request searches timed at export
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
            model, (example,), str(path), input_names=[ENCODER_INPUT],
            output_names=[ENCODER_OUTPUT], opset_version=17, dynamo=False,
            dynamic_axes={ENCODER_INPUT: {0: "batch"}, ENCODER_OUTPUT: {0: "batch"}},
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
        got = session.run([ENCODER_OUTPUT], {ENCODER_INPUT: batch})[0]
        want = encode(batch)
        if got.shape != want.shape:
            raise ExportError(f"{onnx_path}: output shape {got.shape} != PyTorch {want.shape}")
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > PARITY_TOLERANCE:
        raise ExportError(f"{onnx_path}: ONNX output differs from PyTorch by {worst:.2e} "
                          f"(> {PARITY_TOLERANCE:.0e}); export refused")
    return worst


# --- item index -------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexSpec:
    """An index operating point: how to build it and the search parameters to start from.
    The export's recall guard raises `tune` along `grid` (never below its start value) until
    recall@50 measured on real interest vectors reaches the target, because every retrained
    model has different vectors (benchmarks/index_sweep.py chooses the family and build)."""

    kind: str  # "flat", "ivf", "hnsw" or "ivfpq" (IVF + PQ fast-scan + exact re-ranking)
    factory: str  # faiss.index_factory string
    search_params: dict[str, int] = field(default_factory=dict)
    tune: str | None = None  # the search parameter the guard may raise
    grid: tuple[int, ...] = ()  # the values it may take, ascending
    build_params: dict[str, int] = field(default_factory=dict)  # HNSW efConstruction
    chosen_by: str = "given"  # recorded in the manifest: where this operating point came from


def ivf_lists(n: int) -> int:
    return int(min(65536, max(16, IVF_LISTS_PER_SQRT_N * np.sqrt(n))))


def index_spec(kind: str, n: int, d: int) -> IndexSpec:
    """The operating point of an index kind for n items of dimension d ("auto" resolved)."""
    if kind == "auto":
        kind = "flat" if n <= EXACT_MAX_ITEMS else LARGE_CATALOGUE_KIND
        chosen_by = f"auto ({'<=' if kind == 'flat' else '>'} {EXACT_MAX_ITEMS} items)"
    else:
        chosen_by = f"kind {kind}"
    nlist = ivf_lists(n)
    doubling = tuple(2**i for i in range(9))  # 1 .. 256
    if kind == "flat":
        return IndexSpec("flat", "Flat", chosen_by=chosen_by)
    if kind == "hnsw":
        # FAISS's HNSW explores max(efSearch, k) candidates, so start at k = 50.
        return IndexSpec("hnsw", "HNSW32,Flat", {"efSearch": 50}, "efSearch",
                         (50, 64, 96, 128, 192, 256, 384, 512, 1024), {"efConstruction": 80},
                         chosen_by)
    if kind == "ivf":
        return IndexSpec("ivf", f"IVF{nlist},Flat", {"nprobe": 1}, "nprobe", doubling,
                         chosen_by=chosen_by)
    if kind == "ivfpq":
        # 4-bit fast-scan PQ over 2-dimensional sub-vectors for the list scan, then the
        # best k_factor_rf x k re-ranked exactly (RFlat): IVF's speed with less of the
        # recall lost to quantisation.
        return IndexSpec("ivfpq", f"IVF{nlist},PQ{max(1, d // 2)}x4fs,RFlat",
                         {"nprobe": 1, "k_factor_rf": 4}, "nprobe", doubling,
                         chosen_by=chosen_by)
    raise ExportError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")


def ann_recall(index: faiss.Index, exact: np.ndarray, queries: np.ndarray, k: int) -> float:
    _, got = index.search(queries, k)
    # -1 pads a list with fewer than k results; it must not count as a hit.
    hits = [len(np.intersect1d(g[g >= 0], e, assume_unique=True))
            for g, e in zip(got, exact, strict=True)]
    return float(np.mean(hits)) / k


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    return exact.search(queries, k)[1]


def make_index(spec: IndexSpec, vectors: np.ndarray, progress: bool = False) -> faiss.Index:
    """Build (train where needed, then add in chunks) the index of `spec` over `vectors`."""
    n, d = vectors.shape
    index = faiss.index_factory(d, spec.factory, faiss.METRIC_INNER_PRODUCT)
    for key, value in spec.build_params.items():
        if key != "efConstruction":
            raise ExportError(f"unknown build parameter {key!r}")
        faiss.downcast_index(index).hnsw.efConstruction = value
    if not index.is_trained:
        # 64 points per list: k-means quality levels off well before FAISS's 256 default,
        # and training time grows with the sample.
        nlist = faiss.extract_index_ivf(index).nlist
        index.train(vectors[np.random.default_rng(0).permutation(n)[: 64 * nlist]])
    chunk = 50_000
    for lo in tqdm(range(0, n, chunk), disable=not progress, desc=f"index {spec.factory}",
                   unit="chunk"):
        index.add(vectors[lo : lo + chunk])
    return index


def search_latency(index: faiss.Index, queries: np.ndarray, rows_per_request: int, k: int,
                   requests: int = LATENCY_REQUESTS, threads: int = 1) -> tuple[float, float]:
    """(p50, p99) ms of searching one request's interest vectors at a time (the service's
    unbatched search) with `threads` FAISS threads."""
    rows = max(1, rows_per_request)
    groups = [queries[i : i + rows] for i in range(0, len(queries) - rows + 1, rows)]
    if not groups:
        return 0.0, 0.0
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        index.search(groups[0], k)  # warm-up
        times = []
        for i in range(requests):
            started = time.perf_counter()
            index.search(groups[i % len(groups)], k)
            times.append(time.perf_counter() - started)
    finally:
        faiss.omp_set_num_threads(previous)
    p50, p99 = np.percentile(np.array(times) * 1000, [50, 99])
    return float(p50), float(p99)


def build_index(
    vectors: np.ndarray, queries: np.ndarray, kind: str | IndexSpec = "auto",
    recall_target: float = ANN_RECALL_TARGET, progress: bool = True, request_rows: int = 4,
) -> tuple[faiss.Index, dict[str, Any]]:
    """An inner-product index over `vectors`: a kind ("auto": exact up to EXACT_MAX_ITEMS,
    else LARGE_CATALOGUE_KIND) or a given operating point (an IndexSpec, e.g. the one
    benchmarks/index_sweep.py chose). For ANN indexes the tuned search parameter is the
    smallest from its start that reaches `recall_target` recall@50 against exact search on
    `queries` (the guard); the info records the operating point, its measured recall and
    the search latency of one request (`request_rows` interest vectors, 1 FAISS thread)."""
    n, d = vectors.shape
    spec = kind if isinstance(kind, IndexSpec) else index_spec(kind, n, d)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(RECALL_AT, n)
    started = time.perf_counter()
    index = make_index(spec, vectors, progress=progress and spec.kind != "flat")
    build_seconds = time.perf_counter() - started
    params = dict(spec.search_params)
    space = faiss.ParameterSpace()
    for key, value in params.items():
        space.set_index_parameter(index, key, value)
    if spec.kind == "flat":
        recall = 1.0  # exact by construction
    else:
        truth = exact_top(vectors, queries, k)
        recall = ann_recall(index, truth, queries, k)
        log.info("index %s %s recall@%d=%.4f", spec.factory, params, k, recall)
        if spec.tune is not None:
            for value in (v for v in spec.grid if v > params[spec.tune]):
                if recall >= recall_target:
                    break
                params[spec.tune] = value
                space.set_index_parameter(index, spec.tune, value)
                recall = ann_recall(index, truth, queries, k)
                log.info("index %s %s recall@%d=%.4f", spec.factory, params, k, recall)
        if recall < recall_target:
            log.warning("index %s: recall@%d %.3f at %s is below the target %.2f; the item "
                        "vectors may be under-trained, or use --index flat", spec.factory, k,
                        recall, params, recall_target)
    p50, p99 = search_latency(index, queries, request_rows, k)
    info = {"kind": spec.kind, "factory": spec.factory, "search_params": params,
            "recall_at_50": recall, "build_seconds": build_seconds,
            "build_params": dict(spec.build_params), "recall_target": recall_target,
            "recall_queries": len(queries), "search_ms_p50": round(p50, 4),
            "search_ms_p99": round(p99, 4), "search_threads": 1, "chosen_by": spec.chosen_by}
    return index, info


# --- the bundle -------------------------------------------------------------------------------


def append_items(model: MultiInterestEncoder, rows: np.ndarray) -> None:
    """Grow the model's item table by `rows` [C, d] (internal ids N + 1 .. N + C)."""
    table = torch.cat([model.item_embedding.weight.detach(), torch.from_numpy(rows)])
    model.item_embedding = torch.nn.Embedding.from_pretrained(table, freeze=False,
                                                              padding_idx=0)
    model.n_items += len(rows)


def item_field_values(categories: list[str], years: list[float],
                      declared: dict[str, list[str]] | None = None
                      ) -> dict[str, list[list[str]]]:
    """Each item's values of the bundle's filterable fields: ITEM_FIELDS (its '|'-separated
    categories, its year, none when unknown) and the items file's declared fields
    (--item-fields: '|'-separated values)."""
    return {
        CATEGORY_FIELD: [split_values(cats) for cats in categories],
        YEAR_FIELD: [[str(int(y))] if np.isfinite(y) else [] for y in years],
        **{name: [split_values(v) for v in values] for name, values in (declared or {}).items()},
    }


def esim_label_values(naming: NamingTables, items: int) -> list[list[str]]:
    """Each bundle row's ESIM labels (row r: internal id r + 1; text-only rows have none)."""
    values: list[list[str]] = [[] for _ in range(items)]
    for item, rows in naming.item_labels.items():
        values[item - 1] = [naming.names[r] for r in rows]
    return values


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
    index_kind: str | IndexSpec = "auto",
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    naming: NamingTables | None = None,
) -> Path:
    """Export, check and publish; returns models_dir/name/<version>. `naming` (from ESIM)
    ships the interest vocabulary and projection so the service can name interests."""
    text_only = (dataset.text_only if cfg.text_only_items and dataset.text_only is not None
                 and len(dataset.text_only) else None)
    text_path = TextPath.of(model)  # places new items (--item-text); folding drops it
    if model.text_projection is not None or text_only is not None:
        model = copy.deepcopy(model)  # the caller's model stays as trained
        model.fold_item_text()  # the served encoder keeps one plain item table
    model.eval()
    with torch.no_grad():
        vectors = model.item_vectors().numpy().astype(np.float32)
    item_ids, titles = dataset.item_ids[1:].tolist(), dataset.titles[1:].tolist()
    categories, years = list(dataset.categories[1:]), list(dataset.years[1:])
    declared = {name: list(values[1:]) for name, values in dataset.fields.items()}
    popularity = dataset.popularity()[1:]
    text_only_rows: list[int] = []
    if text_only is not None:
        try:
            placed = text_only_vectors(dataset, vectors, cfg.text_only_length, text_path)
        except ValueError as exc:  # too few trained items with text to fit the map
            log.warning("the %d items without events are not served: %s", len(text_only), exc)
            text_only = None
    if text_only is not None:
        # After the trained items, rows placed by their text: in the index, and in the
        # encoder's table too, so that a history holding one encodes.
        append_items(model, placed)
        text_only_rows = list(range(len(vectors), len(vectors) + len(placed)))
        vectors = np.concatenate([vectors, placed])
        item_ids += text_only.item_ids.astype(str).tolist()
        titles += text_only.titles.astype(str).tolist()
        categories += list(text_only.categories)
        years += list(text_only.years)
        for name, values in declared.items():
            values += list(text_only.fields[name])
        popularity = np.concatenate([popularity, np.zeros(len(placed), popularity.dtype)])
    real = np.concatenate([dataset.eval_split("valid", cfg.maxlen).histories,
                           dataset.eval_split("test", cfg.maxlen).histories])
    queries = encode_all(encode_numpy(model), real[:2000]).reshape(-1, cfg.dim)
    manifest: dict[str, Any] = {
        "git_commit": git_commit(), "dataset": dataset.describe(), "data_spec": data_spec,
        "config": cfg.to_dict(), "backbone": cfg.backbone, "interests": cfg.interests,
        "dim": cfg.dim, "maxlen": cfg.maxlen, "item_count": len(item_ids),
        "metrics": metrics, "extra": {**(extra or {}), "text_only_items": len(text_only_rows)},
    }

    def write_files(staging: Path) -> None:
        # Also fills in what is measured on the way (parity, index); publish() writes the
        # manifest only after this returns.
        started = time.perf_counter()
        export_onnx(model, staging / ENCODER)
        parity = check_parity(model, staging / ENCODER, parity_inputs(model, real))
        export_seconds = time.perf_counter() - started
        index, manifest["index"] = build_index(vectors, queries, index_kind, progress=progress,
                                                request_rows=cfg.interests)
        faiss.write_index(index, str(staging / INDEX))
        np.save(staging / ITEM_EMBEDDINGS, vectors)
        np.save(staging / POPULARITY, popularity)
        fields = item_field_values(categories, years, declared)
        if naming is not None and naming.item_labels:
            fields[ESIM_LABEL_FIELD] = esim_label_values(naming, len(item_ids))
            manifest["extra"]["esim_labelled_items"] = len(naming.item_labels)
        write_items(staging / ITEMS, item_ids, titles, text_only_rows, fields)
        if naming is not None:
            write_naming(staging, naming)
        manifest["extra"].update(parity_max_abs_diff=parity, export_seconds=export_seconds)

    path = publish(models_dir, name, write_files, manifest)
    log.info("published %s (parity %.1e, index %s recall@50 %.4f)", path,
             manifest["extra"]["parity_max_abs_diff"], manifest["index"]["factory"],
             manifest["index"]["recall_at_50"])
    return path
