"""The nightly job: event log -> training data -> candidate -> quality gate -> publish.

1. Take a lock (one run at a time).
2. Drain the service's Redis Stream through a consumer group: first this consumer's pending
   entries (read by a run that died before acknowledging), then new ones. Each batch is written
   as a Parquet partition named after its first and last stream ids (write to a temporary
   file, fsync, rename) and only then acknowledged. A crash in between leaves the entries
   pending; the rerun reads the same ids again and the loader keeps one row per stream id, so
   nothing is lost and nothing is duplicated.
3. Retrain with the served model's configuration on its base data plus every persisted event.
4. Evaluate the candidate and the served bundle through the serving code path on the same
   held-out users of the new data; publish the candidate only if its Recall@50 is not worse
   than the served one's by more than the tolerance. The decision and both metric sets go to
   a report.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis

from service import bundle as fmt
from service.recommender import Recommender
from trainer.config import TrainConfig
from trainer.data import EVENT_COLUMNS
from trainer.dataset import SequenceDataset, build_dataset
from trainer.esim import esim_setup
from trainer.export import publish_bundle
from trainer.metrics import CUTOFFS, aggregate
from trainer.specs import load_spec
from trainer.train import evaluate_model, train

log = logging.getLogger(__name__)

GATE_METRIC = "recall@50"


class NightlyError(RuntimeError):
    pass


class LockHeld(NightlyError):
    pass


@dataclass
class NightlyOptions:
    redis_url: str
    stream: str
    group: str
    data_dir: Path
    models_dir: Path
    name: str
    tolerance: float = 0.005
    batch_size: int = 10_000
    train_overrides: dict[str, Any] | None = None
    crash_after_persist: bool = False  # test hook: die between writing and acknowledging
    progress: bool = True


# --- lock ---------------------------------------------------------------------------------------


class RunLock:
    """An exclusive, non-blocking flock; released by the OS if the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self.fh.close()
            raise LockHeld(f"{self.path}: another nightly run holds the lock") from exc
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


# --- events: stream -> parquet -----------------------------------------------------------------


def events_dir(data_dir: Path) -> Path:
    return data_dir / "events"


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    try:
        # From the beginning of the stream: the first run takes everything recorded so far.
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def read_batches(client: redis.Redis, stream: str, group: str, consumer: str,
                 count: int) -> Iterator[list[tuple[str, dict | None]]]:
    """This consumer's pending entries first (from a run that died), then new ones."""
    start = "0"
    while True:
        reply = client.xreadgroup(group, consumer, {stream: start}, count=count)
        entries = reply[0][1] if reply else []
        if not entries:
            break
        yield entries
        start = entries[-1][0]
    while True:
        reply = client.xreadgroup(group, consumer, {stream: ">"}, count=count)
        entries = reply[0][1] if reply else []
        if not entries:
            break
        yield entries


def parse_entries(entries: list[tuple[str, dict | None]]) -> tuple[pd.DataFrame, int]:
    rows, bad = [], 0
    for stream_id, fields in entries:
        try:
            event = json.loads(fields["event"])  # fields is None for a trimmed entry
            rows.append((stream_id, str(event["event_id"]), str(event["user_id"]),
                         str(event["item_id"]), int(float(event["timestamp"]))))
        except (TypeError, KeyError, ValueError):
            bad += 1
    frame = pd.DataFrame(rows, columns=list(EVENT_COLUMNS))
    return frame.astype({"timestamp": "int64"}), bad


def write_partition(frame: pd.DataFrame, directory: Path, first: str, last: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"part-{first.replace('-', '_')}-{last.replace('-', '_')}.parquet"
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def ingest(opts: NightlyOptions) -> dict[str, int]:
    client = redis.Redis.from_url(opts.redis_url, decode_responses=True)
    try:
        ensure_group(client, opts.stream, opts.group)
        stats = {"events": 0, "malformed": 0, "partitions": 0}
        for entries in read_batches(client, opts.stream, opts.group, "nightly", opts.batch_size):
            frame, bad = parse_entries(entries)
            ids = [stream_id for stream_id, _ in entries]
            if len(frame):
                write_partition(frame, events_dir(opts.data_dir), ids[0], ids[-1])
                stats["partitions"] += 1
            if opts.crash_after_persist:
                os._exit(86)  # the test hook: persisted, not acknowledged
            client.xack(opts.stream, opts.group, *ids)
            stats["events"] += len(frame)
            stats["malformed"] += bad
        return stats
    except redis.RedisError as exc:
        raise NightlyError(f"redis ({opts.redis_url}): {exc}") from exc
    finally:
        client.close()


# --- the quality gate ---------------------------------------------------------------------------


def held_out(dataset: SequenceDataset, maxlen: int) -> tuple[list[list[str]], list[np.ndarray]]:
    """Test users' histories and targets as external ids (comparable across bundles)."""
    split = dataset.eval_split("test", maxlen)
    histories = [dataset.item_ids[h[h != 0]].tolist() for h in split.histories]
    targets = [dataset.item_ids[t] for t in split.targets]
    return histories, targets


def evaluate_served_path(bundle_dir: Path, histories: list[list[str]],
                         targets: list[np.ndarray]) -> dict[str, float]:
    """Metrics of a bundle through the service's own recommend path."""
    rec = Recommender(fmt.load_bundle(bundle_dir))
    n = max(CUTOFFS)
    ranked = [np.array(rec.recommend(h, n, fanout=n).item_ids, dtype=object) for h in histories]
    return aggregate(ranked, targets)


def run_nightly(opts: NightlyOptions) -> dict[str, Any]:
    started = time.perf_counter()
    report: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds")}
    with RunLock(opts.data_dir / "nightly.lock"):
        report["ingest"] = ingest(opts)
        root = opts.models_dir / opts.name
        served_version = fmt.latest_version(root)
        if served_version is None:
            raise NightlyError(f"{root}: no served bundle to retrain from (train one first)")
        served_dir = root / str(served_version)
        served = fmt.read_manifest(served_dir)
        report["served_version"] = served_version
        if report["ingest"]["events"] == 0:
            report["decision"] = "skipped: no new events"
            return finish(report, opts, started)

        base_spec = served.data_spec.get("base", served.data_spec)
        spec = {"base": base_spec, "events": str(events_dir(opts.data_dir).resolve())}
        cfg = TrainConfig.from_dict({**served.config, **(opts.train_overrides or {})})
        dataset = build_dataset(load_spec(spec), min_item_count=cfg.min_item_count,
                                min_user_count=cfg.min_user_count, split_seed=cfg.split_seed)
        report["dataset"] = dataset.describe()
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
                                           Path(tmp), opts.name, progress=opts.progress)
            report["candidate"] = evaluate_served_path(candidate_dir, histories, targets)
            report["served"] = evaluate_served_path(served_dir, histories, targets)
            gap = report["candidate"][GATE_METRIC] - report["served"][GATE_METRIC]
            report["gate"] = {"metric": GATE_METRIC, "difference": gap,
                              "tolerance": opts.tolerance, "held_out_users": len(targets)}
            if gap < -opts.tolerance:
                report["decision"] = "rejected"
            else:
                report["published"] = str(fmt.republish(
                    candidate_dir, opts.models_dir, opts.name, {"nightly_gate": report["gate"]}))
                report["decision"] = "published"
    return finish(report, opts, started)


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

