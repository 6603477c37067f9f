"""The quality gate's measurement: a bundle's metrics through the service's own recommend path,
on held-out users given as external ids (comparable across bundles).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from service.bundle.load import load_bundle
from service.serving.recommender import Recommender
from trainer.data.dataset import SequenceDataset
from trainer.training.metrics import CUTOFFS, aggregate

log = logging.getLogger(__name__)

def held_out(dataset: SequenceDataset, maxlen: int) -> tuple[list[list[str]], list[np.ndarray]]:
    """Test users' histories and targets as external ids (comparable across bundles)."""
    split = dataset.eval_split("test", maxlen)
    histories = [dataset.item_ids[h[h != 0]].tolist() for h in split.histories]
    targets = [dataset.item_ids[t] for t in split.targets]
    return histories, targets


def evaluate_served_path(bundle_dir: Path, histories: list[list[str]],
                         targets: list[np.ndarray],
                         cutoffs: tuple[int, ...] = CUTOFFS) -> dict[str, float]:
    """Metrics of a bundle through the service's own recommend path."""
    rec = Recommender(load_bundle(bundle_dir))
    n = max(cutoffs)
    ranked = [np.array(rec.recommend(h, n, fanout=n).item_ids, dtype=object) for h in histories]
    return aggregate(ranked, targets, cutoffs)
