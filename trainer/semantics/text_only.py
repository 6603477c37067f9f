"""Text-only items: items of the items file without any interaction (new in the shop) get a
vector from their text at export, so that they can be recommended from day one
(docs/architecture.md, "Data": "Text-only items").

The vector is a ridge map from the items' MiniLM text features to the trained item vectors,
fitted on the items seen often enough for their vectors to mean something, its strength
chosen on a held-out tenth of them. Any backbone works, with or without `--item-text`: the map
reads the finished item table.
"""

from __future__ import annotations

import logging

import numpy as np

from trainer.data.dataset import SequenceDataset, TextOnlyItems
from trainer.semantics.item_text import item_sentence, item_text_features, sentence_features

log = logging.getLogger(__name__)

# Items with at least this many training interactions teach the map (rarer ones are noise).
MIN_FIT_COUNT = 5
RIDGE_STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)


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
                      length: float | None = None) -> np.ndarray:
    """[C, d] vectors of the dataset's text-only items from `item_vectors` [N, d] (row i is
    internal id i + 1): the map's direction, and `length` times the median norm of the
    rarest fitted items (MIN_FIT_COUNT to twice that many interactions: the prior of an item
    nobody chose yet); None keeps the map's own length (ridge shrinks towards the mean
    item)."""
    assert dataset.text_only is not None
    warm = item_text_features(dataset)[1:]
    popularity = dataset.popularity()[1:]
    fit = (popularity >= MIN_FIT_COUNT) & warm.any(axis=1)
    if fit.sum() < 20:
        raise ValueError(f"only {int(fit.sum())} items with text and >= {MIN_FIT_COUNT} "
                         f"interactions: too few to place text-only items")
    weights, strength = fit_text_map(warm[fit], item_vectors[fit])
    cold = sentence_features(text_only_sentences(dataset.text_only))
    placed = np.hstack([cold, np.ones((len(cold), 1), np.float32)]) @ weights
    # An item vector's length carries its popularity; the text says nothing about that, so
    # the length is a setting (--text-only-length), chosen on validation users
    # (benchmarks/new_items.py).
    if length is not None:
        rare = fit & (popularity < 2 * MIN_FIT_COUNT)
        norm = length * float(np.median(np.linalg.norm(item_vectors[rare if rare.any()
                                                                    else fit], axis=1)))
        placed *= norm / np.maximum(np.linalg.norm(placed, axis=1, keepdims=True), 1e-12)
    log.info("text-only items: %d placed by a ridge map (strength %g) fitted on %d items",
             len(cold), strength, int(fit.sum()))
    return placed.astype(np.float32)
