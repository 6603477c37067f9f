"""ComiRec evaluation: exact full-catalogue retrieval per interest, merged by score."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import faiss
import numpy as np

from service.serving.retrieval import merge_interest_results
from trainer.data.dataset import EvalSplit, SequenceDataset
from trainer.training.metrics import CUTOFFS, aggregate

# Maps right-aligned histories [U, L] to interests [U, K, d] (a torch model or an ONNX session).
Encoder = Callable[[np.ndarray], np.ndarray]
# Maps query vectors [Q, d] and n to (scores, rows) [Q, n]; row i is internal id i + 1.
Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def exact_search(item_vectors: np.ndarray) -> Search:
    """Exact inner-product search over all items (FAISS IndexFlatIP)."""
    index = faiss.IndexFlatIP(item_vectors.shape[1])
    index.add(np.ascontiguousarray(item_vectors, dtype=np.float32))
    return lambda queries, n: index.search(np.ascontiguousarray(queries, np.float32), n)


def retrieve(interests: np.ndarray, search: Search, n: int) -> list[np.ndarray]:
    """Top-n internal item ids per user: top-n per interest, merged by score."""
    users, k, d = interests.shape
    scores, rows = search(interests.reshape(-1, d), n)
    scores, rows = scores.reshape(users, k, n), rows.reshape(users, k, n)
    ranked = []
    for u in range(users):
        ids, _, _ = merge_interest_results(scores[u], rows[u], n)
        ranked.append(ids + 1)
    return ranked


def encode_all(encode: Encoder, histories: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    return np.concatenate([encode(histories[i : i + batch_size])
                           for i in range(0, len(histories), batch_size)])


def rankings(encode: Encoder, search: Search, split: EvalSplit, n: int) -> list[np.ndarray]:
    """Each evaluated user's top-n internal item ids."""
    return retrieve(encode_all(encode, split.histories), search, n)


def evaluate_encoder(encode: Encoder, search: Search, split: EvalSplit,
                     cutoffs: Sequence[int] = CUTOFFS) -> dict[str, float]:
    return aggregate(rankings(encode, search, split, max(cutoffs)), split.targets, cutoffs)


def popular_rankings(dataset: SequenceDataset, split: EvalSplit) -> list[np.ndarray]:
    """MostPop: the same top items (by training-user counts) for every evaluated user."""
    popularity = dataset.popularity()
    popularity[0] = -1
    top = np.argsort(-popularity, kind="stable")[: max(CUTOFFS)]
    return [top] * len(split.targets)


def most_popular(dataset: SequenceDataset, split: EvalSplit) -> dict[str, float]:
    """MostPop baseline metrics."""
    return aggregate(popular_rankings(dataset, split), split.targets)
