"""The individual level: typical users' LLM-named interests, embedded and matched to their
behavioural interests, as one `Supervision`.
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
from trainer.semantics.esim.objective import Encode, Supervision
from trainer.semantics.esim.typical_users import TypicalUsers, prompt_items, select_typical_users
from trainer.semantics.llm.labellers import (
    Interest,
    Labeller,
    label_users,
)

log = logging.getLogger(__name__)


def individual_level(model: MultiInterestEncoder, dataset: SequenceDataset, cfg: TrainConfig,
                     labeller: Labeller, encode: Encode, run_dir: Path | None,
                     progress: bool = True) -> tuple[Supervision | None, dict[str, Any]]:
    """Typical users -> labels -> their supervision (None when nobody could be labelled)."""
    typical = select_typical_users(model, dataset, cfg)
    budget = cfg.esim_llm_budget
    if budget is not None and budget < len(typical.users):
        # Keep the users nearest their centroids.
        keep = np.sort(np.argsort(typical.distances, kind="stable")[:budget])
        typical = TypicalUsers(typical.users[keep], typical.clusters[keep],
                               typical.distances[keep], typical.histories[keep])
    lists = [prompt_items(dataset, h) for h in typical.histories]
    answers, stats = label_users(labeller, lists, progress=progress)

    rows, owner, positions, texts = [], [], [], []
    kept: list[tuple[int, list[Interest]]] = []
    for row, interests in enumerate(answers):
        if not interests:
            continue
        kept.append((row, interests))
        offset = cfg.maxlen - len(lists[row])  # list number i sits at history slot offset + i
        for interest in interests:
            mask = np.zeros(cfg.maxlen, dtype=np.float32)
            mask[[offset + i for i in interest.items]] = 1.0
            owner.append(len(rows))
            positions.append(mask)
            texts.append(interest.text())
        rows.append(row)
    report = {"typical_users": len(typical.users), "labelled_users": len(rows)}
    if run_dir is not None:
        out = Path(run_dir) / "esim"
        out.mkdir(parents=True, exist_ok=True)
        (out / "typical_users.json").write_text(json.dumps(typical.to_json(dataset), indent=1))
        labelled = [{"user_id": str(dataset.user_ids[typical.users[row]]),
                     "source": stats.source,
                     "items": [it.line() for it in lists[row]],
                     "interests": [{"name": i.name, "description": i.description,
                                    "items": [n + 1 for n in i.items]} for i in interests]}
                    for row, interests in kept]
        (out / "interests.json").write_text(json.dumps(labelled, indent=1))
    if not texts:
        return None, report
    supervision = Supervision(
        users=typical.users[rows], histories=typical.histories[rows],
        owner=np.array(owner, dtype=np.int64), positions=np.stack(positions),
        proto=np.arange(len(texts)), texts=texts,
        semantic=encode(texts).astype(np.float32), crowd=np.full(len(texts), -1))
    return supervision, report
