"""The served model: load the newest complete bundle, watch for new versions, swap atomically.

A broken bundle is refused, logged and counted, and the model already serving keeps serving.
A refused version is not retried until its manifest changes. Deleting the served version's
directory rolls back: the newest remaining complete version is served.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from service.bundle.format import MANIFEST, BundleError, complete_versions
from service.bundle.load import load_bundle
from service.serving.recommender import Recommender

log = logging.getLogger("service.models")


def search_threads(setting: int, model: Recommender, workers: int = 1) -> int:
    """FAISS threads: the setting, or (0 = auto) 1 for an exact index, where a search is a
    fraction of a millisecond and threads only add jitter, and this worker's share of the cores
    for ANN indexes, where a second thread makes one request's search markedly faster
    (docs/results.md, "Service load benchmark": FAISS threads). Per worker, so that N workers
    do not run N x cores threads."""
    if setting:
        return setting
    if model.bundle.manifest.index.kind == "flat":
        return 1
    return max(1, (os.cpu_count() or 1) // workers)


class ModelManager:
    def __init__(self, models_dir: Path, name: str, onnx_threads: int = 1,
                 faiss_threads: int = 0, on_reload: Callable[[str], None] | None = None,
                 mmap: bool = True, workers: int = 1) -> None:
        self.root = Path(models_dir) / name
        self.mmap = mmap  # memory-map the bundle's large files (shared between workers)
        self.name = name
        self.onnx_threads = onnx_threads
        self.faiss_threads = faiss_threads
        self.workers = workers  # WORKERS: the processes sharing this machine's cores
        self.current: Recommender | None = None
        self.refused: dict[int, float] = {}  # version -> manifest mtime when refused
        self.last_error: str | None = None
        self.on_reload = on_reload or (lambda result: None)
        self._lock = asyncio.Lock()
        self._warned_gone = False

    def served_gone(self) -> bool:
        """The served version's directory (or its manifest) was deleted: a roll-back."""
        return self.current is not None and \
            not (self.current.bundle.path / MANIFEST).is_file()

    def _candidates(self) -> list[int]:
        """Complete versions newer than the served one (any, after a roll-back), newest
        first, not refused as-is."""
        served = 0 if self.current is None or self.served_gone() else self.current.version
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
        bundle = load_bundle(self.root / str(version), threads=self.onnx_threads,
                             mmap=self.mmap)
        if bundle.manifest.version != version:
            # e.g. `cp -a 1 2` as a manual roll-back: serving it would report version 1 from
            # directory 2, and the directory would look newer than the served model forever.
            raise BundleError(
                f"{bundle.path}: the directory is version {version} but its manifest says "
                f"version {bundle.manifest.version}; publish with the trainer (or "
                f"service.bundle.format.republish) or roll back by deleting newer versions")
        model = Recommender(bundle)
        model.search_threads = search_threads(self.faiss_threads, model, self.workers)
        return model

    async def refresh(self) -> bool:
        """Serve the newest loadable version if it is newer (or any remaining one when the
        served version was deleted); True if the model changed."""
        async with self._lock:
            gone = self.served_gone()
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
                self.current = loaded  # the swap: one reference assignment
                self._warned_gone = False
                self.on_reload("success")
                log.info("serving bundle", extra={"bundle": str(path), "previous": previous,
                                                  "rolled_back": gone,
                                                  "mapped": list(loaded.bundle.mapped)})
                return True
            if gone and not self._warned_gone:
                self._warned_gone = True
                log.warning("the served bundle was deleted and no other complete version "
                            "loads; still serving it from memory",
                            extra={"bundle": str(self.current.bundle.path)})
            return False

    async def watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # the watcher must outlive any surprise
                log.exception("model refresh failed")
