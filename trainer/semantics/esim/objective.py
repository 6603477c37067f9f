"""ESIM's auxiliary objective: L_pred and L_align over supervised users, either level.

Training only: the heads (g, the label predictor) live here, not in the encoder, so the
exported inference graph is the same with or without ESIM.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.bundle.format import SEMANTIC_DIM
from trainer.config import TrainConfig
from trainer.encoders.base import MultiInterestEncoder

# --- supervision: which users get which semantic interests --------------------------------------


class EsimError(RuntimeError):
    """ESIM cannot run (a model package missing, no typical user labelled)."""




@dataclass
class Supervision:
    """Semantic supervision, from either level. Row r: supervised user owner[r] has the
    semantic interest proto[r], whose items sit at the history slots marked in positions[r]."""

    users: np.ndarray  # [U] dataset user index of each supervised user (a user may repeat)
    histories: np.ndarray  # [U, maxlen] what the encoder sees of them
    owner: np.ndarray  # [N] supervised-user row of each (user, interest) row
    positions: np.ndarray  # [N, maxlen] float32, 1 at the interest's items
    proto: np.ndarray  # [N] the semantic interest (index into texts / semantic)
    texts: list[str]  # [P] "name: description"
    semantic: np.ndarray  # [P, 384] unit length
    crowd: np.ndarray  # [P] the crowd a semantic interest was named for; -1: individual level


def join(parts: Sequence[Supervision]) -> Supervision:
    """Both levels' supervision as one (dual): rows, users and semantic interests renumbered."""
    user_off = np.cumsum([0] + [len(p.users) for p in parts])[:-1]
    proto_off = np.cumsum([0] + [len(p.texts) for p in parts])[:-1]
    return Supervision(
        users=np.concatenate([p.users for p in parts]),
        histories=np.concatenate([p.histories for p in parts]),
        owner=np.concatenate([p.owner + o for p, o in zip(parts, user_off, strict=True)]),
        positions=np.concatenate([p.positions for p in parts]),
        proto=np.concatenate([p.proto + o for p, o in zip(parts, proto_off, strict=True)]),
        texts=[t for p in parts for t in p.texts],
        semantic=np.concatenate([p.semantic for p in parts]).astype(np.float32),
        crowd=np.concatenate([p.crowd for p in parts]))


Encode = Callable[[list[str]], np.ndarray]  # texts -> unit-length semantic embeddings

# ESIM's torch seed is the training seed plus this (the loop's stream is the seed itself).
ESIM_SEED_OFFSET = 7919


def shuffle_semantics(sup: Supervision, labels: np.ndarray, seed: int
                      ) -> tuple[Supervision, np.ndarray]:
    """The shuffled-label control: the semantic interests (texts, embeddings and vocabulary
    labels together) permuted among the labelled groups, from a stream of its own. Who is
    grouped with whom, and the multiset of semantics and labels, stay; which group carries
    which name does not (a cyclic shift of a random order: no group keeps its own)."""
    n = len(sup.texts)
    order = np.random.default_rng([seed, ESIM_SEED_OFFSET]).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, 1)
    shuffled = Supervision(users=sup.users, histories=sup.histories, owner=sup.owner,
                           positions=sup.positions, proto=sup.proto,
                           texts=[sup.texts[p] for p in perm], semantic=sup.semantic[perm],
                           crowd=sup.crowd)
    return shuffled, labels[perm]


def labelled_items(histories: np.ndarray, owner: np.ndarray, positions: np.ndarray,
                   proto: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The item side of the supervision: every (item, semantic interest) pair where a
    supervised user's history holds the item at one of the interest's slots, once each.
    Returns item ids [M] and their semantic interests [M]."""
    rows, slots = np.nonzero(positions > 0)
    items = histories[owner[rows], slots]
    keep = items > 0
    pairs = np.unique(np.stack([items[keep], proto[rows][keep]], axis=1), axis=0)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


# --- the auxiliary objective --------------------------------------------------------------------


class EsimHeads(nn.Module):
    def __init__(self, dim: int, labels: int) -> None:
        super().__init__()
        self.projection = nn.Linear(dim, SEMANTIC_DIM)  # g
        self.predictor = nn.Linear(dim, labels)


class EsimObjective:
    """The ESIM losses over a batch of supervised users, recomputed at every training step.

    `semantic` and `labels` are per semantic interest; `proto` maps each row to its semantic
    interest (default: one per row, as the individual level builds them) and `crowd` says
    which crowd each semantic interest belongs to (default: none, the individual level).
    L_align's negatives: for an individual-level row the batch's other semantics (as
    before); for a crowd-level row the other crowds' semantic interests. Interests sharing a
    vocabulary label are never negatives of each other."""

    def __init__(self, cfg: TrainConfig, histories: np.ndarray, owner: np.ndarray,
                 positions: np.ndarray, semantic: np.ndarray, labels: np.ndarray,
                 proto: np.ndarray | None = None, crowd: np.ndarray | None = None,
                 texts: list[str] | None = None) -> None:
        self.cfg = cfg
        self.texts = texts or []  # [P] "name: description", for naming (esim/naming.py)
        self.histories = torch.from_numpy(histories)  # [U, maxlen]
        self.owner = torch.from_numpy(owner)  # [N] user row of each semantic interest row
        self.positions = torch.from_numpy(positions)  # [N, maxlen] its items' history slots
        self.semantic = torch.from_numpy(semantic)  # [P, 384], unit length
        self.labels = torch.from_numpy(labels)  # [P] vocabulary label
        self.proto = (torch.arange(len(owner)) if proto is None
                      else torch.from_numpy(proto))  # [N]
        self.crowd = (torch.full((len(semantic),), -1) if crowd is None
                      else torch.from_numpy(crowd))  # [P]
        n_labels = int(labels.max()) + 1
        self.targets = torch.zeros(len(histories), n_labels)  # [U, L] multi-hot
        self.targets[self.owner, self.labels[self.proto]] = 1.0
        # The crowd level contrasts against every crowd's semantic interests.
        self.crowd_table = (self.crowd >= 0).nonzero()[:, 0]  # [Pc] prototype ids
        self.crowd_rank = torch.full((len(semantic),), -1, dtype=torch.long)
        self.crowd_rank[self.crowd_table] = torch.arange(len(self.crowd_table))
        # ESIM's own random streams (its heads' initialisation, its batches, its encoder
        # passes' dropout), so that switching it on with zero weights leaves the encoder's
        # training exactly as without it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + ESIM_SEED_OFFSET)
            self.heads = EsimHeads(cfg.dim, n_labels)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        items, item_proto = labelled_items(histories, owner, positions, self.proto.numpy())
        if cfg.esim_shuffle_items:  # the stronger control: no grouping of items is left
            item_proto = np.random.default_rng([cfg.seed, ESIM_SEED_OFFSET, 1]).permutation(
                item_proto)
        self.items, self.item_proto = torch.from_numpy(items), torch.from_numpy(item_proto)

    def parameters(self):
        return self.heads.parameters()

    def sample_users(self) -> Tensor:
        """The supervised users of this step: all of them when they fit in esim_batch_users
        (then no random draw: the individual level behaves as before), else a random batch,
        so that a step stays cheap with hundreds of crowd-supervised users."""
        n = len(self.histories)
        if n <= self.cfg.esim_batch_users:
            return torch.arange(n)
        return torch.randperm(n, generator=self.generator)[: self.cfg.esim_batch_users].sort()[0]

    def match(self, interests: Tensor, weights: Tensor, rows: Tensor | None = None,
              owner: Tensor | None = None) -> Tensor:
        """The behavioural interest (index into K) matched to each semantic interest row
        (`rows`, default all; `owner`: their users' rows in `interests`)."""
        rows = torch.arange(len(self.owner)) if rows is None else rows
        owner = self.owner[rows] if owner is None else owner
        if self.cfg.esim_matching == "attention":
            # The interest whose attention / routing weights cover the semantic interest's
            # items best.
            cover = (weights[owner] * self.positions[rows][:, None, :]).sum(-1)  # [N, K]
            return cover.argmax(-1)
        # "similarity": one-to-one (Hungarian, by enumeration: K is small) on cos(g(v), e).
        with torch.no_grad():
            z = F.normalize(self.heads.projection(interests), dim=-1)  # [U, K, 384]
            sim = torch.einsum("nkd,nd->nk", z[owner], self.semantic[self.proto[rows]])
        match = torch.empty(len(rows), dtype=torch.long)
        k = interests.shape[1]
        for user in torch.unique(owner):
            mine = (owner == user).nonzero()[:, 0]
            best = max(itertools.permutations(range(k), len(mine)),
                       key=lambda p: float(sim[mine, list(p)].sum()))
            match[mine] = torch.tensor(best)
        return match

    def individual_align(self, z: Tensor, protos: Tensor) -> Tensor:
        """InfoNCE of rows z [n, 384] vs their semantic interests, the batch's others as
        negatives."""
        logits = z @ self.semantic[protos].T / self.cfg.esim_tau
        labels = self.labels[protos]
        same = labels[:, None] == labels[None, :]
        logits = logits.masked_fill(same & ~torch.eye(len(z), dtype=torch.bool), float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(z)))

    def crowd_align(self, z: Tensor, protos: Tensor) -> Tensor:
        """InfoNCE of rows z vs their crowd interests, every other crowd's interests as
        negatives (not only the batch's: there are few crowd interests)."""
        table = self.crowd_table
        logits = z @ self.semantic[table].T / self.cfg.esim_tau  # [n, Pc]
        target = self.crowd_rank[protos]
        # Neither positive nor negative: the crowd's own other interests, same-label ones.
        hide = ((self.crowd[table][None, :] == self.crowd[protos][:, None])
                | (self.labels[table][None, :] == self.labels[protos][:, None]))
        hide[torch.arange(len(z)), target] = False
        return F.cross_entropy(logits.masked_fill(hide, float("-inf")), target)

    def item_align(self, model: MultiInterestEncoder) -> Tensor:
        """L_item, the item side: InfoNCE of g(item vector) vs the semantic interest the
        labeller put the item under, every other semantic interest as a negative except
        those sharing its vocabulary label. Through the same g as L_align, so an interest
        and its items are pulled towards one point; a batch of esim_batch_items pairs."""
        n = len(self.items)
        pick = (torch.arange(n) if n <= self.cfg.esim_batch_items else
                torch.randperm(n, generator=self.generator)[: self.cfg.esim_batch_items])
        protos = self.item_proto[pick]
        z = F.normalize(self.heads.projection(model.embed_items(self.items[pick])), dim=-1)
        logits = z @ self.semantic.T / self.cfg.esim_tau  # [n, P]
        hide = self.labels[None, :] == self.labels[protos][:, None]
        hide[torch.arange(len(pick)), protos] = False
        return F.cross_entropy(logits.masked_fill(hide, float("-inf")), protos)

    def loss(self, model: MultiInterestEncoder) -> tuple[Tensor, dict[str, float]]:
        users = self.sample_users()
        local = torch.full((len(self.histories),), -1, dtype=torch.long)
        local[users] = torch.arange(len(users))
        rows = (local[self.owner] >= 0).nonzero()[:, 0]
        owner = local[self.owner[rows]]
        with torch.random.fork_rng(devices=[]):  # dropout from ESIM's stream, not the loop's
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))
            encoded = model.encode(self.histories[users])
        interests = encoded.interests  # [B, K, d]
        match = self.match(interests, encoded.weights.detach(), rows, owner)
        z = F.normalize(self.heads.projection(interests[owner, match]), dim=-1)
        protos = self.proto[rows]
        crowd_rows = self.crowd[protos] >= 0
        terms = [(fn(z[keep], protos[keep]), int(keep.sum()))
                 for fn, keep in ((self.individual_align, ~crowd_rows),
                                  (self.crowd_align, crowd_rows)) if keep.any()]
        align = sum(t * n for t, n in terms) / sum(n for _, n in terms)
        label_logits = self.heads.predictor(interests).max(dim=1).values  # [B, L]
        pred = F.binary_cross_entropy_with_logits(label_logits, self.targets[users])
        total = self.cfg.esim_alpha * pred + self.cfg.esim_beta * align
        parts = {"align": align.item(), "pred": pred.item()}
        if self.cfg.esim_item_weight and len(self.items):
            item = self.item_align(model)
            total = total + self.cfg.esim_item_weight * item
            parts["item"] = item.item()
        return total, parts
