"""Typical users: k-means over users' mean interest vectors, the m users nearest each centroid,
and the items of theirs a labeller is shown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.data.dataset import SequenceDataset
from trainer.encoders.base import MultiInterestEncoder
from trainer.semantics.llm.prompt import PromptItem

log = logging.getLogger(__name__)


@dataclass
class TypicalUsers:
    users: np.ndarray  # user indices into the dataset
    clusters: np.ndarray  # the centroid each was chosen for
    distances: np.ndarray  # squared L2 to that centroid
    histories: np.ndarray  # [U, maxlen] right-aligned, what the encoder and the prompt see

    def to_json(self, dataset: SequenceDataset) -> list[dict[str, Any]]:
        return [{"user_id": str(dataset.user_ids[u]), "cluster": int(c),
                 "distance": round(float(d), 5)}
                for u, c, d in zip(self.users, self.clusters, self.distances, strict=True)]


def last_histories(dataset: SequenceDataset, users: np.ndarray, maxlen: int) -> np.ndarray:
    ends = np.diff(dataset.offsets)[users]
    return dataset.histories(users, ends, maxlen)


def behaviour_means(model: MultiInterestEncoder, histories: np.ndarray) -> np.ndarray:
    """Each user's behavioural representation: the mean of its K interest vectors (what both
    typical users and crowds are clustered on)."""
    model.eval()
    with torch.no_grad():
        return np.concatenate([
            model(torch.from_numpy(histories[lo : lo + 1024])).mean(dim=1).numpy()
            for lo in range(0, len(histories), 1024)]).astype(np.float32)


def select_typical_users(model: MultiInterestEncoder, dataset: SequenceDataset,
                         cfg: TrainConfig) -> TypicalUsers:
    """C k-means clusters over training users' mean interest vectors; the m users nearest each
    centroid (each user at most once)."""
    users = dataset.train_users
    histories = last_histories(dataset, users, cfg.maxlen)
    means = behaviour_means(model, histories)
    clusters = min(cfg.esim_clusters, len(users))
    kmeans = faiss.Kmeans(means.shape[1], clusters, niter=25, seed=cfg.seed + 1, verbose=False)
    kmeans.train(means)
    per_centroid = min(cfg.esim_users_per_cluster, len(users))
    index = faiss.IndexFlatL2(means.shape[1])
    index.add(means)
    dist, nearest = index.search(kmeans.centroids, min(len(users), per_centroid * clusters))
    chosen: dict[int, tuple[int, float]] = {}
    for c in range(clusters):
        taken = 0
        for d, i in zip(dist[c], nearest[c], strict=True):
            if taken == per_centroid:
                break
            if i >= 0 and int(i) not in chosen:
                chosen[int(i)] = (c, float(d))
                taken += 1
    rows = np.array(sorted(chosen), dtype=np.int64)
    return TypicalUsers(
        users=users[rows], clusters=np.array([chosen[r][0] for r in rows]),
        distances=np.array([chosen[r][1] for r in rows]), histories=histories[rows])


def prompt_items(dataset: SequenceDataset, history: np.ndarray) -> list[PromptItem]:
    items = history[history > 0]
    return [PromptItem(title=str(dataset.titles[i]) or str(dataset.item_ids[i]),
                       year=float(dataset.years[i]) if np.isfinite(dataset.years[i]) else None,
                       categories=tuple(c for c in str(dataset.categories[i]).split("|") if c))
            for i in items]
