"""Text-only items: items of the items file without any interaction (new in the shop) get a
vector from their text at export, so that they can be recommended from day one
(docs/architecture.md, "Data": "Text-only items").

A model trained with item text (the default) places them through its own text path: the
projected MiniLM features plus the mean id embedding of the rarest fitted items (chosen over
the ridge map on validation users: docs/results.md, "The whole catalogue (issue 34)").
Without item text, the vector is a ridge map from the items' MiniLM text features to the
trained item vectors, fitted on the items seen often enough for their vectors to mean
something, its strength chosen on a held-out tenth of them. Either way the placed vectors
get one length (`--text-only-length`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.dataset import SequenceDataset, TextOnlyItems
from trainer.encoders.base import MultiInterestEncoder
from trainer.semantics.item_text import item_sentence, item_text_features, sentence_features

log = logging.getLogger(__name__)

# Items with at least this many training interactions teach the map (rarer ones are noise).
MIN_FIT_COUNT = 5
RIDGE_STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class TextPath:
    """What `--item-text` adds to an item's vector: projection [d, 384] (the model's
    text_projection weight) applied to its MiniLM features, plus its id embedding
    (id_embeddings [N, d], row i = internal id i + 1)."""

    projection: np.ndarray
    id_embeddings: np.ndarray

    @classmethod
    def of(cls, model: MultiInterestEncoder) -> TextPath | None:
        """A copy of a model's text path; None for a model trained without item text."""
        if model.text_projection is None:
            return None
        with torch.no_grad():
            return cls(model.text_projection.weight.numpy().copy(),
                       model.item_embedding.weight[1:].numpy().copy())


def fit_text_map(features: np.ndarray, vectors: np.ndarray, seed: int = 0
                 ) -> tuple[np.ndarray, float]:
    """(W [f + 1, d], the chosen strength): vectors ~ [features, 1] @ W, ridge regression with
    the strength that gives the best mean cosine on a held-out tenth, refitted on all rows."""
    x = np.hstack([features, np.ones((len(features), 1), features.dtype)]).astype(np.float64)
    y = vectors.astype(np.float64)
    order = np.random.default_rng(seed).permutation(len(x))
    held, fit = order[: max(1, len(x) // 10)], order[max(1, len(x) // 10):]

    def solve(rows: np.ndarray, strength: float) -> np.ndarray:
        a = x[rows]
        return np.linalg.solve(a.T @ a + strength * np.eye(a.shape[1]), a.T @ y[rows])

    def cosine(w: np.ndarray) -> float:
        p, t = x[held] @ w, y[held]
        return float(np.mean((p * t).sum(1) / (np.linalg.norm(p, axis=1)
                                               * np.linalg.norm(t, axis=1) + 1e-12)))

    best = max(RIDGE_STRENGTHS, key=lambda strength: cosine(solve(fit, strength)))
    return solve(np.arange(len(x)), best).astype(np.float32), best


def text_only_sentences(items: TextOnlyItems) -> list[str]:
    return [item_sentence(t, y, c) for t, y, c in
            zip(items.titles, items.years, items.categories, strict=True)]


def text_only_vectors(dataset: SequenceDataset, item_vectors: np.ndarray,
                      length: float | None = None, text_path: TextPath | None = None
                      ) -> np.ndarray:
    """[C, d] vectors of the dataset's text-only items from `item_vectors` [N, d] (row i is
    internal id i + 1): through `text_path` when the model has one (its projected text plus
    the mean id embedding of the rarest fitted items), else the ridge map's direction; then
    `length` times the median norm of the rarest fitted items (MIN_FIT_COUNT to twice that
    many interactions: the prior of an item nobody chose yet); None keeps the vector's own
    length (ridge shrinks towards the mean item)."""
    assert dataset.text_only is not None
    warm = item_text_features(dataset)[1:]
    popularity = dataset.popularity()[1:]
    fit = (popularity >= MIN_FIT_COUNT) & warm.any(axis=1)
    if fit.sum() < 20:
        raise ValueError(f"only {int(fit.sum())} items with text and >= {MIN_FIT_COUNT} "
                         f"interactions: too few to place text-only items")
    rare = fit & (popularity < 2 * MIN_FIT_COUNT)
    rare = rare if rare.any() else fit
    cold = sentence_features(text_only_sentences(dataset.text_only))
    if text_path is not None:
        placed = cold @ text_path.projection.T + text_path.id_embeddings[rare].mean(axis=0)
        log.info("text-only items: %d placed through the model's text projection", len(cold))
    else:
        weights, strength = fit_text_map(warm[fit], item_vectors[fit])
        placed = np.hstack([cold, np.ones((len(cold), 1), np.float32)]) @ weights
        log.info("text-only items: %d placed by a ridge map (strength %g) fitted on %d items",
                 len(cold), strength, int(fit.sum()))
    # An item vector's length carries its popularity; the text says nothing about that, so
    # the length is a setting (--text-only-length), chosen on validation users
    # (benchmarks/long_tail.py).
    if length is not None:
        norm = length * float(np.median(np.linalg.norm(item_vectors[rare], axis=1)))
        placed *= norm / np.maximum(np.linalg.norm(placed, axis=1, keepdims=True), 1e-12)
    return placed.astype(np.float32)
