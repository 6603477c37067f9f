"""Training configuration: one dataclass, defaults from the official ComiRec code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

BACKBONES = ("comirec-sa", "comirec-dr", "mind", "sasrec", "transformer-sa")
SINGLE_INTEREST_BACKBONES = ("sasrec",)  # K is 1 whatever --interests says
LOSSES = ("auto", "full", "sampled")
INTEREST_LOSSES = ("max", "argmax")  # how K interests score an item in training (nets.py)
# "oracle" is not an LLM: the true planted topics of synthetic data (an upper bound).
LLM_BACKENDS = ("local", "openai", "metadata", "oracle")
MATCHING_RULES = ("attention", "similarity")
ESIM_LEVELS = ("individual", "crowd", "dual")  # DESIGN 5.7

# Below this many items a full softmax over the catalogue is cheap and strong (DESIGN 4);
# above it the sampled softmax with logQ correction is used when loss == "auto".
FULL_SOFTMAX_MAX_ITEMS = 100_000


@dataclass
class TrainConfig:
    backbone: str = "transformer-sa"  # docs/results.md: beats SASRec and ComiRec-SA
    interests: int = 4  # K
    dim: int = 64  # d
    maxlen: int = 20
    lr: float = 5e-3  # ComiRec uses 1e-3; 5e-3 wins on validation here (README)
    batch_size: int = 128
    loss: str = "auto"
    interest_loss: str = "max"
    item_text: bool = False  # item vectors also see the items' texts (trainer/item_text.py)
    negatives_per_example: int = 10  # shared negatives = this x batch size (ComiRec)
    max_epochs: int = 40
    # Validation runs every `eval_every` optimiser steps (0: three times an epoch); early
    # stopping counts evaluations.
    eval_every: int = 0
    patience: int = 15
    max_minutes: float = 30.0  # hard wall-clock cap, in case a user's data is large
    seed: int = 0
    split_seed: int = 0  # users' train/valid/test split; fixed across training seeds
    folds: int = 0  # 0: 80/10/10 split; N: user-level N-fold cross-validation (DESIGN 6)
    fold: int = 0  # with folds: test on this fold, validate on the next
    min_item_count: int = 5
    min_user_count: int = 5
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # ESIM (DESIGN 5): training only, the exported encoder is the same network.
    esim: bool = False
    llm: str = "local"  # who names the typical users' interests
    esim_warmup_epochs: float = 1.0  # IBIM alone before the typical users are chosen
    esim_clusters: int = 8  # C
    esim_users_per_cluster: int = 2  # m; LLM budget = C x m unless esim_llm_budget is set
    esim_llm_budget: int | None = None
    esim_labels: int = 16  # size of the interest vocabulary (L_pred's label count)
    esim_alpha: float = 0.1  # weight of L_pred
    esim_beta: float = 0.1  # weight of L_align
    esim_tau: float = 0.1  # InfoNCE temperature
    esim_matching: str = "attention"  # semantic -> behavioural interest matching rule
    # typical users (individual), synthesized users of crowds (crowd), or both (dual)
    esim_level: str = "individual"
    esim_crowds: int = 16  # crowds of similar training users; one LLM call each
    esim_crowd_items: int = 20  # prompt budget L of a synthesized user (max-cover)
    esim_merge_threshold: float = 0.85  # cosine at which a crowd's interests are merged
    esim_batch_users: int = 64  # supervised users in the ESIM losses per training step
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.backbone in SINGLE_INTEREST_BACKBONES:
            self.interests = 1
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        if self.interest_loss not in INTEREST_LOSSES:
            raise ValueError(f"unknown interest loss {self.interest_loss!r}; "
                             f"choose one of {INTEREST_LOSSES}")
        if self.llm not in LLM_BACKENDS:
            raise ValueError(f"unknown LLM backend {self.llm!r}; choose one of {LLM_BACKENDS}")
        if self.esim_matching not in MATCHING_RULES:
            raise ValueError(f"unknown matching rule {self.esim_matching!r}; "
                             f"choose one of {MATCHING_RULES}")
        if self.esim_tau <= 0:
            raise ValueError(f"esim_tau must be > 0, got {self.esim_tau}")
        if self.esim_level not in ESIM_LEVELS:
            raise ValueError(f"unknown ESIM level {self.esim_level!r}; "
                             f"choose one of {ESIM_LEVELS}")
        if not 0 < self.esim_merge_threshold <= 1:
            raise ValueError("esim_merge_threshold is a cosine in (0, 1], got "
                             f"{self.esim_merge_threshold}")
        if self.esim_llm_budget is not None and self.esim_llm_budget < 1:
            raise ValueError(f"the LLM budget must be >= 1, got {self.esim_llm_budget}")
        for name in ("esim_clusters", "esim_users_per_cluster", "esim_labels", "esim_crowds",
                     "esim_crowd_items", "esim_batch_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.folds and (self.folds < 3 or not 0 <= self.fold < self.folds):
            raise ValueError(f"fold {self.fold} of {self.folds}: need folds >= 3 and "
                             "0 <= fold < folds")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 = three times an epoch), got "
                             f"{self.eval_every}")
        for name in ("interests", "dim", "maxlen", "batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def split(self) -> dict[str, int]:
        """The build_dataset arguments that fix the users' split and filtering."""
        return {"min_item_count": self.min_item_count, "min_user_count": self.min_user_count,
                "split_seed": self.split_seed, "folds": self.folds, "fold": self.fold}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def esim_settings(self) -> dict[str, Any] | None:
        if not self.esim:
            return None
        return {k: v for k, v in self.to_dict().items() if k == "llm" or k.startswith("esim_")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
