"""The served variants of an A/B test (service/ab/): one ModelManager per distinct
(model, pinned version), each loading, hot-reloading and rolling back on its own.

A pinned variant (`name=model@3`) loads that version once and never moves: neither a newer
publish nor a reload changes it; deleting its directory keeps it served from memory (warned
once, as for any deleted bundle) until a restart, when the settings refuse the missing pin.
Two variants with the same model and pin share one manager (an A/A test loads the bundle once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.ab.assign import Assigner
from service.ab.spec import DEFAULT_VARIANT, VariantSpec, parse_variants
from service.bundle.format import MANIFEST
from service.serving.model_manager import ModelManager
from service.settings import Settings

log = logging.getLogger("service.variants")


class PinnedModelManager(ModelManager):
    """A ModelManager whose only candidate is one version, until it is served."""

    def __init__(self, models_dir: Path, name: str, version: int, **kwargs: object) -> None:
        super().__init__(models_dir, name, **kwargs)  # type: ignore[arg-type]
        self.pinned = version

    def _candidates(self) -> list[int]:
        if self.current is not None:
            return []  # served: a pin never moves
        try:
            mtime = (self.root / str(self.pinned) / MANIFEST).stat().st_mtime
        except OSError:
            return []
        # A refused pin is retried only once its manifest changes, like any refused version.
        return [] if self.refused.get(self.pinned) == mtime else [self.pinned]


@dataclass
class Variant:
    spec: VariantSpec
    models: ModelManager

    @property
    def name(self) -> str:
        return self.spec.name


class Variants:
    """The variants in configuration order (the first is the control) and who gets which."""

    def __init__(self, variants: list[Variant], experiment: str, tracking: bool) -> None:
        self.all = variants
        self.by_name = {v.name: v for v in variants}
        self.experiment = experiment
        self.tracking = tracking  # AB_VARIANTS set: request ids and counters are recorded
        self.assigner = Assigner([v.spec for v in variants], experiment)

    @property
    def primary(self) -> Variant:
        return self.all[0]

    def for_user(self, user_id: str) -> Variant:
        return self.by_name[self.assigner.variant(user_id)]

    def managers(self) -> list[ModelManager]:
        """Each manager once (variants may share one)."""
        return list({id(v.models): v.models for v in self.all}.values())

    @property
    def ready(self) -> bool:
        return all(v.models.current is not None for v in self.all)

    async def refresh(self) -> dict[str, bool]:
        """Look for new versions for every variant now; variant name -> model changed."""
        changed = {id(m): await m.refresh() for m in self.managers()}
        return {v.name: changed[id(v.models)] for v in self.all}

    async def watch(self, interval: float) -> None:
        """The reload loop: every variant's manager, each failure its own."""
        while True:
            await asyncio.sleep(interval)
            for manager in self.managers():
                try:
                    await manager.refresh()
                except Exception:  # the watcher must outlive any surprise
                    log.exception("model refresh failed", extra={"model": manager.name})


def build_variants(settings: Settings,
                   on_reload: Callable[[str], None] | None = None) -> Variants:
    """The variants the settings describe: AB_VARIANTS, or one `default` variant serving
    MODEL_NAME (the service without A/B)."""
    tracking = settings.ab_variants is not None
    specs = (parse_variants(settings.ab_variants) if settings.ab_variants is not None
             else [VariantSpec(DEFAULT_VARIANT, settings.model_name, None, 1.0)])
    managers: dict[tuple[str, int | None], ModelManager] = {}
    variants = []
    for spec in specs:
        key = (spec.model, spec.version)
        if key not in managers:
            common = dict(onnx_threads=settings.onnx_threads,
                          faiss_threads=settings.faiss_threads, on_reload=on_reload,
                          mmap=settings.mmap_bundle, workers=settings.workers)
            managers[key] = (
                ModelManager(settings.models_dir, spec.model, **common)  # type: ignore[arg-type]
                if spec.version is None else
                PinnedModelManager(settings.models_dir, spec.model, spec.version, **common))
        variants.append(Variant(spec, managers[key]))
    return Variants(variants, settings.ab_experiment, tracking)
