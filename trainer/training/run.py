"""A training run end to end, and re-evaluating or exporting one: what `python -m trainer train`,
`evaluate` and `export` do (trainer/cli.py only parses their arguments and calls these).

`train_run`: build the dataset, create the run directory (default
$RUNS_DIR/<dataset>-<backbone>-k<K>-seed<seed>[-fold<F>of<N>][-esim-<llm>[-<level>]]), train,
evaluate on the test users beside MostPop, save checkpoint.pt (trainer/training/checkpoint.py),
curve.json and per_user.json, optionally publish a bundle, and write the report to
metrics.json. Publishing is passed in (`Publish`: trainer.export.publish_bundle with its
destination bound), since the export layer sits above this one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from service.bundle.format import latest_version, read_manifest
from service.bundle.load import load_bundle
from service.bundle.naming_files import NamingTables
from trainer.config import TrainConfig
from trainer.data.dataset import EvalSplit, SequenceDataset, build_dataset
from trainer.data.loaders import DataError
from trainer.data.specs import load_spec
from trainer.encoders.base import MultiInterestEncoder
from trainer.semantics.esim.setup import esim_setup
from trainer.semantics.llm.backends import LLMSettings
from trainer.training import distributed
from trainer.training.checkpoint import (
    checkpoint_naming,
    dataset_for,
    load_checkpoint,
    save_checkpoint,
)
from trainer.training.evaluate import (
    Search,
    evaluate_encoder,
    most_popular,
    popular_rankings,
    rankings,
)
from trainer.training.interests import (
    DISTINCT_AT,
    category_measures,
    item_clusters,
    minority_recall,
    per_user_distinctness,
    search_interests,
)
from trainer.training.loop import evaluate_model, model_search, train
from trainer.training.metrics import CUTOFFS, per_user_metrics, tail_recall
from trainer.training.rows_eval import ROW_MEASURES, esim_labels, item_labels, row_measures

log = logging.getLogger("trainer")

# Parent of the default run directories; a container's working directory is often not
# writable by its (non-root) user, so it can be pointed elsewhere.
RUNS_DIR_ENV = "RUNS_DIR"


class Publish(Protocol):
    """Publish a model as the next version of a bundle in a model store; returns its path
    (trainer.export.publish_bundle with the store, name, index kind and progress bound)."""

    def __call__(self, model: MultiInterestEncoder, dataset: SequenceDataset, cfg: TrainConfig,
                 data_spec: dict[str, Any], metrics: dict[str, Any], *,
                 naming: NamingTables | None) -> Path: ...


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs")


def default_run_dir(dataset_name: str, cfg: TrainConfig) -> Path:
    return runs_root() / (
        f"{dataset_name}-{cfg.backbone}-k{cfg.interests}-seed{cfg.seed}"
        + (f"-fold{cfg.fold}of{cfg.folds}" if cfg.folds else "")
        + (f"-esim-{cfg.llm}" if cfg.esim else "")
        + (f"-{cfg.esim_level}" if cfg.esim and cfg.esim_level != "individual" else ""))


def make_run_dir(run_dir: Path) -> None:
    """Create the run directory or fail with a usable message (not a traceback)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK | os.X_OK):  # exists, but belongs to someone else
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(run_dir))
    except OSError as exc:
        raise DataError(f"{run_dir}: cannot create the run directory ({exc}); set --run-dir or "
                        f"{RUNS_DIR_ENV} to a writable place") from exc


def join_processes() -> None:
    """Under torchrun: join the process group; only rank 0 logs (errors aside), writes the run
    directory and the bundle, and returns the report (the others return None)."""
    if distributed.init_from_env() and not distributed.is_main():
        logging.getLogger().setLevel(logging.ERROR)


def published_bundle(out: Path | None, name: str) -> Path | None:
    """`train --if-missing`: the newest bundle of `name` in the model store `out`, if any."""
    if not out:
        raise DataError("--if-missing needs --out (the model store to look in)")
    existing = latest_version(Path(out) / name)
    return None if existing is None else Path(out) / name / str(existing)


def skipped_run(bundle: Path) -> dict[str, Any] | None:
    """The report of a run not trained because `bundle` exists (None on ranks > 0)."""
    log.info("a bundle exists (%s); not training (--if-missing)", bundle)
    return {"skipped": True, "bundle": str(bundle)} if distributed.is_main() else None


def train_run(cfg: TrainConfig, spec: dict[str, Any], *, run_dir: Path | None = None,
              publish: Publish | None = None, progress: bool = True,
              llm_overrides: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Train on the data of `spec` and report test metrics (None on ranks > 0 under torchrun).

    `llm_overrides`: LLMSettings fields that win over the environment (LLM_*)."""
    raw = load_spec(spec)
    dataset = build_dataset(raw, **cfg.split())
    log.info("dataset %s", json.dumps(dataset.describe()))
    if cfg.item_text and not dataset.has_item_text():
        log.info("the data has no item text (no items file): training without it")
    cfg = cfg.for_data(dataset.has_item_text())
    if run_dir is None:
        run_dir = default_run_dir(dataset.name, cfg)
    if distributed.is_main():  # before training, so a bad location fails in seconds, not hours
        make_run_dir(run_dir)
    llm_settings = LLMSettings(**(llm_overrides or {}))
    result = train(dataset, cfg, progress=progress,
                   esim_setup=esim_setup(dataset, cfg, run_dir, progress, llm_settings))
    if not distributed.is_main():
        return None
    test = dataset.eval_split("test", cfg.maxlen)
    report = {
        "dataset": dataset.describe(),
        "backbone": cfg.backbone,
        "interests": cfg.interests,
        "seed": cfg.seed,
        "test": evaluate_model(result.model, test),
        "mostpop": most_popular(dataset, test),
        "valid": result.best_valid,
        "train": {
            "loss": result.loss_mode, "steps": result.steps, "epochs": round(result.epochs, 2),
            # --score-dtype auto, resolved on this machine
            "score_dtype": str(result.model.score_dtype).removeprefix("torch."),
            "best_step": result.best_step, "stopped_by": result.stopped_by,
            "selection_metric": result.selection_metric,
            "seconds": round(result.seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "world_size": result.world_size,  # training processes (torchrun)
            "seconds_per_step": round(result.seconds / max(result.steps, 1), 4),
            "steps_after_best": result.steps - result.best_step,
            "phase_seconds": result.phase_seconds,  # the loop's wall time by phase
            "load_average": result.load_average,  # 1/5/15-minute, at start and end
        },
        # ESIM settings, typical users and LLM statistics (source "metadata (...)" when no
        # LLM was used); null for IBIM alone.
        "esim": result.esim,
        "config": cfg.to_dict(),
    }
    save_checkpoint(run_dir / "checkpoint.pt", cfg, spec, dataset, result.model, result.naming)
    (run_dir / "curve.json").write_text(json.dumps(result.curve, indent=1))
    per_user = write_per_user(run_dir / "per_user.json", dataset, test, result.model,
                              result.naming)
    measures = per_user["interests"]
    report["distinctness"] = mean_measures({name: values for name, values in measures.items()
                                            if name not in ROW_MEASURES})
    report["rows"] = mean_measures({name: values for name, values in measures.items()
                                    if name in ROW_MEASURES})
    if result.naming is not None:  # the catalogue share ESIM's item labels cover
        report["rows"]["esim_label_coverage"] = round(
            len(result.naming.item_labels) / dataset.n_items, 4)
    # Recall on rarely seen targets (issue 23's sparse regimes); NaN-free mean over the users
    # that have one.
    report["tail"] = {name: mean_measures({"tail_recall@50": per_user[name]["tail_recall@50"]})
                      ["tail_recall@50"] for name in ("model", "mostpop")}
    report["run_dir"] = str(run_dir)
    if publish is not None:
        bundle = publish(result.model, dataset, cfg, spec, bundle_metrics(report),
                         naming=result.naming)
        report["bundle"] = str(bundle)
    (run_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    log.info("wrote %s", run_dir)
    return report


def export_checkpoint(path: Path, publish: Publish) -> dict[str, Any]:
    """Publish a run's checkpoint as a bundle, with its test metrics re-measured."""
    ckpt, dataset, model = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    test = dataset.eval_split("test", cfg.maxlen)
    metrics = {"test": evaluate_model(model, test), "mostpop": most_popular(dataset, test)}
    bundle = publish(model, dataset, cfg, ckpt["data_spec"], metrics,
                     naming=checkpoint_naming(ckpt))
    manifest = read_manifest(bundle)
    return {"bundle": str(bundle), "version": manifest.version,
            "index": manifest.index.model_dump(),
            "parity_max_abs_diff": manifest.extra["parity_max_abs_diff"], **metrics}


def evaluate_checkpoint(path: Path, which: str) -> dict[str, Any]:
    """Re-evaluate a run's checkpoint on its `which` split ("valid" or "test")."""
    ckpt, dataset, model = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    split = dataset.eval_split(which, cfg.maxlen)
    return {
        "checkpoint": str(path),
        "dataset": dataset.describe(),
        "backbone": cfg.backbone,
        "interests": cfg.interests,
        "split": which,
        which: evaluate_model(model, split),
        "mostpop": most_popular(dataset, split),
    }


def interest_measures(dataset: SequenceDataset, split: EvalSplit, model: MultiInterestEncoder,
                      search: Search, ranked: list[np.ndarray],
                      naming: NamingTables | None = None) -> dict[str, np.ndarray]:
    """Per user: how distinct the K interests are and how the merged list serves them, and
    recall on targets outside the dominant (model-free) interest (trainer/training/interests.py).
    `search`: the model's item search; `ranked`: the users' merged top lists."""
    with torch.no_grad():
        encoded = model.encode(torch.from_numpy(split.histories))
        items = model.item_vectors().numpy()
    interests = encoded.interests.numpy()
    scores, rows = search_interests(interests, search, DISTINCT_AT)
    measures = per_user_distinctness(interests, scores, rows, encoded.weights.numpy())
    measures |= category_measures(ranked, rows, split.histories, dataset.categories)
    labels = item_clusters(dataset.flat, dataset.offsets, dataset.train_users, dataset.n_items)
    if labels is not None:
        measures |= minority_recall(ranked, split.histories, split.targets, labels)
    # The interest rows a person would see (trainer/training/rows_eval.py).
    fields = [f for f in (esim_labels(naming, dataset.n_items), item_labels(dataset)) if f]
    measures |= row_measures(dataset, split, interests, items, labels, fields=fields)
    return measures


def mean_measures(measures: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Means over the users that have a value; None where none has (a single interest has
    no pairs)."""
    means = {}
    for name, values in measures.items():
        known = values[~np.isnan(values)]
        means[name] = round(float(known.mean()), 4) if len(known) else None
    return means


def write_per_user(path: Path, dataset: SequenceDataset, split: EvalSplit,
                   model: MultiInterestEncoder, naming: NamingTables | None = None
                   ) -> dict[str, Any]:
    """Each test user's metrics (model and MostPop) and interest measures, keyed by external
    user id: what a paired comparison of two models over the same users needs
    (benchmarks/folds.py). Returns what it wrote, as arrays."""
    encode, search = model_search(model)
    ranked = rankings(encode, search, split, max(CUTOFFS))
    popular, popularity = popular_rankings(dataset, split), dataset.popularity()

    def lists(values: dict[str, np.ndarray]) -> dict[str, list[float | None]]:
        # NaN (a measure a user has no value for) is written as null
        return {name: [None if np.isnan(v) else v for v in column.round(6).tolist()]
                for name, column in values.items()}

    written = {
        "users": dataset.user_ids[split.users].astype(str).tolist(),
        "model": per_user_metrics(ranked, split.targets)
        | tail_recall(ranked, split.targets, popularity),
        "mostpop": per_user_metrics(popular, split.targets)
        | tail_recall(popular, split.targets, popularity),
        "interests": interest_measures(dataset, split, model, search, ranked, naming),
    }
    path.write_text(json.dumps({key: value if key == "users" else lists(value)
                                for key, value in written.items()}))
    return written


def bundle_metrics(report: dict[str, Any]) -> dict[str, Any]:
    return {key: report[key] for key in ("test", "valid", "mostpop") if key in report}


def evaluate_bundle(path: Path, which: str) -> dict[str, Any]:
    """Evaluate a published bundle with onnxruntime + its FAISS index only (no torch)."""
    bundle = load_bundle(path)
    m = bundle.manifest
    cfg = TrainConfig.from_dict(m.config)
    dataset = dataset_for(m.data_spec, cfg, m.dataset["fingerprint"], path)
    # Text-only items (if any) follow the trained ones.
    if not np.array_equal(dataset.item_ids[1:].astype(str),
                          bundle.item_ids[: dataset.n_items].astype(str)):
        raise DataError(f"{path}: the bundle's item id map does not match the dataset")
    split = dataset.eval_split(which, m.maxlen)
    return {
        "bundle": str(path), "version": m.version, "dataset": dataset.describe(),
        "backbone": m.backbone, "interests": m.interests, "split": which,
        which: evaluate_encoder(bundle.encode, bundle.search, split),
        "mostpop": most_popular(dataset, split),
    }
