"""Stream -> Parquet: drain the event stream's shards through a consumer group, persist each
batch durably before acknowledging it, set malformed entries aside, trim what is acknowledged.
Entries are parsed by the event contract (`service.store.events.parse_entry`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import redis
from redis.cluster import RedisCluster

from service.store.events import (
    Malformed,
    as_text,
    parse_entry,
)
from service.store.history import REDIS_ERRORS
from service.store.keys import KeyLayout, is_cluster_url, node_url
from trainer.data.loaders import EVENT_COLUMNS
from trainer.jobs.nightly.lock import NightlyError
from trainer.jobs.nightly.options import NightlyOptions

log = logging.getLogger(__name__)

Client = redis.Redis | RedisCluster


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
