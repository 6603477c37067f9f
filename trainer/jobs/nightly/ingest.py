"""The nightly job: event log -> training data -> candidate -> quality gate -> publish.

1. Take a lock (one run at a time).
2. Drain the service's Redis Stream, shard by shard (service.names.KeyLayout: one stream, or
   N by user hash; on Redis Cluster too), through a consumer group: first this consumer's
   pending entries (read by a run that died before acknowledging), then new ones. Each batch is
   written as a Parquet partition named after its shard and its first and last stream ids
   (write to a temporary file, fsync, rename) and only then acknowledged. A crash in between
   leaves the entries pending; the rerun reads the same ids again and the loader keeps one row
   per stream id (qualified by the shard: `s3:<id>`, since shards' ids may coincide), so
   nothing is lost and nothing is duplicated. A malformed entry is set aside in
   malformed/[<shard>-]<first>-<last>.jsonl (with the reason) and acknowledged like the others,
   so it never blocks the job. After each acknowledgement the shard is trimmed up to the
   oldest entry the group has not acknowledged (the service appends without a length cap).
3. Retrain with the served model's configuration on its base data plus every persisted event.
4. Evaluate the candidate and the served bundle through the serving code path on the same
   held-out users of the new data; publish the candidate only if its Recall@50 is not worse
   than the served one's by more than the tolerance. The decision and both metric sets go to
   a report.

`run_every` repeats the job on an interval as a long-running process (a container's PID 1):
SIGTERM or SIGINT stops it at once while it sleeps, and abandons a cycle in progress (every
step above is safe to interrupt and redo).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis
from redis.cluster import RedisCluster

from service import bundle as fmt
from service.history import MAX_TIMESTAMP, REDIS_ERRORS
from service.names import KeyLayout, is_cluster_url, node_url
from service.recommender import Recommender
from service.schemas import MAX_ID_LENGTH, check_id
from trainer.config import TrainConfig
from trainer.data import EVENT_COLUMNS
from trainer.dataset import SequenceDataset, build_dataset
from trainer.esim import esim_setup
from trainer.export import publish_bundle
from trainer.metrics import CUTOFFS, aggregate
from trainer.specs import load_spec
from trainer.train import evaluate_model, selection_cutoff, selection_metric, train

log = logging.getLogger(__name__)

Client = redis.Redis | RedisCluster


class NightlyError(RuntimeError):
    pass


class LockHeld(NightlyError):
    pass


class Interrupted(BaseException):
    """Raised by `run_every`'s signal handler. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` on the way (cleanup code, libraries) swallows the stop."""

    def __init__(self, signum: int) -> None:
        self.signame = signal.Signals(signum).name
        super().__init__(self.signame)


class Malformed(ValueError):
    """A stream entry that is not a valid event; the message is the reason."""


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
    # The event stream's shard count; None: the counts the service recorded (service.names.
    # KeyLayout.registry_key), or before it ever ran, 1 (16 on Redis Cluster).
    shards: int | None = None


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
        try:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
        finally:
            self.fh.close()  # closing releases the lock too, whatever happened above


# --- events: stream -> parquet -----------------------------------------------------------------


def events_dir(data_dir: Path) -> Path:
    return data_dir / "events"


def connect(url: str) -> Client:
    # Raw bytes: one entry that is not UTF-8 must not make every read fail.
    if is_cluster_url(url):
        return RedisCluster.from_url(node_url(url), decode_responses=False)
    return redis.Redis.from_url(url, decode_responses=False)


def streams_to_read(client: Client, opts: NightlyOptions) -> dict[str, str]:
    """Stream key -> shard tag ("" unsharded): the configured layout's streams, and those of
    every shard count the service has used with this stream that still exist, so that a
    change of EVENT_STREAM_SHARDS (or a move to Redis Cluster) leaves no event unread."""
    layout = KeyLayout.for_url(opts.redis_url, opts.stream, opts.shards)
    recorded = sorted(int(count) for count in client.smembers(layout.registry_key))
    streams = layout.streams() if opts.shards is not None or not recorded else {}
    for count in recorded:
        for key, tag in KeyLayout(opts.stream, count).streams().items():
            if key not in streams and client.exists(key):
                streams[key] = tag
    return streams


def ensure_group(client: Client, stream: str, group: str) -> None:
    try:
        # From the beginning of the stream: the first run takes everything recorded so far.
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def read_batches(client: Client, stream: str, group: str, consumer: str,
                 count: int) -> Iterator[list[tuple[bytes, dict | None]]]:
    """This consumer's pending entries first (from a run that died), then new ones."""
    start: str | bytes = "0"
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


def as_text(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _id_field(event: dict[str, Any], name: str) -> str:
    if name not in event:
        raise Malformed(f"no {name}")
    value = event[name]
    if not isinstance(value, str):
        raise Malformed(f"{name}: a string expected, got {type(value).__name__}")
    if not 0 < len(value) <= MAX_ID_LENGTH:
        raise Malformed(f"{name}: {len(value)} characters, not 1..{MAX_ID_LENGTH}")
    try:
        return check_id(value)  # the API's own id rule (a lone surrogate: Parquet refuses it)
    except ValueError as exc:
        raise Malformed(f"{name}: {exc}") from exc


def _timestamp(event: dict[str, Any]) -> int:
    if "timestamp" not in event:
        raise Malformed("no timestamp")
    raw = event["timestamp"]
    # The service writes repr(float); numbers are accepted too, booleans are not.
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise Malformed(f"timestamp: a number expected, got {type(raw).__name__}")
    try:
        value = float(raw)
    except OverflowError as exc:  # an integer beyond any float
        raise Malformed(f"timestamp: outside [0, {MAX_TIMESTAMP}]") from exc
    except ValueError as exc:
        raise Malformed(f"timestamp: not a number ({str(raw)[:40]!r})") from exc
    if not (math.isfinite(value) and 0 <= value <= MAX_TIMESTAMP):
        raise Malformed(f"timestamp: {value!r} is outside [0, {MAX_TIMESTAMP}]")
    return int(value)


def parse_entry(fields: dict[bytes, bytes] | None) -> tuple[str, str, str, int]:
    """(event_id, user_id, item_id, timestamp) of one stream entry, or Malformed(reason)."""
    if not isinstance(fields, dict | None):
        raise Malformed(f"fields: a mapping expected, got {type(fields).__name__}")
    if not fields:  # nil (redis-py: None or {}) for an entry deleted while pending
        raise Malformed("no fields (the entry was deleted or trimmed while pending)")
    raw = fields.get(b"event", fields.get("event"))
    if raw is None:
        raise Malformed("no 'event' field")
    try:
        body = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise Malformed("event: not UTF-8") from exc
    try:
        event = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise Malformed(f"event: not JSON ({exc})") from exc
    if not isinstance(event, dict):
        raise Malformed(f"event: a JSON object expected, got {type(event).__name__}")
    return (_id_field(event, "event_id"), _id_field(event, "user_id"),
            _id_field(event, "item_id"), _timestamp(event))


def qualified(tag: str, stream_id: str) -> str:
    """A stream id unique across the shards (`s3:<id>`); the unsharded stream's as it is."""
    return f"{tag}:{stream_id}" if tag else stream_id


def parse_entries(entries: list[tuple[bytes | str, dict | None]], tag: str = ""
                  ) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The valid events of shard `tag` as a frame, and one record per malformed entry (never
    an exception: one bad entry must not block the stream)."""
    rows, bad = [], []
    for raw_id, fields in entries:
        stream_id = qualified(tag, as_text(raw_id))
        try:
            rows.append((stream_id, *parse_entry(fields)))
        except Exception as exc:  # whatever is wrong with it, the entry is set aside
            reason = str(exc) if isinstance(exc, Malformed) else f"{type(exc).__name__}: {exc}"
            shown = ({as_text(k): as_text(v) for k, v in fields.items()}
                     if isinstance(fields, dict) and fields else None)
            bad.append({"stream_id": stream_id, "fields": shown, "reason": reason})
    frame = pd.DataFrame(rows, columns=list(EVENT_COLUMNS))
    return frame.astype({"timestamp": "int64"}), bad


def _file_stem(first: str, last: str, tag: str) -> str:
    stem = f"{first.replace('-', '_')}-{last.replace('-', '_')}"
    return f"{tag}-{stem}" if tag else stem


def _durable_replace(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it to `path`, fsync the directory: all or nothing, and it stays."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_partition(frame: pd.DataFrame, directory: Path, first: str, last: str,
                    tag: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"part-{_file_stem(first, last, tag)}.parquet"
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    _durable_replace(tmp, path)
    return path


def write_malformed(records: list[dict[str, Any]], directory: Path, first: str,
                    last: str, tag: str = "") -> Path:
    """The batch's malformed entries as JSON lines, for a person to look at. Written whole
    (a batch read again after a crash rewrites its file instead of doubling it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{_file_stem(first, last, tag)}.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in records),
                   encoding="utf-8")
    _durable_replace(tmp, path)
    return path


def next_stream_id(stream_id: str) -> str:
    ms, _, seq = stream_id.partition("-")
    if int(seq or 0) < 2**64 - 1:
        return f"{int(ms)}-{int(seq or 0) + 1}"
    return f"{int(ms) + 1}-0"


def oldest_unacknowledged(client: Client, stream: str, group: str) -> str | None:
    """The id of the oldest entry `group` has not acknowledged (it may not exist yet): the
    smallest pending id, else the one after the last delivered. None if the stream or the
    group does not exist."""
    try:
        # The position first, then the pending list (Redis runs a pipeline in order): entries
        # delivered in between are pending at the second read, so the bound never passes an
        # unacknowledged entry. No MULTI: redis-py's cluster transactions skip its reply
        # parsing.
        with client.pipeline(transaction=False) as pipe:
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, group)
            groups, pending = pipe.execute()
    except redis.ResponseError:  # no such stream, or no such group
        return None
    last = next((g["last-delivered-id"] for g in groups if as_text(g["name"]) == group), None)
    if last is None:
        return None
    if pending["pending"]:
        return as_text(pending["min"])
    return next_stream_id(as_text(last))


def trim_acknowledged(client: Client, stream: str, group: str) -> int:
    """Delete the entries the group has acknowledged (nothing if the group does not exist).
    Entries added meanwhile have larger ids than the bound and stay."""
    bound = oldest_unacknowledged(client, stream, group)
    if bound is None:
        return 0
    return int(client.xtrim(stream, minid=bound, approximate=False))


def malformed_dir(data_dir: Path) -> Path:
    return data_dir / "malformed"


def ingest(opts: NightlyOptions) -> dict[str, Any]:
    stats: dict[str, Any] = {"events": 0, "malformed": 0, "partitions": 0, "trimmed": 0,
                             "streams": 0, "malformed_files": []}
    try:
        client = connect(opts.redis_url)  # the cluster client connects here
        try:
            for stream, tag in streams_to_read(client, opts).items():
                ensure_group(client, stream, opts.group)
                ingest_stream(client, stream, tag, opts, stats)
                stats["streams"] += 1
        finally:
            client.close()
    except REDIS_ERRORS as exc:
        raise NightlyError(f"redis ({opts.redis_url}): {exc}") from exc
    return stats


def ingest_stream(client: Client, stream: str, tag: str, opts: NightlyOptions,
                  stats: dict[str, Any]) -> None:
    """Persist, acknowledge and trim one stream shard's new entries; counts go to `stats`."""
    batches = 0
    for entries in read_batches(client, stream, opts.group, "nightly", opts.batch_size):
        frame, bad = parse_entries(entries, tag)
        ids = [as_text(stream_id) for stream_id, _ in entries]
        if len(frame):
            write_partition(frame, events_dir(opts.data_dir), ids[0], ids[-1], tag)
            stats["partitions"] += 1
        if bad:
            path = write_malformed(bad, malformed_dir(opts.data_dir), ids[0], ids[-1], tag)
            stats["malformed_files"].append(str(path))
            log.warning("nightly: %d malformed stream entries set aside in %s (first: %s)",
                        len(bad), path, bad[0]["reason"])
        if opts.crash_after_persist:
            os._exit(86)  # the test hook: persisted, not acknowledged
        client.xack(stream, opts.group, *ids)
        stats["events"] += len(frame)
        stats["malformed"] += len(bad)
        stats["trimmed"] += trim_acknowledged(client, stream, opts.group)
        batches += 1
    if not batches:  # still trim what a previous run acknowledged but did not trim
        stats["trimmed"] += trim_acknowledged(client, stream, opts.group)


# --- the quality gate ---------------------------------------------------------------------------


def held_out(dataset: SequenceDataset, maxlen: int) -> tuple[list[list[str]], list[np.ndarray]]:
    """Test users' histories and targets as external ids (comparable across bundles)."""
    split = dataset.eval_split("test", maxlen)
    histories = [dataset.item_ids[h[h != 0]].tolist() for h in split.histories]
    targets = [dataset.item_ids[t] for t in split.targets]
    return histories, targets


def evaluate_served_path(bundle_dir: Path, histories: list[list[str]],
                         targets: list[np.ndarray],
                         cutoffs: tuple[int, ...] = CUTOFFS) -> dict[str, float]:
    """Metrics of a bundle through the service's own recommend path."""
    rec = Recommender(fmt.load_bundle(bundle_dir))
    n = max(cutoffs)
    ranked = [np.array(rec.recommend(h, n, fanout=n).item_ids, dtype=object) for h in histories]
    return aggregate(ranked, targets, cutoffs)


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
        dataset = build_dataset(load_spec(spec), **cfg.split())
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



# --- the scheduler ------------------------------------------------------------------------------


def run_cycle(opts: NightlyOptions) -> dict[str, Any]:
    """One nightly run for the scheduler: a failure is logged and reported, not raised."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        return run_nightly(opts)
    except Exception as exc:  # the loop must outlive any one bad night
        expected = isinstance(exc, NightlyError | ValueError | OSError)
        log.error("nightly cycle failed: %s", exc, exc_info=not expected)
        return {"started": started, "decision": "failed", "error": f"{exc}"}


def run_every(opts: NightlyOptions, every: float,
              emit: Callable[[dict[str, Any]], None]) -> None:
    """Sleep `every` seconds, run a cycle, emit its report, repeat; return on SIGTERM/SIGINT.

    The handlers raise Interrupted wherever the main thread is: a sleep ends at once, and a
    cycle is abandoned where it stands. That is safe because every step of a cycle is: the
    lock is a context manager (and the OS releases it with the process anyway), an event
    batch is persisted before it is acknowledged (an unacknowledged one is read again), and a
    bundle appears by one atomic rename or not at all."""
    phase = "starting"
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:  # a second signal must not break the cleanup of the first
            log.info("nightly: %s again; already stopping", signal.Signals(signum).name)
            return
        stopping = True
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("nightly: a cycle every %gs until SIGTERM or SIGINT; the first in %gs",
                 every, every)
        while True:
            phase = "sleeping"
            deadline = time.monotonic() + every
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 3600.0))  # time.sleep overflows past ~292 years
            phase = "cycle"
            report = run_cycle(opts)
            phase = "reporting"
            emit(report)
            log.info("nightly cycle: %s; the next in %gs", report.get("decision"), every)
    except Interrupted as exc:
        if phase == "cycle":
            log.warning("nightly: cycle interrupted by %s; it will be redone at the next run "
                        "(events it ingested are kept, no bundle is half-published)", exc.signame)
        else:
            log.info("nightly: stopped by %s", exc.signame)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
