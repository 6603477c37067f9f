"""One nightly run: lock, ingest, retrain on the served model's config, gate, publish or
reject, and a JSON report (the package docstring has the steps).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.bundle.format import ITEMS, latest_version, read_manifest, republish
from trainer.config import TrainConfig
from trainer.data.dataset import build_dataset, text_only_items
from trainer.data.specs import load_spec
from trainer.export import publish_bundle
from trainer.jobs.nightly.gate import evaluate_served_path, held_out
from trainer.jobs.nightly.ingest import events_dir, ingest
from trainer.jobs.nightly.lock import NightlyError, RunLock
from trainer.jobs.nightly.options import NightlyOptions
from trainer.semantics.esim.setup import esim_setup
from trainer.training.loop import evaluate_model, selection_cutoff, selection_metric, train
from trainer.training.metrics import CUTOFFS

log = logging.getLogger(__name__)

def run_nightly(opts: NightlyOptions) -> dict[str, Any]:
    started = time.perf_counter()
    report: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds")}
    with RunLock(opts.data_dir / "nightly.lock"):
        report["ingest"] = ingest(opts)
        root = opts.models_dir / opts.name
        served_version = latest_version(root)
        if served_version is None:
            raise NightlyError(f"{root}: no served bundle to retrain from (train one first)")
        served_dir = root / str(served_version)
        served = read_manifest(served_dir)
        report["served_version"] = served_version
        base_spec = served.data_spec.get("base", served.data_spec)
        spec = {"base": base_spec, "events": str(events_dir(opts.data_dir).resolve())}
        cfg = TrainConfig.from_dict({**served.config, **(opts.train_overrides or {})})
        if report["ingest"]["events"] == 0:
            # New rows of the items file are served from day one (by their text) without
            # waiting for their first events.
            report["new_items"] = unserved_items(spec, served_dir, cfg)
            if not report["new_items"]:
                report["decision"] = "skipped: no new events or items"
                return finish(report, opts, started)

        dataset = build_dataset(load_spec(spec), **cfg.split())
        report["dataset"] = dataset.describe()
        cfg = cfg.for_data(dataset.has_item_text())
        # A served ESIM model is retrained with ESIM; the LLM answers come from the cache
        # for typical users asked before.
        result = train(dataset, cfg, progress=opts.progress,
                       esim_setup=esim_setup(dataset, cfg, None, opts.progress))
        if result.esim is not None:
            report["esim"] = result.esim
        test = evaluate_model(result.model, dataset.eval_split("test", cfg.maxlen))

        histories, targets = held_out(dataset, cfg.maxlen)
        with tempfile.TemporaryDirectory(dir=opts.data_dir) as tmp:
            candidate_dir = publish_bundle(result.model, dataset, cfg, spec, {"test": test},
                                           Path(tmp), opts.name, progress=opts.progress,
                                           naming=result.naming)
            # The gate compares what selection compares: Recall@50, or a smaller cut-off on a
            # catalogue where Recall@50 is 1.0 for any model.
            gate = selection_metric(dataset.n_items)
            cutoffs = tuple(sorted({*CUTOFFS, selection_cutoff(dataset.n_items)}))
            report["candidate"] = evaluate_served_path(candidate_dir, histories, targets, cutoffs)
            report["served"] = evaluate_served_path(served_dir, histories, targets, cutoffs)
            gap = report["candidate"][gate] - report["served"][gate]
            report["gate"] = {"metric": gate, "difference": gap,
                              "tolerance": opts.tolerance, "held_out_users": len(targets)}
            if gap < -opts.tolerance:
                report["decision"] = "rejected"
            else:
                report["published"] = str(republish(
                    candidate_dir, opts.models_dir, opts.name, {"nightly_gate": report["gate"]}))
                report["decision"] = "published"
    return finish(report, opts, started)


def unserved_items(spec: dict[str, Any], served_dir: Path, cfg: TrainConfig) -> int:
    """Text-only items of the data (the dataset's rule: a title, no event) that the served
    bundle lacks; 0 unless the model places them (--text-only-items)."""
    if not cfg.text_only_items:
        return 0
    new = text_only_items(load_spec(spec))
    if new is None:
        return 0
    served = set(json.loads((served_dir / ITEMS).read_text())["item_ids"])
    return sum(item not in served for item in new.item_ids.astype(str))


def finish(report: dict[str, Any], opts: NightlyOptions, started: float) -> dict[str, Any]:
    report["seconds"] = round(time.perf_counter() - started, 1)
    reports = opts.data_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = reports / f"nightly-{stamp}-{os.getpid()}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    report["report"] = str(path)
    log.info("nightly: %s (report %s)", report["decision"], path)
    return report
