"""The interface every backbone implements (`MultiInterestEncoder`) and its training loss.

`forward` maps item_ids [B, L] to interests [B, K, d]; `encode` also returns the
item-to-interest weights [B, K, L]; `loss` scores targets against the K interests (`max`, with
the straight-through `BestInterestScore`, or ComiRec's `argmax`) over the full catalogue or
sampled negatives (`Negatives`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from service.bundle.format import SEMANTIC_DIM
from trainer.config import TrainConfig

# Masked attention logits; finite so that an all-padding row gives zeros, not NaN.
MASK_LOGIT = -1e9


# Item embeddings start at the scale xavier gives a table of this many rows at most.
EMBEDDING_INIT_ROWS = 4096


def init_item_embeddings(table: Tensor) -> None:
    """Xavier-uniform, except that the scale stops shrinking beyond EMBEDDING_INIT_ROWS rows:
    xavier's bound falls with the row count (0.0024 at 1M items, 17x below the embedded
    data's 0.041), and items seen a few times an epoch then stay near zero for thousands of
    steps, a plateau at MostPop's recall before every-position training takes off
    (docs/results.md, "The default at a million items"). Up to that size it is xavier,
    bit for bit."""
    rows, dim = table.shape
    if rows <= EMBEDDING_INIT_ROWS:
        nn.init.xavier_uniform_(table)
        return
    bound = math.sqrt(6.0 / (EMBEDDING_INIT_ROWS + dim))
    with torch.no_grad():
        table.uniform_(-bound, bound)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX; Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_score_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return getattr(torch, name)


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
        self.argmax_weight = cfg.argmax_weight
        self.score_dtype = resolve_score_dtype(cfg.score_dtype)
        self.num_interests, self.maxlen = cfg.interests, cfg.maxlen
        self.item_embedding = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        init_item_embeddings(self.item_embedding.weight)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        # --item-text: an item's vector is its id embedding plus a learnt projection of its
        # fixed text features (trainer/semantics/item_text.py; filled by the training loop).
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
        # A named range for profiles of training (benchmarks/profile_train.py): the scoring
        # against the catalogue or the negatives, apart from the encoder.
        with record_function("score"):
            return self._interest_softmax_loss(interests, targets, negatives)

    def _interest_softmax_loss(self, interests: Tensor, targets: Tensor,
                               negatives: Negatives | None) -> Tensor:
        target_scores = torch.einsum("pkd,pd->pk", interests, self.embed_items(targets))
        if self.interest_loss == "argmax":
            return self._argmax_loss(interests, target_scores, targets, negatives)
        if negatives is None:
            loss = F.cross_entropy(BestInterestScore.apply(interests, self.item_vectors(),
                                                           self.score_dtype), targets - 1)
        else:
            neg = BestInterestScore.apply(interests, self.embed_items(negatives.ids),
                                          self.score_dtype)
            loss = self._sampled_loss(target_scores.amax(dim=1), neg, targets, negatives)
        if self.argmax_weight:  # skipped at 0: the max loss alone, bit for bit
            loss = loss + self.argmax_weight * self._argmax_loss(interests, target_scores,
                                                                 targets, negatives)
        return loss

    def _argmax_loss(self, interests: Tensor, target_scores: Tensor, targets: Tensor,
                     negatives: Negatives | None) -> Tensor:
        """ComiRec's readout: the interest closest to the target ([P, K] scores) is the user
        vector."""
        best = target_scores.argmax(dim=1)
        return self.softmax_loss(interests[torch.arange(len(targets)), best], targets, negatives)

    def softmax_loss(self, users: Tensor, wanted: Tensor, negatives: Negatives | None) -> Tensor:
        """Cross-entropy of user vectors [P, d] against their next items [P]: over the whole
        catalogue, or over the shared negatives with the logQ correction."""
        if negatives is None:
            return F.cross_entropy(self._scores(users, self.item_vectors()), wanted - 1)
        pos = (users * self.embed_items(wanted)).sum(-1)
        return self._sampled_loss(pos, self._scores(users, self.embed_items(negatives.ids)),
                                  wanted, negatives)

    def _scores(self, users: Tensor, items: Tensor) -> Tensor:
        """users [P, d] x items [N, d] -> float32 scores [P, N], the product in score_dtype
        (in float32 the casts are no-ops)."""
        return (users.to(self.score_dtype) @ items.to(self.score_dtype).T).float()

    @staticmethod
    def _sampled_loss(pos: Tensor, neg: Tensor, wanted: Tensor, negatives: Negatives) -> Tensor:
        """pos [P], neg [P, S] raw scores -> logQ-corrected softmax loss; a negative that is
        the positive itself is masked out."""
        pos = pos - negatives.log_q_of(wanted)
        neg = neg - negatives.log_q
        # Accidental hits are few: set them by index (a dense masked_fill over [P, S] cost
        # as much as a matrix product on CPU).
        rows, cols = (negatives.ids[None, :] == wanted[:, None]).nonzero(as_tuple=True)
        neg = neg.index_put((rows, cols), neg.new_tensor(float("-inf")))
        return F.cross_entropy(torch.cat([pos[:, None], neg], dim=1), torch.zeros_like(wanted))


class BestInterestScore(torch.autograd.Function):
    """scores[p, n] = max_k <interests[p, k], items[n]>, the same as
    einsum("pkd,nd->pkn").amax(1), without materialising [P, K, N] in one piece or its gradient:
    K matrix products and an element-wise maximum; the backward gives each score's gradient to
    its winning interest (the first, on a tie). Written for CPU, where torch.where and
    masked_fill over [P, N] cost as much as the products (docs/results.md, "Training time"):
    only maximum, ==, & and * touch [P, N].

    `dtype` bfloat16 runs the products in bfloat16 (float32 accumulation inside the product,
    float32 scores out): 2-4x faster products on CPUs with AVX512-BF16 or AMX."""

    @staticmethod
    def forward(ctx, interests: Tensor, items: Tensor,  # [P, K, d], [N, d]
                dtype: torch.dtype = torch.float32) -> Tensor:
        low_interests, low_items = interests.to(dtype), items.to(dtype)
        scores = [low_interests[:, k] @ low_items.T for k in range(interests.shape[1])]
        best = scores[0].clone()
        for other in scores[1:]:
            torch.maximum(best, other, out=best)
        ctx.save_for_backward(low_interests, low_items, best, *scores)
        return best.float()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        interests, items, best, *scores = ctx.saved_tensors
        grad = grad.to(best.dtype)
        grad_interests = torch.empty(interests.shape, dtype=grad.dtype, device=grad.device)
        grad_items = torch.zeros(items.shape, dtype=torch.float32, device=grad.device)
        taken = torch.zeros(best.shape, dtype=torch.bool, device=best.device)
        for k, score in enumerate(scores):
            won = (score == best) & ~taken  # the first interest reaching the best score
            taken |= won
            grad_k = grad * won
            grad_interests[:, k] = grad_k @ items
            grad_items += grad_k.T @ interests[:, k]
        return grad_interests.float(), grad_items, None
