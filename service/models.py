"""The served model: load the newest complete bundle, watch for new versions, swap atomically.

A broken bundle is refused, logged and counted, and the model already serving keeps serving.
A refused version is not retried until its manifest changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import faiss

from service.bundle import MANIFEST, BundleError, complete_versions, load_bundle
from service.recommender import Recommender

log = logging.getLogger("service.models")


def search_threads(setting: int, model: Recommender) -> int:
    """FAISS threads: the setting, or (0 = auto) one for an exact index, where a search is a
    fraction of a millisecond and threads only add jitter, and one per core for ANN indexes
    over large catalogues (IVF over 1M items: 6.1 ms p50 with 1 thread, 3.8 ms with 2)."""
    if setting:
        return setting
    return 1 if model.bundle.manifest.index.kind == "flat" else (os.cpu_count() or 1)


class ModelManager:
    def __init__(self, models_dir: Path, name: str, onnx_threads: int = 1,
                 faiss_threads: int = 0, on_reload: Callable[[str], None] | None = None) -> None:
        self.root = Path(models_dir) / name
        self.name = name
        self.onnx_threads = onnx_threads
        self.faiss_threads = faiss_threads
        self.current: Recommender | None = None
        self.refused: dict[int, float] = {}  # version -> manifest mtime when refused
        self.last_error: str | None = None
        self.on_reload = on_reload or (lambda result: None)
        self._lock = asyncio.Lock()

    def _candidates(self) -> list[int]:
        """Complete versions newer than the served one, newest first, not refused as-is."""
        served = self.current.version if self.current else 0
        out = []
        for v in reversed(complete_versions(self.root)):
            if v <= served:
                break
            try:
                mtime = (self.root / str(v) / MANIFEST).stat().st_mtime
            except OSError:
                continue
            if self.refused.get(v) != mtime:
                out.append(v)
        return out

    def _load(self, version: int) -> Recommender:
        return Recommender(load_bundle(self.root / str(version), threads=self.onnx_threads))

    async def refresh(self) -> bool:
        """Serve the newest loadable version if it is newer; True if the model changed."""
        async with self._lock:
            for version in self._candidates():
                path = self.root / str(version)
                try:
                    # Loading (checksums, ONNX, FAISS) runs off the event loop.
                    loaded = await asyncio.to_thread(self._load, version)
                except (BundleError, OSError, ValueError) as exc:
                    try:
                        self.refused[version] = (path / MANIFEST).stat().st_mtime
                    except OSError:
                        self.refused[version] = -1.0
                    self.last_error = str(exc)
                    self.on_reload("failure")
                    log.error("refused bundle", extra={"bundle": str(path), "error": str(exc)})
                    continue
                previous = self.current.version if self.current else None
                faiss.omp_set_num_threads(search_threads(self.faiss_threads, loaded))
                self.current = loaded  # the swap: one reference assignment
                self.on_reload("success")
                log.info("serving bundle", extra={"bundle": str(path), "previous": previous})
                return True
            return False

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # the watcher must outlive any surprise
                log.exception("model refresh failed")
