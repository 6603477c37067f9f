"""Item-text features (`--item-text`): each item's title, year and categories through the
MiniLM sentence encoder, a fixed [N + 1, 384] table that the encoder projects into its item
embeddings (`MultiInterestEncoder.embed_items`).

This is semantics on the item side: items whose texts agree (same genres, same franchise) start
close, and an item few users touched borrows what its text says instead of keeping a
near-random embedding. Serving needs none of it: export folds the projected text into the
plain item table (`MultiInterestEncoder.fold_item_text`), so bundles keep their format.

The table depends only on the item texts, so it is cached on disk by their hash (ten folds of
one dataset encode once).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from service.bundle.format import SEMANTIC_DIM
from trainer.data.dataset import SequenceDataset
from trainer.semantics.text_encoder import SentenceEncoder

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "ITEM_TEXT_CACHE_DIR"  # where the table is cached (docker: the data volume)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or ".cache/item-text")


def item_sentence(title: str, year: float, categories: str) -> str:
    """'Toy Story (1995). Adventure, Animation, Children' -- empty parts left out."""
    text = str(title).strip()
    if np.isfinite(year):
        text = f"{text} ({int(year)})".strip()
    genres = ", ".join(c for c in str(categories).split("|") if c)
    return f"{text}. {genres}" if genres else text


def item_sentences(dataset: SequenceDataset) -> list[str]:
    """One sentence per internal item id 1..N."""
    return [item_sentence(dataset.titles[i], dataset.years[i], dataset.categories[i])
            for i in range(1, dataset.n_items + 1)]


def item_text_features(dataset: SequenceDataset, encoder: SentenceEncoder | None = None,
                       cache_dir: Path | None = None) -> np.ndarray:
    """[N + 1, 384] float32, L2-normalised rows; row 0 (padding) and items without any text
    are zero, so they get no text component."""
    return np.concatenate([np.zeros((1, SEMANTIC_DIM), np.float32),
                           sentence_features(item_sentences(dataset), encoder, cache_dir)])


def sentence_features(sentences: list[str], encoder: SentenceEncoder | None = None,
                      cache_dir: Path | None = None) -> np.ndarray:
    """[len(sentences), 384] MiniLM vectors, zero for an empty sentence; cached on disk by
    the sentences' hash (in `cache_dir`, default $ITEM_TEXT_CACHE_DIR or .cache/item-text; a
    cache that cannot be written is only a warning)."""
    cache_dir = cache_dir or default_cache_dir()
    key = "s-" + hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:30]
    path = cache_dir / f"{key}.npy"
    if path.is_file():
        table = np.load(path)
        if table.shape == (len(sentences), SEMANTIC_DIM):
            return table
    log.info("encoding the texts of %d items with MiniLM", len(sentences))
    table = np.zeros((len(sentences), SEMANTIC_DIM), np.float32)
    has_text = np.array([bool(s.strip(" .")) for s in sentences], dtype=bool)
    if has_text.any():
        texts = [s for s, keep in zip(sentences, has_text, strict=True) if keep]
        table[has_text] = (encoder or SentenceEncoder()).encode(texts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, table)
        tmp.replace(path)  # atomic: a parallel fold never reads half a file
    except OSError as exc:
        log.warning("item-text cache not written (%s); set %s to a writable folder", exc,
                    CACHE_DIR_ENV)
    return table


def shuffled_rows(table: np.ndarray, seed: int) -> np.ndarray:
    """The control for item text: rows 1..N permuted among the items (row 0, padding, kept),
    from a stream of its own, so that the run's other draws are those of the real run."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(table) - 1) + 1
    return np.concatenate([table[:1], table[order]])
