"""Training configuration: one dataclass, defaults from the official ComiRec code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

BACKBONES = ("comirec-sa", "comirec-dr", "mind")
LOSSES = ("auto", "full", "sampled")

# Below this many items a full softmax over the catalogue is cheap and strong (DESIGN 4);
# above it the sampled softmax with logQ correction is used when loss == "auto".
FULL_SOFTMAX_MAX_ITEMS = 100_000


@dataclass
class TrainConfig:
    backbone: str = "comirec-sa"
    interests: int = 4  # K
    dim: int = 64  # d
    maxlen: int = 20
    lr: float = 5e-3  # ComiRec uses 1e-3; 5e-3 wins on validation here (README)
    batch_size: int = 128
    loss: str = "auto"
    negatives_per_example: int = 10  # shared negatives = this x batch size (ComiRec)
    max_epochs: int = 40
    # Validation runs every `eval_every` optimiser steps; early stopping counts evaluations.
    eval_every: int = 200
    patience: int = 15
    max_minutes: float = 30.0  # hard wall-clock cap, in case a user's data is large
    seed: int = 0
    split_seed: int = 0  # users' train/valid/test split; fixed across training seeds
    min_item_count: int = 5
    min_user_count: int = 5
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        for name in ("interests", "dim", "maxlen", "batch_size", "max_epochs", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
