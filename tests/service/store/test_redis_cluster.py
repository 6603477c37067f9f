"""Redis Cluster: the service and the nightly job against a real 3-master cluster on loopback.

Three `redis-server --cluster-enabled yes` on free ports, joined by `redis-cli --cluster
create`; the app is built with REDIS_URL=redis+cluster://... (redis-py's cluster clients). The
numbers are printed past pytest's capture, so CI's log shows them.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import trainer.jobs.nightly.ingest as nightly_module
from service.store.events import EVENT_GROUP
from service.store.keys import CLUSTER_SHARDS, EVENT_STREAM, KeyLayout
from tests.service.conftest import free_port
from trainer.data.loaders import load_event_log
from trainer.jobs.nightly.ingest import ingest
from trainer.jobs.nightly.options import NightlyOptions

MASTERS = 3


def wait_until(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def node(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[list[int]]:
    """The masters' ports of a fresh 3-master cluster (no replicas); `masters` empties it."""
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    if missing:
        # the reason is printed in the summary (-ra, pyproject.toml)
        pytest.skip(f"Redis Cluster: {' and '.join(missing)} not installed (make redis-server)")
    directory = tmp_path_factory.mktemp("redis-cluster")
    ports = [free_port() for _ in range(MASTERS)]
    procs: list[subprocess.Popen] = []
    nodes = [node(port) for port in ports]
    try:
        for port in ports:
            # The cluster bus on a free port too (port + 10000 may be taken or past 65535).
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--cluster-port", str(free_port()),
                 "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf", "--dir", str(directory),
                 "--save", "", "--appendonly", "no", "--daemonize", "no"],
                stdout=subprocess.DEVNULL))
        for client in nodes:
            wait_until(client.ping, "redis-server to start")
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stdout + created.stderr
        for client in nodes:
            wait_until(lambda c=client: c.execute_command("CLUSTER INFO")["cluster_state"] == "ok",
                       "cluster_state:ok")
        yield ports
    finally:
        for client in nodes:
            client.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


@pytest.fixture
def masters(cluster) -> Iterator[dict[int, redis.Redis]]:
    """A plain client per master (each sees its own keys only), flushed after the test."""
    nodes = {port: node(port) for port in cluster}
    yield nodes
    for client in nodes.values():
        client.flushall()
        client.close()


def cluster_url(ports: list[int]) -> str:
    return f"redis+cluster://127.0.0.1:{ports[0]}/0"


def events_for(users: int, per_user: int, prefix: str) -> list[dict]:
    return [{"user_id": f"{prefix}{u}", "item_id": f"item-{(u * 7 + i) % 97}",
             "timestamp": 2e9 + i, "event_id": f"{prefix}-{u}-{i}"}
            for u in range(users) for i in range(per_user)]


class Counting:
    """The app's test client, counting answers by status."""

    def __init__(self, client) -> None:
        self.client, self.answers = client, Counter()

    def get(self, url: str):
        return self.count(self.client.get(url))

    def post(self, url: str, **kwargs):
        return self.count(self.client.post(url, **kwargs))

    def count(self, reply):
        self.answers[reply.status_code] += 1
        return reply


def post_in_batches(client: Counting, events: list[dict], size: int) -> list[dict]:
    return [client.post("/events", json={"events": events[start:start + size]}).json()
            for start in range(0, len(events), size)]


def nightly_options(ports: list[int], tmp_path: Path, models_dir: Path) -> NightlyOptions:
    return NightlyOptions(redis_url=cluster_url(ports), stream=EVENT_STREAM, group=EVENT_GROUP,
                          data_dir=tmp_path / "data", models_dir=models_dir, name="tiny",
                          batch_size=25, progress=False)


class Crash(BaseException):
    pass


def test_service_and_nightly_job_on_a_3_master_cluster(
        cluster, masters, client_for, models_dir, tmp_path, monkeypatch, capsys):
    started = time.perf_counter()
    client = Counting(client_for(redis_url=cluster_url(cluster)))
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["store"] == "redis"

    # 360 events of 60 users, in batches of 24 that mix users (so shards and masters)
    posted = events_for(60, 6, "u")
    bodies = post_in_batches(client, posted, 24)
    assert sum(b["accepted"] for b in bodies) == len(posted)
    # a client retrying two batches (same event ids): nothing is stored twice
    retried = posted[:24] + posted[100:124]
    again = post_in_batches(client, retried, 24)
    assert sum(b["duplicates"] for b in again) == len(retried)
    assert sum(b["accepted"] for b in again) == 0

    # every user's history, in timestamp order, through the cluster client
    expected: dict[str, list[str]] = {}
    for event in posted:
        expected.setdefault(event["user_id"], []).append(event["item_id"])
    for user, items in expected.items():
        assert client.get(f"/users/{user}/history").json()["items"] == items, user
    item = client.post("/recommend", json={"user_id": "probe", "k": 3}).json()["items"][0]
    client.post("/events", json={"user_id": "reader", "item_id": item["item_id"],
                                 "event_id": "reader-1"})
    used = client.post("/recommend", json={"user_id": "reader", "k": 5}).json()
    assert used["history_source"] == "stored" and used["history_length"] == 1
    posted.append({"user_id": "reader", "event_id": "reader-1"})

    # one slot per event's keys, and the keys spread over the three masters
    layout = KeyLayout(EVENT_STREAM, CLUSTER_SHARDS)
    any_node = next(iter(masters.values()))
    for user in expected:
        keys = [layout.history_key(user), layout.dedup_key(user, f"{user}-0"),
                layout.stream_key(layout.shard(user))]
        slots = {any_node.execute_command("CLUSTER KEYSLOT", key) for key in keys}
        assert len(slots) == 1, keys
    per_master = {port: Counter(key.split(":")[1] for key in master.scan_iter(count=1000))
                  for port, master in masters.items()}
    for port, kinds in per_master.items():
        assert kinds["history"] and kinds["event"] and kinds["events"], (port, kinds)
    assert sum(k["history"] for k in per_master.values()) == len(expected) + 1  # + reader
    assert sum(k["events"] for k in per_master.values()) == CLUSTER_SHARDS + 1  # + registry

    metrics = client.get("/metrics").text
    assert f"recsys_event_stream_length {len(posted)}.0" in metrics
    assert f"recsys_event_stream_lag {len(posted)}.0" in metrics

    # the nightly job: a crash between persisting and acknowledging the first batch...
    opts = nightly_options(cluster, tmp_path, models_dir)

    def crash(code: int) -> None:
        raise Crash(code)

    monkeypatch.setattr(nightly_module.os, "_exit", crash)
    with pytest.raises(Crash):
        ingest(dataclasses.replace(opts, crash_after_persist=True))
    monkeypatch.undo()
    assert len(list((tmp_path / "data" / "events").glob("part-s*.parquet"))) == 1
    # ...then a full run: every event stored once, acknowledged, trimmed
    first = ingest(opts)
    stored = load_event_log(tmp_path / "data" / "events")
    assert first["streams"] == CLUSTER_SHARDS and first["malformed"] == 0
    assert first["events"] == len(posted) == len(stored)
    assert sorted(stored["event_id"]) == sorted(e["event_id"] for e in posted)
    assert stored["stream_id"].is_unique and stored["stream_id"].str.match(r"s\d+:\d+-\d+").all()
    cluster_client = redis.RedisCluster(host="127.0.0.1", port=cluster[0],
                                        decode_responses=True)
    pending = sum(cluster_client.xpending(key, EVENT_GROUP)["pending"]
                  for key in layout.streams())
    left = sum(cluster_client.xlen(key) for key in layout.streams())
    assert pending == 0 and left == 0
    # exactly once: a second run finds nothing; new events are read once more
    second = ingest(opts)
    assert second["events"] == 0
    more = events_for(10, 3, "late")
    post_in_batches(client, more, 30)
    third = ingest(opts)
    assert third["events"] == len(more)
    total = load_event_log(tmp_path / "data" / "events")
    assert len(total) == len(posted) + len(more) and total["event_id"].is_unique
    cluster_client.close()

    answers = client.answers
    requests = sum(answers.values())
    with capsys.disabled():  # shown without -s: CI's log carries the numbers
        print(f"\nRedis Cluster: {MASTERS} masters {cluster}, {CLUSTER_SHARDS} stream shards; "
              f"{requests} requests, answers by status {dict(answers)}; "
              f"{len(posted)} events posted ({len(retried)} more retried: "
              f"{sum(b['duplicates'] for b in again)} duplicates, 0 stored); keys per master "
              + ", ".join(f"{p}: {dict(k)}" for p, k in per_master.items()))
        print(f"nightly: a crash after persisting 1 partition, then run 1 acknowledged "
              f"{first['events']} events from {first['streams']} shards in "
              f"{first['partitions']} partitions, stored {len(stored)} (unique event ids "
              f"{stored['event_id'].nunique()}), pending {pending}, left in the streams {left}; "
              f"run 2 acknowledged {second['events']}; run 3 acknowledged {third['events']} of "
              f"{len(more)} new; stored in all {len(total)} = {len(posted)} + {len(more)} "
              f"posted; {time.perf_counter() - started:.1f}s")


def test_event_log_full_per_shard_on_the_cluster(cluster, masters, client_for):
    # 32 unconsumed events over 16 shards: 2 per shard
    client = client_for(redis_url=cluster_url(cluster), event_stream_max_len=32)
    layout = KeyLayout(EVENT_STREAM, CLUSTER_SHARDS)
    same_shard = [u for u in (f"u{n}" for n in range(500)) if layout.shard(u) == 0][:3]
    batch = [{"user_id": u, "item_id": "i", "event_id": u} for u in same_shard[:2]]
    assert client.post("/events", json={"events": batch}).json()["accepted"] == 2
    full = client.post("/events", json={"user_id": same_shard[2], "item_id": "i"})
    assert full.status_code == 503 and "event log full" in full.json()["detail"]
    assert "recsys:events:{s0}" in full.json()["detail"]
    other = next(u for u in (f"v{n}" for n in range(500)) if layout.shard(u) != 0)
    assert client.post("/events", json={"user_id": other, "item_id": "i"}).status_code == 200
