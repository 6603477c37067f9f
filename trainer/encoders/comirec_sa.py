"""ComiRec-SA: K self-attention heads over the item embeddings (Cen et al., KDD 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.config import TrainConfig
from trainer.encoders.base import MASK_LOGIT, Encoded, MultiInterestEncoder


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
