"""IBIM backbones: ComiRec-SA, ComiRec-DR and MIND behind one small interface.

Every encoder maps item_ids [B, L] (0 = padding, right-aligned) to interests [B, K, d]
(`forward`) and knows its training loss (`loss`). `encode` additionally returns the
item-to-interest assignment weights [B, K, L] (attention or routing), which ESIM uses to match
semantic interests to behavioural ones. Backbones are chosen by name with `build_encoder`.
Structure follows the official ComiRec code (Cen et al., KDD 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import TrainConfig

# Masked attention logits; finite so that an all-padding row gives zeros, not NaN.
MASK_LOGIT = -1e9


@dataclass
class Negatives:
    """Shared negatives of one batch with their log sampling probabilities (logQ)."""

    ids: Tensor  # [S] internal item ids
    log_q: Tensor  # [S]
    target_log_q: Tensor  # [B] logQ of each positive, for the same correction
    log_q_table: Tensor | None = None  # [N + 1] logQ of every item (positives at any position)

    def log_q_of(self, items: Tensor) -> Tensor:
        if self.log_q_table is None:
            raise ValueError("this loss needs the sampler's logQ table")
        return self.log_q_table[items]


@dataclass
class Encoded:
    interests: Tensor  # [B, K, d]
    weights: Tensor  # [B, K, L] how much each history position feeds each interest


class MultiInterestEncoder(nn.Module):
    def __init__(self, n_items: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.n_items, self.dim = n_items, cfg.dim
        self.num_interests, self.maxlen = cfg.interests, cfg.maxlen
        self.item_embedding = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def encode(self, item_ids: Tensor) -> Encoded:
        raise NotImplementedError

    def forward(self, item_ids: Tensor) -> Tensor:
        return self.encode(item_ids).interests

    def item_vectors(self) -> Tensor:
        """The retrieval corpus: embeddings of items 1..N (row i-1 = internal id i)."""
        return self.item_embedding.weight[1:]

    def loss(self, item_ids: Tensor, targets: Tensor, negatives: Negatives | None = None) -> Tensor:
        """Softmax over the catalogue (full) or over shared negatives with logQ correction;
        the user vector is the interest closest to the target (hard argmax readout)."""
        interests = self(item_ids)
        target_vec = self.item_embedding(targets)
        best = torch.einsum("bkd,bd->bk", interests, target_vec).argmax(dim=1)
        user = interests[torch.arange(len(targets)), best]
        if negatives is None:
            logits = user @ self.item_vectors().T
            return F.cross_entropy(logits, targets - 1)
        pos = (user * target_vec).sum(-1) - negatives.target_log_q
        neg = user @ self.item_embedding(negatives.ids).T - negatives.log_q
        neg = neg.masked_fill(negatives.ids[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([pos[:, None], neg], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(targets))


class ComiRecSA(MultiInterestEncoder):
    """Self-attentive readout: K attention heads over the (position-aware) history."""

    def __init__(self, n_items: int, cfg: TrainConfig) -> None:
        super().__init__(n_items, cfg)
        self.position = nn.Parameter(torch.empty(cfg.maxlen, cfg.dim))
        nn.init.xavier_uniform_(self.position)
        self.hidden = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.heads = nn.Linear(4 * cfg.dim, cfg.interests)

    def encode(self, item_ids: Tensor) -> Encoded:
        mask = item_ids != 0
        items = self.item_embedding(item_ids)  # [B, L, d]
        hidden = torch.tanh(self.hidden(items + self.position[-item_ids.shape[1] :]))
        logits = self.heads(hidden).transpose(1, 2)  # [B, K, L]
        logits = logits.masked_fill(~mask[:, None, :], MASK_LOGIT)
        weights = torch.softmax(logits, dim=-1)
        return Encoded(weights @ items, weights)


def squash(x: Tensor) -> Tensor:
    norm_sq = (x * x).sum(-1, keepdim=True)
    return norm_sq / (1 + norm_sq) / torch.sqrt(norm_sq + 1e-9) * x


class CapsuleEncoder(MultiInterestEncoder):
    """Dynamic routing (3 iterations) from behaviour capsules to K interest capsules."""

    iterations = 3

    def behaviour_capsules(self, items: Tensor) -> Tensor:  # [B, L, d] -> [B, K, L, d]
        raise NotImplementedError

    def initial_logits(self, item_ids: Tensor) -> Tensor:  # [B, K, L]
        raise NotImplementedError

    def readout(self, capsules: Tensor) -> Tensor:
        return capsules

    def encode(self, item_ids: Tensor) -> Encoded:
        mask = (item_ids != 0)[:, None, :].to(torch.float32)  # [B, 1, L]
        hat = self.behaviour_capsules(self.item_embedding(item_ids))
        hat_frozen = hat.detach()  # routing updates do not backpropagate (as ComiRec)
        logits = self.initial_logits(item_ids)
        for i in range(self.iterations):
            weights = torch.softmax(logits, dim=1) * mask  # softmax over interests
            last = i == self.iterations - 1
            capsules = squash((weights[:, :, None, :] @ (hat if last else hat_frozen))[:, :, 0])
            if not last:
                logits = logits + (hat_frozen @ capsules[..., None])[..., 0]
        return Encoded(self.readout(capsules), weights)


class ComiRecDR(CapsuleEncoder):
    """ComiRec-DR: a separate bilinear map per history position, routing logits from zero."""

    def __init__(self, n_items: int, cfg: TrainConfig) -> None:
        super().__init__(n_items, cfg)
        self.bilinear = nn.Parameter(torch.empty(cfg.maxlen, cfg.interests * cfg.dim, cfg.dim))
        nn.init.normal_(self.bilinear, std=cfg.dim**-0.5)

    def behaviour_capsules(self, items: Tensor) -> Tensor:
        b, length, d = items.shape
        hat = torch.einsum("lod,bld->blo", self.bilinear[-length:], items)
        return hat.reshape(b, length, self.num_interests, d).transpose(1, 2)

    def initial_logits(self, item_ids: Tensor) -> Tensor:
        b, length = item_ids.shape
        return torch.zeros(b, self.num_interests, length, device=item_ids.device)


class MIND(CapsuleEncoder):
    """MIND: one shared bilinear map, random routing logits, ReLU layer on the capsules.

    The behaviour capsules are shared by the K interests, so only the random initial routing
    logits tell the interests apart. In training they are drawn afresh for every batch and
    user (truncated normal, as MIND and ComiRec do), so the interests must become distinct
    through routing itself; at evaluation and serving one draw made at construction (a
    buffer) is used, so that answers are deterministic and the ONNX graph has no random op.
    """

    def __init__(self, n_items: int, cfg: TrainConfig) -> None:
        super().__init__(n_items, cfg)
        self.shared_map = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.register_buffer(
            "routing_init", nn.init.trunc_normal_(torch.empty(cfg.interests, cfg.maxlen))
        )
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def behaviour_capsules(self, items: Tensor) -> Tensor:
        return self.shared_map(items)[:, None].expand(-1, self.num_interests, -1, -1)

    def initial_logits(self, item_ids: Tensor) -> Tensor:
        b, length = item_ids.shape
        if self.training:
            return nn.init.trunc_normal_(torch.empty(b, self.num_interests, length,
                                                     device=item_ids.device))
        return self.routing_init[None, :, -length:].expand(b, -1, -1)

    def readout(self, capsules: Tensor) -> Tensor:
        return F.relu(self.out(capsules))


class CausalBlock(nn.Module):
    """One SASRec block: causal single-head self-attention and a point-wise feed-forward
    layer, each with a residual connection, layer norm first, and dropout. Written out with
    plain ops (no nn.MultiheadAttention fast path) so that it exports to ONNX as it trains."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, L, d], allowed [B, L, L] (query, key) -> (x, attention weights)."""
        q, k, v = self.qkv(self.attn_norm(x)).chunk(3, dim=-1)
        logits = (q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
        weights = torch.softmax(logits.masked_fill(~allowed, MASK_LOGIT), dim=-1)
        x = x + self.dropout(weights @ v)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, weights


class SASRec(MultiInterestEncoder):
    """SASRec (Kang & McAuley 2018): causal self-attention over the history, one vector per
    user (K = 1), trained on every position (each position predicts the next item).

    The single-interest reference every multi-interest result is shown beside (DESIGN 4), and
    a choice for users whose data is not multi-interest. It serves like the others."""

    blocks_count = 2
    dropout = 0.2

    def __init__(self, n_items: int, cfg: TrainConfig) -> None:
        super().__init__(n_items, cfg)
        self.num_interests = 1
        self.position = nn.Parameter(torch.empty(cfg.maxlen, cfg.dim))
        nn.init.xavier_uniform_(self.position)
        self.blocks = nn.ModuleList(CausalBlock(cfg.dim, self.dropout)
                                    for _ in range(self.blocks_count))
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.input_dropout = nn.Dropout(self.dropout)

    def sequence(self, item_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Hidden state after every position [B, L, d], and the last block's attention."""
        length = item_ids.shape[1]
        mask = item_ids != 0
        x = self.item_embedding(item_ids) * self.dim**0.5 + self.position[-length:]
        x = self.input_dropout(x) * mask[..., None]
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool,
                                       device=item_ids.device))
        allowed = causal[None] & mask[:, None, :]
        weights = allowed.to(x.dtype)  # replaced by the blocks' attention below
        for block in self.blocks:
            x, weights = block(x, allowed)
            x = x * mask[..., None]
        return self.out_norm(x), weights

    def encode(self, item_ids: Tensor) -> Encoded:
        hidden, weights = self.sequence(item_ids)
        return Encoded(hidden[:, -1:], weights[:, -1:])  # the state after the latest item

    def loss(self, item_ids: Tensor, targets: Tensor, negatives: Negatives | None = None) -> Tensor:
        """Every position predicts the item that follows it: the history shifted by one, then
        the target. Padding positions are left out."""
        hidden, _ = self.sequence(item_ids)  # [B, L, d]
        following = torch.cat([item_ids[:, 1:], targets[:, None]], dim=1)  # [B, L]
        keep = item_ids != 0
        users, wanted = hidden[keep], following[keep]  # [P, d], [P]
        if negatives is None:
            return F.cross_entropy(users @ self.item_vectors().T, wanted - 1)
        pos = (users * self.item_embedding(wanted)).sum(-1) - negatives.log_q_of(wanted)
        neg = users @ self.item_embedding(negatives.ids).T - negatives.log_q
        neg = neg.masked_fill(negatives.ids[None, :] == wanted[:, None], float("-inf"))
        return F.cross_entropy(torch.cat([pos[:, None], neg], dim=1),
                               torch.zeros_like(wanted))


BACKBONE_CLASSES: dict[str, type[MultiInterestEncoder]] = {
    "comirec-sa": ComiRecSA,
    "comirec-dr": ComiRecDR,
    "mind": MIND,
    "sasrec": SASRec,
}


def build_encoder(n_items: int, cfg: TrainConfig) -> MultiInterestEncoder:
    return BACKBONE_CLASSES[cfg.backbone](n_items, cfg)
