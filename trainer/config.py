"""Training configuration: one dataclass, defaults from the official ComiRec code.

Each setting is declared once, here: its type (a `Literal` gives the choices), its default,
and in its metadata the help text and, for the trainer CLI, the flag (`--` + the name with
dashes unless `flag=` says otherwise), its argument group, or that it is not on the command
line. `python -m trainer train` derives its flags from these fields (trainer/cli.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args

Backbone = Literal["comirec-sa", "comirec-dr", "mind", "sasrec", "transformer-sa"]
Loss = Literal["auto", "full", "sampled"]
InterestLoss = Literal["max", "argmax"]  # how K interests score an item in training
# "oracle" is not an LLM: the true planted topics of synthetic data (an upper bound).
LLMBackend = Literal["local", "openai", "metadata", "oracle"]
MatchingRule = Literal["attention", "similarity"]
# docs/architecture.md, "ESIM levels"
EsimLevel = Literal["individual", "crowd", "dual"]
LRSchedule = Literal["constant", "cosine"]
ScoreDtype = Literal["auto", "float32", "bfloat16"]  # of the training loss's scoring products

BACKBONES: tuple[str, ...] = get_args(Backbone)
SINGLE_INTEREST_BACKBONES = ("sasrec",)  # K is 1 whatever --interests says
LOSSES: tuple[str, ...] = get_args(Loss)
INTEREST_LOSSES: tuple[str, ...] = get_args(InterestLoss)
LLM_BACKENDS: tuple[str, ...] = get_args(LLMBackend)
MATCHING_RULES: tuple[str, ...] = get_args(MatchingRule)
ESIM_LEVELS: tuple[str, ...] = get_args(EsimLevel)

# Below this many items a full softmax over the catalogue is cheap and strong
# (docs/architecture.md, "Encoders and losses"); above it the sampled softmax with logQ
# correction is used when loss == "auto".
FULL_SOFTMAX_MAX_ITEMS = 100_000

# ComiRec's item filter (--comirec-protocol): the papers' MovieLens numbers use it.
COMIREC_MIN_ITEM_COUNT = 5

# Field metadata keys (read by trainer/cli.py).
HELP = "help"
FLAG = "flag"  # the CLI flag when it is not `--` + the field name with dashes
GROUP = "group"  # the CLI argument group's title
NOT_ON_CLI = "not_on_cli"  # True: no flag (the default, or a stored config, is used)

ESIM_GROUP = "ESIM (LLM-named interests of typical users, training only)"


def setting(default: Any, help: str, *, flag: str | None = None, group: str | None = None,
            cli: bool = True) -> Any:
    """A TrainConfig field with its help text and, for the CLI, its flag and group."""
    metadata: dict[str, Any] = {HELP: help}
    if flag is not None:
        metadata[FLAG] = flag
    if group is not None:
        metadata[GROUP] = group
    if not cli:
        metadata[NOT_ON_CLI] = True
    return field(default=default, metadata=metadata)


def esim_setting(default: Any, help: str, **kwargs: Any) -> Any:
    return setting(default, help, group=ESIM_GROUP, **kwargs)


def check_registry(what: str, registry: Iterable[str], choices: Iterable[str]) -> None:
    """Raise unless `registry` (implementations keyed by name) has exactly the configured
    `choices`: called at import, so a choice without an implementation, or the reverse,
    fails at once rather than when a run asks for it."""
    keys, names = list(registry), list(choices)
    missing = [name for name in names if name not in keys]
    unknown = [key for key in keys if key not in names]
    if missing or unknown:
        raise RuntimeError(f"{what}: the choices in trainer/config.py and the implementations "
                           f"differ (no implementation: {missing}; not a choice: {unknown})")


@dataclass
class TrainConfig:
    # docs/results.md: transformer-sa beats SASRec and ComiRec-SA
    backbone: Backbone = setting("transformer-sa", "the IBIM encoder network")
    interests: int = setting(4, "K: interests per user (1 for sasrec)")
    dim: int = setting(64, "d: embedding size")
    maxlen: int = setting(20, "history items the encoder sees (the most recent)")
    # ComiRec uses 1e-3; 5e-3 wins on validation here (README)
    lr: float = setting(5e-3, "learning rate (Adam)")
    # A training-speed candidate (docs/results.md, "Training time").
    lr_schedule: LRSchedule = setting(
        "constant", "constant, or cosine: decay from --lr to a hundredth of it over --epochs")
    batch_size: int = setting(128, "training examples per step")
    loss: Loss = setting("auto", f"auto: a full softmax up to {FULL_SOFTMAX_MAX_ITEMS} items, a "
                                 "sampled softmax with logQ correction above")
    interest_loss: InterestLoss = setting(
        "max", "how the K interests score an item in training: max = the best interest's "
               "score, as retrieval merges (default); argmax = ComiRec's readout of the "
               "interest closest to the target")
    # An interest-distinctness candidate (issue 22; docs/results.md): 0 keeps the max loss alone.
    argmax_weight: float = setting(
        0.0, "with --interest-loss max: add this x ComiRec's argmax loss (the interest closest "
             "to the target scores the negatives alone), which lets interests specialise")
    # docs/results.md, "The whole catalogue (issue 34)": the catalogue default.
    item_text: bool = setting(
        True, "item vectors also see the items' titles and categories (MiniLM features, "
              "projected; folded into the item table at export; "
              "trainer/semantics/item_text.py); off by itself where the data has no item "
              "text")
    text_only_items: bool = setting(
        True, "export: items of the items file without any interaction get a vector "
              "from their text (through the model's text projection with --item-text, else a "
              "ridge map from MiniLM features to the trained item vectors) and are served; "
              "marked in items.json")
    # docs/results.md, "New items from day one": 0.95 chosen on validation users.
    text_only_length: float = setting(
        0.95, "with --text-only-items: a placed item's vector length, in units of the median "
             "length of the rarest trained items (0 < x; smaller serves new items less often)")
    # The control that tells a semantic gain from a regularisation effect (issue 23).
    shuffle_item_text: bool = setting(
        False, "with --item-text: a control; every item gets another item's text (a seeded "
               "permutation), the same losses and features with the semantics broken")
    negatives_per_example: int = setting(
        10, "shared sampled negatives = this x batch size (ComiRec)", cli=False)
    # docs/results.md, "Training time": bfloat16 products, 0.72x the training time, no
    # accuracy loss over 3 seeds x 10 folds.
    score_dtype: ScoreDtype = setting(
        "auto", "precision of the loss's products of interests x negatives (or catalogue); "
                "scores stay float32. auto: bfloat16 where the CPU has AVX512-BF16 or AMX "
                "(faster there, slower elsewhere), else float32")
    # A training-speed candidate (docs/results.md, "Training time"); 0 keeps every position.
    score_positions: int = setting(
        0, "every-position backbones (sasrec, transformer-sa): score only the last N positions "
           "of each training window (0: every position)")
    # An interest-distinctness and recall candidate (docs/results.md, issue 22): 1 keeps
    # next-item training.
    target_horizon: int = setting(
        1, "every-position backbones: each position learns an item drawn uniformly from the "
           "next H of its sequence (1: the next item), as evaluation asks for the user's "
           "future items, not only the next one")
    max_epochs: int = setting(40, "maximum epochs", flag="--epochs")
    # Early stopping counts evaluations.
    eval_every: int = setting(0, "validate every this many optimiser steps (0: three times "
                                 "an epoch)")
    patience: int = setting(15, "early stopping: evaluations without a better validation "
                                "score")
    # hard wall-clock cap, in case a user's data is large
    max_minutes: float = setting(30.0, "wall-clock cap on training, in minutes")
    seed: int = setting(0, "training seed")
    split_seed: int = setting(0, "seed of the users' train/valid/test split; fixed across "
                                 "training seeds")
    # docs/architecture.md, "Evaluation protocol"
    folds: int = setting(0, "user-level cross-validation: N folds (0: the 80/10/10 split)")
    fold: int = setting(0, "with --folds: test on this fold, validate on the next (0..N-1)")
    # docs/results.md, "The whole catalogue (issue 34)": every item with an event is served.
    min_item_count: int = setting(1, "items with fewer interactions are dropped (1: the whole "
                                     "catalogue; ComiRec's protocol: 5)")
    comirec_protocol: bool = setting(
        False, "the default before the whole catalogue, for comparison with papers: sets "
               "--min-item-count 5 --no-item-text --no-text-only-items (ComiRec's filter)")
    min_user_count: int = setting(5, "users with fewer interactions (after the items' "
                                     "filter) are dropped", cli=False)
    train_events: int = setting(
        0, "training users keep only their first N events (0: all): sparse behaviour; "
           "validation and test users are unchanged")
    threads: int = setting(0, "torch intra-op threads (0: torch's default)")
    # ESIM (docs/architecture.md, "ESIM: semantics in training"): training only, the exported
    # encoder is the same network.
    esim: bool = esim_setting(False, "add the ESIM losses after a warm-up")
    llm: LLMBackend = esim_setting(
        "local", "who names the interests: local SmolLM2 (default), an OpenAI-compatible "
                 "endpoint (LLM_BASE_URL, LLM_MODEL, LLM_API_KEY), item categories "
                 "(metadata, no LLM), or ORACLE: the true planted topics of synthetic "
                 "data (an upper bound, no LLM)")
    esim_warmup_epochs: float = esim_setting(1.0, "epochs of IBIM alone before the typical "
                                                  "users are chosen")
    esim_clusters: int = esim_setting(8, "C: k-means clusters of training users")
    esim_users_per_cluster: int = esim_setting(2, "m: typical users (nearest the centroid) "
                                                     "per cluster")
    esim_llm_budget: int | None = esim_setting(
        None, "at most this many LLM-labelled users (default clusters x users-per-cluster)",
        flag="--llm-budget")
    esim_labels: int = esim_setting(16, "interest vocabulary size (L_pred's label count)")
    esim_alpha: float = esim_setting(0.1, "L_pred weight")
    esim_beta: float = esim_setting(0.1, "L_align weight")
    esim_tau: float = esim_setting(0.1, "InfoNCE temperature")
    esim_matching: MatchingRule = esim_setting(
        "attention", "semantic -> behavioural interest matching rule")
    esim_level: EsimLevel = esim_setting(
        "individual", "who is supervised: typical users (individual), every member of crowds "
                      "of similar users through one synthesized user per crowd (crowd), both")
    esim_crowds: int = esim_setting(16, "crowds (one labeller call each) at the crowd level")
    esim_crowd_items: int = esim_setting(20, "items of a synthesized user (max-cover prompt "
                                             "budget)")
    esim_merge_threshold: float = esim_setting(
        0.85, "cosine at which a crowd's interests count as one and are merged")
    esim_batch_users: int = esim_setting(64, "supervised users in the ESIM losses per "
                                             "training step")
    # The item side (issue 23; docs/results.md, "Semantics where they can pay"): 0 is off.
    esim_item_weight: float = esim_setting(
        0.0, "L_item weight: items the labeller put under a semantic interest are pulled, "
             "through g, towards its embedding and pushed from the other interests' "
             "(InfoNCE); it shapes the item table, which the user-side losses leave alone")
    esim_batch_items: int = esim_setting(512, "labelled items in L_item per training step",
                                         cli=False)
    # The controls that tell a semantic gain from a regularisation effect (issue 23).
    esim_shuffle_items: bool = esim_setting(
        False, "a control for L_item: the labelled items' semantic interests are permuted "
               "among the items (each interest keeps its item count), so no true grouping "
               "of items is left; the pulls are random")
    esim_shuffle_labels: bool = esim_setting(
        False, "a control: the semantic interests are permuted among the labelled groups "
               "(users' and items' groups keep their structure and get another group's "
               "name), the same losses with the semantics broken")

    def __post_init__(self) -> None:
        if self.comirec_protocol:
            self.min_item_count, self.item_text, self.text_only_items = (
                COMIREC_MIN_ITEM_COUNT, False, False)
        if self.min_item_count < 1:
            raise ValueError(f"min_item_count must be >= 1, got {self.min_item_count}")
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
        if self.esim_item_weight < 0:
            raise ValueError(f"esim_item_weight must be >= 0, got {self.esim_item_weight}")
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
                     "esim_crowd_items", "esim_batch_users", "esim_batch_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.folds and (self.folds < 3 or not 0 <= self.fold < self.folds):
            raise ValueError(f"fold {self.fold} of {self.folds}: need folds >= 3 and "
                             "0 <= fold < folds")
        if self.target_horizon < 1:
            raise ValueError(f"target_horizon must be >= 1 (1 = the next item), got "
                             f"{self.target_horizon}")
        if self.score_positions < 0:
            raise ValueError(f"score_positions must be >= 0 (0 = every position), got "
                             f"{self.score_positions}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 = three times an epoch), got "
                             f"{self.eval_every}")
        for name in ("interests", "dim", "maxlen", "batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def for_data(self, has_item_text: bool) -> TrainConfig:
        """This configuration with the item-text settings off where the data has no item
        text (they are on by default); the one a run stores."""
        if has_item_text or not (self.item_text or self.text_only_items):
            return self
        return replace(self, item_text=False, text_only_items=False, shuffle_item_text=False)

    def split(self) -> dict[str, int]:
        """The build_dataset arguments that fix the users' split and filtering."""
        return {"min_item_count": self.min_item_count, "min_user_count": self.min_user_count,
                "split_seed": self.split_seed, "folds": self.folds, "fold": self.fold,
                "train_events": self.train_events}

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
