"""A training run's checkpoint (RUN_DIR/checkpoint.pt): save and load.

One dict, saved with torch.save: `format` (CHECKPOINT_FORMAT), `config` (TrainConfig.to_dict),
`data_spec` (how to rebuild the data), `dataset` (its description, with the fingerprint),
`state_dict` (the encoder's weights) and `naming` (the ESIM naming tables' state, or None).
Loading rebuilds the dataset from the spec and refuses it if the data changed since.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from service.bundle.naming_files import NamingTables
from trainer.config import TrainConfig
from trainer.data.dataset import SequenceDataset, build_dataset
from trainer.data.loaders import DataError
from trainer.data.specs import load_spec
from trainer.encoders.registry import build_encoder
from trainer.semantics.esim.naming import naming_from_state, naming_state

log = logging.getLogger("trainer")

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, cfg: TrainConfig, spec: dict[str, Any],
                    dataset: SequenceDataset, model: torch.nn.Module,
                    naming: NamingTables | None) -> None:
    torch.save(
        {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "data_spec": spec,
         "dataset": dataset.describe(), "state_dict": model.state_dict(),
         "naming": naming_state(naming) if naming is not None else None},
        path,
    )


def load_checkpoint(path: Path) -> tuple[dict[str, Any], SequenceDataset, torch.nn.Module]:
    """A checkpoint, its dataset (rebuilt from the recorded spec, fingerprint checked) and
    its model."""
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise DataError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a trainer checkpoint (format {CHECKPOINT_FORMAT})")
    cfg = TrainConfig.from_dict(ckpt["config"])
    dataset = dataset_for(ckpt["data_spec"], cfg, ckpt["dataset"]["fingerprint"], path)
    model = build_encoder(dataset.n_items, cfg)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return ckpt, dataset, model


def checkpoint_naming(ckpt: dict[str, Any]) -> NamingTables | None:
    """The naming tables a checkpoint holds (None without ESIM, or from before them)."""
    return naming_from_state(ckpt["naming"]) if ckpt.get("naming") else None


def dataset_for(spec: dict[str, Any], cfg: TrainConfig, fingerprint: str,
                where: Path) -> SequenceDataset:
    """Rebuild the dataset a model was trained on; refuse if the data changed since."""
    dataset = build_dataset(load_spec(spec), **cfg.split())
    if dataset.fingerprint != fingerprint:
        raise DataError(f"{where}: the data changed since training (fingerprint "
                        f"{dataset.fingerprint} != {fingerprint})")
    return dataset
