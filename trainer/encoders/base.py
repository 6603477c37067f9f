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

from service.bundle import SEMANTIC_DIM  # MiniLM's width: item texts, interest names
from trainer.config import TrainConfig

# Masked attention logits; finite so that an all-padding row gives zeros, not NaN.
MASK_LOGIT = -1e9


@dataclass
class Negatives:
    """Shared negatives of one batch with their log sampling probabilities (logQ)."""

    ids: Tensor  # [S] internal item ids
    log_q: Tensor  # [S]
    log_q_table: Tensor  # [N + 1] logQ of every item, for the positives' same correction

    def log_q_of(self, items: Tensor) -> Tensor:
        return self.log_q_table[items]


@dataclass
class Encoded:
    interests: Tensor  # [B, K, d]
    weights: Tensor  # [B, K, L] how much each history position feeds each interest


class MultiInterestEncoder(nn.Module):
    # True: `loss` trains every history position (the training loop feeds whole windows of
    # each sequence); False: only the last position (one example per target).
    every_position = False

    def __init__(self, n_items: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.n_items, self.dim = n_items, cfg.dim
        self.interest_loss = cfg.interest_loss
        self.num_interests, self.maxlen = cfg.interests, cfg.maxlen
        self.item_embedding = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        nn.init.xavier_uniform_(self.item_embedding.weight)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        # --item-text: an item's vector is its id embedding plus a learnt projection of its
        # fixed text features (trainer/item_text.py; filled by the training loop).
        self.register_buffer("item_text", torch.zeros(n_items + 1, SEMANTIC_DIM)
                             if cfg.item_text else None)
        self.text_projection = (nn.Linear(SEMANTIC_DIM, cfg.dim, bias=False)
                                if cfg.item_text else None)

    def encode(self, item_ids: Tensor) -> Encoded:
        raise NotImplementedError

    def forward(self, item_ids: Tensor) -> Tensor:
        return self.encode(item_ids).interests

    def embed_items(self, item_ids: Tensor) -> Tensor:
        """Item vectors of internal ids (any shape; 0 = padding = zeros)."""
        vectors = self.item_embedding(item_ids)
        if self.text_projection is not None:
            vectors = vectors + self.text_projection(self.item_text[item_ids])
        return vectors

    def item_vectors(self) -> Tensor:
        """The retrieval corpus: embeddings of items 1..N (row i-1 = internal id i)."""
        if self.text_projection is None:
            return self.item_embedding.weight[1:]
        return self.item_embedding.weight[1:] + self.text_projection(self.item_text[1:])

    def fold_item_text(self) -> None:
        """Bake the projected text into the id table and drop the text part: the same item
        vectors from a plain embedding table, the one form export and serving know."""
        if self.text_projection is None:
            return
        with torch.no_grad():
            self.item_embedding.weight[1:] = self.item_vectors()
        self.item_text, self.text_projection = None, None

    def loss(self, item_ids: Tensor, targets: Tensor, negatives: Negatives | None = None) -> Tensor:
        """Softmax of the target against the catalogue (full) or against shared negatives with
        logQ correction (sampled); see `interest_scores` for how K interests score an item."""
        return self.interest_softmax_loss(self(item_ids), targets, negatives)

    def interest_softmax_loss(self, interests: Tensor, targets: Tensor,
                              negatives: Negatives | None) -> Tensor:
        """interests [P, K, d], targets [P] -> mean cross-entropy.

        `max` (default): an item's score is its best inner product over the K interests,
        for the target and for every negative alike: the rule retrieval merges the K lists
        by, so the model is trained for the ranking it serves. `argmax` (ComiRec's): the
        interest closest to the target is the user vector and scores every item; another
        interest that scores a negative highly goes unpunished."""
        target_vec = self.embed_items(targets)
        if self.interest_loss == "argmax":
            best = torch.einsum("pkd,pd->pk", interests, target_vec).argmax(dim=1)
            return self.softmax_loss(interests[torch.arange(len(targets)), best], targets,
                                     negatives)
        if negatives is None:
            return F.cross_entropy(BestInterestScore.apply(interests, self.item_vectors()),
                                   targets - 1)
        pos = torch.einsum("pkd,pd->pk", interests, target_vec).amax(dim=1)
        neg = BestInterestScore.apply(interests, self.embed_items(negatives.ids))
        return self._sampled_loss(pos, neg, targets, negatives)

    def softmax_loss(self, users: Tensor, wanted: Tensor, negatives: Negatives | None) -> Tensor:
        """Cross-entropy of user vectors [P, d] against their next items [P]: over the whole
        catalogue, or over the shared negatives with the logQ correction."""
        if negatives is None:
            return F.cross_entropy(users @ self.item_vectors().T, wanted - 1)
        pos = (users * self.embed_items(wanted)).sum(-1)
        return self._sampled_loss(pos, users @ self.embed_items(negatives.ids).T, wanted,
                                  negatives)

    @staticmethod
    def _sampled_loss(pos: Tensor, neg: Tensor, wanted: Tensor, negatives: Negatives) -> Tensor:
        """pos [P], neg [P, S] raw scores -> logQ-corrected softmax loss; a negative that is
        the positive itself is masked out."""
        pos = pos - negatives.log_q_of(wanted)
        neg = (neg - negatives.log_q).masked_fill(negatives.ids[None, :] == wanted[:, None],
                                                  float("-inf"))
        return F.cross_entropy(torch.cat([pos[:, None], neg], dim=1), torch.zeros_like(wanted))


class BestInterestScore(torch.autograd.Function):
    """scores[p, n] = max_k <interests[p, k], items[n]>, the same as
    einsum("pkd,nd->pkn").amax(1), without materialising [P, K, N] (forward) or its gradient
    (backward): K matrix products and the index of the winning interest. Twice as fast as
    amax on CPU, where its backward dominated a training step."""

    @staticmethod
    def forward(ctx, interests: Tensor, items: Tensor) -> Tensor:  # [P, K, d], [N, d]
        best = interests[:, 0] @ items.T
        winner = torch.zeros(best.shape, dtype=torch.uint8, device=best.device)
        for k in range(1, interests.shape[1]):
            scores = interests[:, k] @ items.T
            better = scores > best
            best = torch.where(better, scores, best)
            winner.masked_fill_(better, k)
        ctx.save_for_backward(interests, items, winner)
        return best

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        interests, items, winner = ctx.saved_tensors
        grad_interests = torch.empty_like(interests)
        grad_items = torch.zeros_like(items)
        for k in range(interests.shape[1]):
            grad_k = grad * (winner == k)  # only the winning interest gets the gradient
            grad_interests[:, k] = grad_k @ items
            grad_items += grad_k.T @ interests[:, k]
        return grad_interests, grad_items


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
        items = self.embed_items(item_ids)  # [B, L, d]
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
        hat = self.behaviour_capsules(self.embed_items(item_ids))
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
    every_position = True

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
        following, keep = next_items(item_ids, targets)
        return self.softmax_loss(hidden[keep], following[keep], negatives)


def next_items(item_ids: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The item after every history position [B, L] (the history shifted by one, then the
    target), and which positions are real items (not padding) [B, L]."""
    return torch.cat([item_ids[:, 1:], targets[:, None]], dim=1), item_ids != 0


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
        following, keep = next_items(item_ids, targets)
        return self.interest_softmax_loss(interests[keep], following[keep], negatives)


BACKBONE_CLASSES: dict[str, type[MultiInterestEncoder]] = {
    "comirec-sa": ComiRecSA,
    "comirec-dr": ComiRecDR,
    "mind": MIND,
    "sasrec": SASRec,
    "transformer-sa": TransformerSA,
}


def build_encoder(n_items: int, cfg: TrainConfig) -> MultiInterestEncoder:
    return BACKBONE_CLASSES[cfg.backbone](n_items, cfg)
