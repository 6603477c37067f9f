"""Wiring ESIM into training: after the warm-up, label users at the configured level(s), build
the interest vocabulary and the `EsimObjective` the training loop adds to its loss.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import TrainConfig
from trainer.data.dataset import SequenceDataset
from trainer.encoders.base import MultiInterestEncoder
from trainer.semantics.esim.individual import individual_level
from trainer.semantics.esim.objective import (
    Encode,
    EsimError,
    EsimObjective,
    Supervision,
    join,
    shuffle_semantics,
)
from trainer.semantics.esim.vocabulary import interest_vocabulary
from trainer.semantics.llm.backends import LLMSettings
from trainer.semantics.llm.labellers import (
    Labeller,
    LabelStats,
    make_labeller,
    require_planted_topics,
)
from trainer.semantics.text_encoder import SentenceEncoder

log = logging.getLogger(__name__)


def lazy_encoder(encoder: SentenceEncoder | None) -> Encode:
    """MiniLM is loaded on first use only (a run whose labelling fails does not load it)."""
    loaded: list[SentenceEncoder] = [encoder] if encoder is not None else []

    def encode(texts: list[str]) -> np.ndarray:
        if not loaded:
            loaded.append(SentenceEncoder())
        return loaded[0].encode(texts)

    return encode


def prepare_esim(model: MultiInterestEncoder, dataset: SequenceDataset, cfg: TrainConfig,
                 labeller: Labeller, run_dir: Path | None, progress: bool = True,
                 encoder: SentenceEncoder | None = None) -> tuple[EsimObjective, dict[str, Any]]:
    """The levels' supervision -> vocabulary -> the objective, and a report (also written to
    run_dir/esim/)."""
    from trainer.semantics.esim.crowd import crowd_level

    encode = lazy_encoder(encoder)
    parts: list[Supervision] = []
    report: dict[str, Any] = {"level": cfg.esim_level}
    if cfg.esim_level in ("individual", "dual"):
        part, individual = individual_level(model, dataset, cfg, labeller, encode, run_dir,
                                            progress)
        report.update(individual)
        parts += [part] if part is not None else []
    if cfg.esim_level in ("crowd", "dual"):
        part, report["crowd"] = crowd_level(model, dataset, cfg, labeller, encode, run_dir,
                                            progress)
        parts += [part] if part is not None else []
    stats: LabelStats = labeller.stats
    if not parts:
        who = {"individual": "typical user", "crowd": "synthesized user of a crowd",
               "dual": "typical user or synthesized user"}[cfg.esim_level]
        raise EsimError(f"ESIM: no {who} could be labelled ({stats.to_dict()})")
    sup = join(parts)
    labels = interest_vocabulary(sup.semantic, cfg.esim_labels, seed=cfg.seed)
    if cfg.esim_shuffle_labels:
        sup, labels = shuffle_semantics(sup, labels, cfg.seed)
    objective = EsimObjective(cfg, sup.histories, sup.owner, sup.positions, sup.semantic,
                              labels, proto=sup.proto, crowd=sup.crowd, texts=sup.texts)
    report = {
        "source": stats.source, "backend": stats.backend, **report,
        "supervised_users": len(np.unique(sup.users)),
        "semantic_interests": len(sup.texts), "vocabulary": int(labels.max()) + 1,
        "labelled_items": len(np.unique(objective.items)),
        "shuffled_labels": cfg.esim_shuffle_labels, "shuffled_items": cfg.esim_shuffle_items,
        "llm": stats.to_dict(),
    }
    if run_dir is not None:
        vocab: dict[int, list[str]] = {}
        for text, label in zip(sup.texts, labels, strict=True):
            vocab.setdefault(int(label), []).append(text)
        (Path(run_dir) / "esim" / "vocabulary.json").write_text(json.dumps(vocab, indent=1))
    log.info("ESIM ready: %s", json.dumps(report))
    return objective, report


def esim_setup(dataset: SequenceDataset, cfg: TrainConfig, run_dir: Path | None,
               progress: bool = True, settings: LLMSettings | None = None):
    """The `esim_setup` argument of trainer.training.loop.train for this config (None without ESIM);
    the LLM backend is built only when the warm-up ends."""
    if not cfg.esim:
        return None
    if cfg.llm == "oracle":  # refuse now, not after the warm-up
        require_planted_topics(dataset.item_ids[1:], dataset.categories[1:])

    def setup(model: MultiInterestEncoder) -> tuple[EsimObjective, dict[str, Any]]:
        labeller = make_labeller(cfg.llm, cfg.interests, settings, threads=cfg.threads)
        objective, report = prepare_esim(model, dataset, cfg, labeller, run_dir, progress)
        report["settings"] = cfg.esim_settings()
        return objective, report

    return setup
