"""Raw LLM answers on disk, keyed by sha256(model id, messages): a rerun does not ask again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from trainer.semantics.llm.prompt import Messages

log = logging.getLogger(__name__)

class ResponseCache:
    """Raw answers on disk, one JSON file per sha256(model id, messages)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(model_id: str, messages: Messages) -> str:
        blob = json.dumps({"model": model_id, "messages": messages}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, model_id: str, messages: Messages) -> str | None:
        path = self._path(self.key(model_id, messages))
        try:
            return json.loads(path.read_text())["response"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def put(self, model_id: str, messages: Messages, response: str) -> None:
        path = self._path(self.key(model_id, messages))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"model": model_id, "messages": messages,
                                   "response": response}))
        tmp.replace(path)
