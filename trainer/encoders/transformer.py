"""Transformer backbones: SASRec (one interest) and Transformer-SA (K heads over its states)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from trainer.config import TrainConfig
from trainer.encoders.base import MASK_LOGIT, Encoded, MultiInterestEncoder, Negatives


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

    The single-interest reference every multi-interest result is shown beside
    (docs/architecture.md, "Encoders and losses"), and a choice for users whose data is not
    multi-interest. It serves like the others."""

    blocks_count = 2
    dropout = 0.2
    every_position = True

    def __init__(self, n_items: int, cfg: TrainConfig) -> None:
        super().__init__(n_items, cfg)
        self.num_interests = 1
        self.score_positions = cfg.score_positions  # 0: every position is a training target
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
        x = self.embed_items(item_ids) * self.dim**0.5 + self.position[-length:]
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
        following, keep = next_items(item_ids, targets, self.score_positions)
        with record_function("score"):  # the scoring, apart from the encoder (profiles)
            return self.softmax_loss(hidden[keep], following[keep], negatives)


def next_items(item_ids: Tensor, targets: Tensor, last: int = 0) -> tuple[Tensor, Tensor]:
    """The target of every history position [B, L], and which positions are trained [B, L]:
    real items (not padding), and with `last` > 0 only the last `last` positions of the
    window. `targets` [B] is the item after the window (each position's target is then the
    item after it: the history shifted by one, then the target); [B, L] gives every
    position's target (--target-horizon)."""
    keep = item_ids != 0
    if 0 < last < item_ids.shape[1]:
        keep[:, : item_ids.shape[1] - last] = False
    if targets.dim() == 2:
        return targets, keep
    return torch.cat([item_ids[:, 1:], targets[:, None]], dim=1), keep


class TransformerSA(SASRec):
    """SASRec's causal self-attention blocks under ComiRec-SA's K interest heads.

    The blocks give every position a contextualised state; the K heads then attend over the
    states up to each position, so every position has its own K interests and, as in SASRec,
    every position is trained to predict the item that follows it, an item scoring by its
    best interest (`interest_loss`). Serving reads the K interests after the latest item,
    the training computation at the last position. It replaced ComiRec-SA as the default
    (docs/results.md: 10-fold comparison)."""

    def __init__(self, n_items: int, cfg: TrainConfig) -> None:
        super().__init__(n_items, cfg)
        self.num_interests = cfg.interests
        self.hidden = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.heads = nn.Linear(4 * cfg.dim, cfg.interests)

    def head_logits(self, states: Tensor) -> Tensor:
        """ComiRec-SA's K attention logits over the states [B, L, d] -> [B, K, L]."""
        return self.heads(torch.tanh(self.hidden(states))).transpose(1, 2)

    def interests_at_every_position(self, item_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Interests [B, L, K, d] after every position, and the last position's attention
        weights [B, K, L]."""
        states, _ = self.sequence(item_ids)  # [B, L, d]
        length = item_ids.shape[1]
        logits = self.head_logits(states)
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool,
                                       device=item_ids.device))
        allowed = causal[None, None] & (item_ids != 0)[:, None, None, :]  # [B, 1, Lq, Lk]
        per_query = logits[:, :, None, :].masked_fill(~allowed, MASK_LOGIT)  # [B, K, Lq, Lk]
        # A padding query allows no key: zero weights, not a uniform mix of later items.
        weights = torch.softmax(per_query, dim=-1) * allowed
        interests = (weights @ states[:, None]).transpose(1, 2)  # [B, L, K, d]
        return interests, weights[:, :, -1]

    def encode(self, item_ids: Tensor) -> Encoded:
        # The last row of interests_at_every_position (the latest item sees every earlier
        # one), without computing the other rows: this is the served graph.
        states, _ = self.sequence(item_ids)
        logits = self.head_logits(states)
        weights = torch.softmax(logits.masked_fill((item_ids == 0)[:, None], MASK_LOGIT), -1)
        return Encoded(weights @ states, weights)

    def loss(self, item_ids: Tensor, targets: Tensor, negatives: Negatives | None = None) -> Tensor:
        interests, _ = self.interests_at_every_position(item_ids)
        following, keep = next_items(item_ids, targets, self.score_positions)
        return self.interest_softmax_loss(interests[keep], following[keep], negatives)
