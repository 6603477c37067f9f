"""Backbones by name: the one place that maps a config's `backbone` to its class."""

from __future__ import annotations

from trainer.config import BACKBONES, TrainConfig, check_registry
from trainer.encoders.base import MultiInterestEncoder
from trainer.encoders.capsule import MIND, ComiRecDR
from trainer.encoders.comirec_sa import ComiRecSA
from trainer.encoders.transformer import SASRec, TransformerSA

# Keyed by the config's backbone names (trainer/config.py Backbone): a name without a class,
# or a class without a name, fails at import.
BACKBONE_CLASSES: dict[str, type[MultiInterestEncoder]] = {
    "comirec-sa": ComiRecSA,
    "comirec-dr": ComiRecDR,
    "mind": MIND,
    "sasrec": SASRec,
    "transformer-sa": TransformerSA,
}
check_registry("backbones", BACKBONE_CLASSES, BACKBONES)


def build_encoder(n_items: int, cfg: TrainConfig) -> MultiInterestEncoder:
    return BACKBONE_CLASSES[cfg.backbone](n_items, cfg)
