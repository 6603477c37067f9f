"""Capsule backbones: dynamic routing from items to K interest capsules (ComiRec-DR, MIND)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import TrainConfig
from trainer.encoders.base import Encoded, MultiInterestEncoder


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
