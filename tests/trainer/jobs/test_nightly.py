"""The nightly job against a real Redis server and a real model store."""

import dataclasses
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.bundle.format import complete_versions, read_manifest
from service.bundle.load import load_bundle
from service.store.events import EVENT_GROUP, MAX_TIMESTAMP, Event
from service.store.history import RedisHistoryStore
from service.store.keys import KeyLayout
from tests.conftest import TINY_SPEC
from trainer.config import TrainConfig
from trainer.data.loaders import load_event_log
from trainer.jobs.nightly.ingest import ingest, trim_acknowledged
from trainer.jobs.nightly.lock import RunLock
from trainer.jobs.nightly.options import NightlyOptions

STREAM = "recsys:events"


def record_events(redis_url, events, shards=None):
    import asyncio

    async def go():
        store = RedisHistoryStore(redis_url, 200, 3600, STREAM, 100_000, 3600, shards)
        await store.record(events)
        await store.close()

    asyncio.run(go())


def catalogue_events(tiny_dataset, users=20, per_user=8, prefix="n"):
    """Events over known items, as the service would record them."""
    items = tiny_dataset.item_ids[1:]
    return [Event(f"{prefix}{u}", str(items[(u * 7 + i) % len(items)]), 2e9 + i,
                  f"{prefix}-{u}-{i}") for u in range(users) for i in range(per_user)]


def nightly_cmd(tmp_path, redis_url, models_dir, *extra):
    return [sys.executable, "-m", "trainer", "nightly", "--redis-url", redis_url,
            "--data-dir", str(tmp_path / "data"), "--models", str(models_dir), "--name", "tiny",
            "--no-progress", *extra]


def nightly(tmp_path, redis_url, models_dir, *extra):
    return subprocess.run(nightly_cmd(tmp_path, redis_url, models_dir, *extra),
                          capture_output=True, text=True, timeout=300)


def options(tmp_path, redis_url, models_dir, batch_size=10_000):
    return NightlyOptions(redis_url=redis_url, stream=STREAM, group=EVENT_GROUP,
                          data_dir=tmp_path / "data", models_dir=models_dir, name="tiny",
                          batch_size=batch_size, progress=False)


def test_ingest_persists_then_acknowledges(tmp_path, redis_url, redisdb, models_dir, tiny_dataset):
    events = catalogue_events(tiny_dataset, users=5, per_user=4)
    record_events(redis_url, events)
    stats = ingest(options(tmp_path, redis_url, models_dir, batch_size=7))
    assert stats["events"] == 20 and stats["partitions"] == 3
    assert redisdb.xpending(STREAM, "nightly")["pending"] == 0
    log = load_event_log(tmp_path / "data" / "events")
    assert sorted(log["event_id"]) == sorted(e.event_id for e in events)
    assert ingest(options(tmp_path, redis_url, models_dir))["events"] == 0  # nothing new


def test_crash_between_persist_and_ack_loses_and_duplicates_nothing(
        tmp_path, redis_url, redisdb, models_dir, tiny_dataset):
    events = catalogue_events(tiny_dataset)
    record_events(redis_url, events)
    crashed = nightly(tmp_path, redis_url, models_dir, "--crash-after-persist")
    assert crashed.returncode == 86
    assert list((tmp_path / "data" / "events").glob("part-*.parquet"))  # persisted...
    assert redisdb.xpending(STREAM, "nightly")["pending"] == len(events)  # ...not acked
    assert redisdb.xlen(STREAM) == len(events)  # ...and not trimmed

    more = catalogue_events(tiny_dataset, users=3, prefix="m")
    record_events(redis_url, more)
    rerun = nightly(tmp_path, redis_url, models_dir, "--epochs", "1")
    assert rerun.returncode == 0, rerun.stderr
    assert redisdb.xpending(STREAM, "nightly")["pending"] == 0
    assert redisdb.xlen(STREAM) == 0  # everything acknowledged, so trimmed
    log = load_event_log(tmp_path / "data" / "events")
    # The loader keeps one row per stream id; check the files hold no second copy either.
    import pandas as pd

    raw = pd.concat(pd.read_parquet(p) for p in (tmp_path / "data" / "events").glob("*.parquet"))
    expected = sorted(e.event_id for e in events + more)
    assert sorted(log["event_id"]) == expected
    assert sorted(raw["event_id"]) == expected


def test_worse_candidate_is_not_published(tmp_path, redis_url, models_dir, tiny_dataset):
    record_events(redis_url, catalogue_events(tiny_dataset))
    # A candidate stopped after its first optimiser step is far worse than the served model.
    proc = nightly(tmp_path, redis_url, models_dir, "--max-minutes", "0.000001")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["decision"] == "rejected"
    gate = report["gate"]["metric"]
    # ~200 items: Recall@50 would cover a quarter of the catalogue, so the gate uses less
    cutoff = int(gate.removeprefix("recall@"))
    assert gate.startswith("recall@") and cutoff <= report["dataset"]["items"] // 10 < 50
    assert report["candidate"][gate] < report["served"][gate] - 0.005
    assert complete_versions(models_dir / "tiny") == [1]
    saved = json.loads(Path(report["report"]).read_text())
    assert saved["decision"] == "rejected" and "recall@20" in saved["served"]


def test_candidate_within_tolerance_is_published(tmp_path, redis_url, models_dir, tiny_dataset):
    record_events(redis_url, catalogue_events(tiny_dataset))
    proc = nightly(tmp_path, redis_url, models_dir, "--epochs", "2", "--tolerance", "1")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["decision"] == "published" and report["ingest"]["events"] == 160
    published = load_bundle(report["published"])
    assert published.version == 2
    assert published.manifest.extra["nightly_gate"]["tolerance"] == 1
    assert published.manifest.data_spec["base"] == read_manifest(
        models_dir / "tiny" / "1").data_spec


def test_second_run_waits_for_the_lock(tmp_path, redis_url, models_dir):
    with RunLock(tmp_path / "data" / "nightly.lock"):
        proc = nightly(tmp_path, redis_url, models_dir)
    assert proc.returncode == 3 and "another nightly run holds the lock" in proc.stderr


def test_unreachable_redis_fails_non_zero(tmp_path, models_dir):
    proc = nightly(tmp_path, "redis://127.0.0.1:1/0", models_dir)
    assert proc.returncode == 1 and "redis" in proc.stderr


# --- malformed entries --------------------------------------------------------------------------


def xadd_event(redisdb, event_id, timestamp=2e9, **fields):
    event = {"event_id": event_id, "user_id": "u1", "item_id": "i1", "timestamp": timestamp,
             **fields}
    return redisdb.xadd(STREAM, {"event": json.dumps(event)})


def test_malformed_entries_are_set_aside_acknowledged_and_never_block(
        tmp_path, redis_url, redisdb, models_dir):
    # An entry deleted while pending comes back from XREADGROUP with no fields.
    redisdb.xgroup_create(STREAM, EVENT_GROUP, id="0", mkstream=True)
    deleted = redisdb.xadd(STREAM, {"event": "{}"})
    redisdb.xreadgroup(EVENT_GROUP, "nightly", {STREAM: ">"}, count=1)
    redisdb.xdel(STREAM, deleted)

    good = [xadd_event(redisdb, f"good-{i}", timestamp=ts)
            for i, ts in enumerate(("2000000000.0", 0, MAX_TIMESTAMP))]
    infinity = xadd_event(redisdb, "inf", timestamp=float("inf"))  # JSON Infinity
    bad = {  # stream id -> what the reason must mention
        deleted: "no fields",
        infinity: "timestamp",
        xadd_event(redisdb, "inf-text", timestamp="inf"): "timestamp",
        xadd_event(redisdb, "nan", timestamp=float("nan")): "timestamp",
        xadd_event(redisdb, "huge", timestamp=1e300): "timestamp",
        xadd_event(redisdb, "huge-int", timestamp=10**400): "timestamp",
        xadd_event(redisdb, "future", timestamp=MAX_TIMESTAMP + 1): "timestamp",
        xadd_event(redisdb, "negative", timestamp=-1): "timestamp",
        xadd_event(redisdb, "abc", timestamp="abc"): "timestamp",
        xadd_event(redisdb, "bool", timestamp=True): "timestamp",
        xadd_event(redisdb, "null-ts", timestamp=None): "timestamp",
        xadd_event(redisdb, "no-item", item_id=None): "item_id",
        xadd_event(redisdb, "empty-user", user_id=""): "user_id",
        xadd_event(redisdb, "int-item", item_id=42): "item_id",
        xadd_event(redisdb, "surrogate", item_id="\ud800"): "item_id",
        redisdb.xadd(STREAM, {"event": json.dumps({"user_id": "u", "item_id": "i",
                                                   "timestamp": 1})}): "event_id",
        redisdb.xadd(STREAM, {"event": "{not json"}): "JSON",
        redisdb.xadd(STREAM, {"event": "[" * 100_000}): "JSON",  # RecursionError
        redisdb.xadd(STREAM, {"event": "[1, 2]"}): "object",
        redisdb.xadd(STREAM, {"event": b"\xff\xfe"}): "UTF-8",
        redisdb.xadd(STREAM, {"other": "x"}): "event",
    }
    good.append(xadd_event(redisdb, "good-last"))

    stats = ingest(options(tmp_path, redis_url, models_dir))
    assert stats["events"] == len(good) and stats["malformed"] == len(bad)
    log = load_event_log(tmp_path / "data" / "events")
    assert sorted(log["stream_id"]) == sorted(good)
    assert sorted(log["timestamp"]) == [0, 2_000_000_000, 2_000_000_000, MAX_TIMESTAMP]
    files = [Path(p) for p in stats["malformed_files"]]
    assert files and all(p.parent == tmp_path / "data" / "malformed" for p in files)
    records = [json.loads(line) for p in files for line in p.read_text().splitlines()]
    assert sorted(r["stream_id"] for r in records) == sorted(bad)
    for record in records:
        assert set(record) == {"stream_id", "fields", "reason"}
        assert bad[record["stream_id"]] in record["reason"], record
    by_id = {r["stream_id"]: r for r in records}
    assert by_id[deleted]["fields"] is None
    assert "Infinity" in by_id[infinity]["fields"]["event"]  # as found, for a person to see
    assert redisdb.xpending(STREAM, EVENT_GROUP)["pending"] == 0
    assert redisdb.xlen(STREAM) == 0  # all acknowledged, so all trimmed
    again = ingest(options(tmp_path, redis_url, models_dir))  # the next run is not blocked
    assert again["events"] == 0 and again["malformed"] == 0


# --- a sharded event stream (Redis Cluster's layout, here on one Redis; docs/scaling.md) ------


def test_sharded_stream_is_read_exactly_once_with_shard_qualified_ids(
        tmp_path, redis_url, redisdb, models_dir, tiny_dataset):
    events = catalogue_events(tiny_dataset, users=30, per_user=4)
    record_events(redis_url, events, shards=4)
    layout = KeyLayout(STREAM, 4)
    assert redisdb.smembers(layout.registry_key) == {"4"}  # what the nightly job goes by
    assert not redisdb.exists(STREAM)
    stats = ingest(options(tmp_path, redis_url, models_dir, batch_size=10))
    assert stats["events"] == len(events) and stats["streams"] == 4
    parts = sorted(p.name for p in (tmp_path / "data" / "events").glob("*.parquet"))
    assert {name.split("-")[1] for name in parts} == {"s0", "s1", "s2", "s3"}
    log = load_event_log(tmp_path / "data" / "events")
    assert sorted(log["event_id"]) == sorted(e.event_id for e in events)
    assert log["stream_id"].is_unique
    for row in log.itertuples():  # each id names the user's own shard
        assert row.stream_id.startswith(f"s{layout.shard(row.user_id)}:")
    for key in layout.streams():
        assert redisdb.xlen(key) == 0 and redisdb.xpending(key, EVENT_GROUP)["pending"] == 0
    assert ingest(options(tmp_path, redis_url, models_dir))["events"] == 0


def test_changing_the_shard_count_leaves_no_event_unread(
        tmp_path, redis_url, redisdb, models_dir, tiny_dataset):
    # one stream, then 4 shards, then 2: the service records each count it used
    batches = [catalogue_events(tiny_dataset, users=8, per_user=3, prefix=p) for p in "abc"]
    for batch, shards in zip(batches, (1, 4, 2), strict=True):
        record_events(redis_url, batch, shards)
    assert redisdb.smembers(KeyLayout(STREAM).registry_key) == {"1", "4", "2"}
    stats = ingest(options(tmp_path, redis_url, models_dir))
    assert stats["streams"] == 5  # the unsharded stream and shards 0-3
    log = load_event_log(tmp_path / "data" / "events")
    assert sorted(log["event_id"]) == sorted(e.event_id for b in batches for e in b)
    assert log["stream_id"].is_unique
    assert redisdb.xlen(STREAM) == 0 and redisdb.xlen(KeyLayout(STREAM, 4).stream_key(3)) == 0


# --- trimming ------------------------------------------------------------------------------------


def test_trim_removes_acknowledged_entries_not_later_ones(redisdb):
    redisdb.xgroup_create(STREAM, EVENT_GROUP, id="0", mkstream=True)
    read = [redisdb.xadd(STREAM, {"event": "{}"}) for _ in range(3)]
    redisdb.xreadgroup(EVENT_GROUP, "nightly", {STREAM: ">"})
    redisdb.xack(STREAM, EVENT_GROUP, *read)
    late = redisdb.xadd(STREAM, {"event": "{}"})  # arrived after the read
    assert trim_acknowledged(redisdb, STREAM, EVENT_GROUP) == 3
    assert [entry_id for entry_id, _ in redisdb.xrange(STREAM)] == [late]
    assert trim_acknowledged(redisdb, STREAM, EVENT_GROUP) == 0


def test_no_trim_without_the_group(redisdb):
    assert trim_acknowledged(redisdb, STREAM, EVENT_GROUP) == 0  # no stream at all
    redisdb.xadd(STREAM, {"event": "{}"})
    redisdb.xgroup_create(STREAM, "someone-else", id="$")
    assert trim_acknowledged(redisdb, STREAM, EVENT_GROUP) == 0
    assert redisdb.xlen(STREAM) == 1


def test_ingest_trims_only_what_the_group_acknowledged(
        tmp_path, redis_url, redisdb, models_dir, monkeypatch):
    first = xadd_event(redisdb, "a")
    stats = ingest(options(tmp_path, redis_url, models_dir))
    assert stats["events"] == 1 and stats["trimmed"] == 1 and redisdb.xlen(STREAM) == 0

    # Read by another consumer of the group and not acknowledged: pending, kept.
    pending = xadd_event(redisdb, "b")
    redisdb.xreadgroup(EVENT_GROUP, "other", {STREAM: ">"}, count=1)
    newer = xadd_event(redisdb, "c")
    stats = ingest(options(tmp_path, redis_url, models_dir))
    assert stats["events"] == 1 and stats["trimmed"] == 0
    assert [i for i, _ in redisdb.xrange(STREAM)] == [pending, newer]

    # Once acknowledged, the next run trims it even with nothing new to read.
    redisdb.xack(STREAM, EVENT_GROUP, pending)
    stats = ingest(options(tmp_path, redis_url, models_dir))
    assert stats["events"] == 0 and stats["trimmed"] == 2 and redisdb.xlen(STREAM) == 0

    # An entry the service adds between the read and the trim survives the trim.
    import trainer.jobs.nightly.ingest as nightly_module

    real_trim, seen = nightly_module.trim_acknowledged, {}

    def add_then_trim(client, stream, group):
        if not seen:
            seen["late"] = xadd_event(redisdb, "late")
            seen["trimmed"] = real_trim(client, stream, group)
            seen["left"] = [i for i, _ in redisdb.xrange(STREAM)]
            return seen["trimmed"]
        return real_trim(client, stream, group)

    monkeypatch.setattr(nightly_module, "trim_acknowledged", add_then_trim)
    read = [xadd_event(redisdb, f"d{i}") for i in range(3)]
    stats = ingest(options(tmp_path, redis_url, models_dir))
    assert seen["trimmed"] == len(read) and seen["left"] == [seen["late"]]
    assert stats["events"] == 4  # the late one is read by the next batch...
    assert redisdb.xlen(STREAM) == 0  # ...and trimmed after it is acknowledged
    persisted = set(load_event_log(tmp_path / "data" / "events")["stream_id"])
    # Trimmed, not lost (the pending one was another consumer's to persist).
    assert {first, newer, *read, seen["late"]} <= persisted


# --- the scheduler -------------------------------------------------------------------------------


class Running:
    """A subprocess whose output lines are read as they come."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen = {"stdout": [], "stderr": []}
        self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True)
                        for name in self.lines]
        for reader in self.readers:
            reader.start()

    def _read(self, name):
        for line in getattr(self.proc, name):
            self.seen[name].append(line)
            self.lines[name].put(line)

    def wait_for(self, name, needle, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines[name].get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if needle in line:
                return line
        self.proc.kill()
        raise AssertionError(f"no {needle!r} on {name}:\n{''.join(self.seen['stderr'])}")

    def stop(self, sig):
        """Send `sig`; (exit code, seconds it took to exit)."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=30)
        finally:
            self.proc.kill()
        elapsed = time.monotonic() - started
        for reader in self.readers:
            reader.join(timeout=5)
        return code, elapsed

    def text(self, name):
        return "".join(self.seen[name])


def test_sigterm_while_sleeping_exits_0_at_once(tmp_path, redis_url, models_dir):
    running = Running(nightly_cmd(tmp_path, redis_url, models_dir, "--every", "3600"))
    running.wait_for("stderr", "a cycle every 3600s")
    code, elapsed = running.stop(signal.SIGTERM)
    assert code == 0, running.text("stderr")
    assert elapsed < 3
    assert "stopped by SIGTERM" in running.text("stderr")
    assert running.text("stdout") == ""  # no cycle ran


def test_failing_cycles_are_reported_and_the_loop_goes_on(tmp_path, redis_url):
    empty_store = tmp_path / "no-models"
    running = Running(nightly_cmd(tmp_path, redis_url, empty_store, "--every", "0.2"))
    running.wait_for("stdout", "failed")
    running.wait_for("stdout", "failed")
    code, elapsed = running.stop(signal.SIGINT)
    assert code == 0 and elapsed < 3, running.text("stderr")
    reports = [json.loads(line) for line in running.text("stdout").splitlines()]
    assert len(reports) >= 2
    for report in reports:
        assert report["decision"] == "failed" and "no served bundle" in report["error"]
    assert "nightly cycle failed" in running.text("stderr")
    assert "Traceback" not in running.text("stderr")  # an expected failure: its message only


@pytest.fixture
def patient_models_dir(tiny_dataset, tiny_trained, tmp_path):
    """A served bundle whose configuration never stops early: retraining it runs until the
    time cap, so the test can interrupt it mid-training."""
    from trainer.export import publish_bundle

    cfg, result = tiny_trained
    patient = dataclasses.replace(cfg, patience=10**6)
    root = tmp_path / "patient-models"
    publish_bundle(result.model, tiny_dataset, patient, TINY_SPEC, {}, root, "tiny",
                   progress=False)
    return root


def test_sigterm_during_a_cycle_abandons_it_cleanly(
        tmp_path, redis_url, redisdb, patient_models_dir, tiny_dataset):
    events = catalogue_events(tiny_dataset)
    for event in events:
        redisdb.xadd(STREAM, {"event": json.dumps(event.fields())})
    running = Running(nightly_cmd(tmp_path, redis_url, patient_models_dir, "--every", "0.2",
                                  "--epochs", "1000", "--max-minutes", "2"))
    # the cycle is in train() now (the served bundle's backbone: the default)
    running.wait_for("stderr", f"training {TrainConfig().backbone}:")
    code, elapsed = running.stop(signal.SIGTERM)
    stderr = running.text("stderr")
    assert code == 0, stderr
    assert elapsed < 3
    assert "cycle interrupted by SIGTERM" in stderr and "redone at the next run" in stderr
    assert running.text("stdout") == ""  # no report: the cycle did not finish
    assert complete_versions(patient_models_dir / "tiny") == [1]  # nothing published
    assert [p.name for p in (patient_models_dir / "tiny").iterdir()] == ["1"]  # no staging
    with RunLock(tmp_path / "data" / "nightly.lock"):  # released
        pass
    # What the cycle ingested before the stop is kept and acknowledged: nothing is lost.
    log = load_event_log(tmp_path / "data" / "events")
    assert sorted(log["event_id"]) == sorted(e.event_id for e in events)
    assert redisdb.xpending(STREAM, EVENT_GROUP)["pending"] == 0


@pytest.fixture(autouse=True)
def _never_the_shared_redis(redis_url):
    assert not redis_url.endswith(":6379/0")  # the tests' own server, not the machine's


def test_new_rows_of_the_items_file_are_served_without_events(tmp_path, redis_url,
                                                              tiny_dataset):
    """A bundle that places text-only items: with no new events, a new row of its items file
    still starts a cycle, and the published bundle serves the new item (marked text-only)."""
    ds = tiny_dataset
    data, items = tmp_path / "interactions.csv", tmp_path / "items.csv"
    data.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{ds.user_ids[u]},{ds.item_ids[i]},{1e9 + n}\n"
        for u in range(ds.n_users) for n, i in enumerate(ds.sequence(u))))
    items.write_text("item_id,title,categories\n" + "".join(
        f"{ds.item_ids[i]},{ds.titles[i]},{ds.categories[i]}\n" for i in range(1, ds.n_items + 1)))
    models = tmp_path / "models"
    train = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--data", str(data), "--items", str(items),
         "--text-only-items", "--epochs", "2", "--dim", "16", "--out", str(models), "--name",
         "tiny", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    first = json.loads((models / "tiny" / "1" / "items.json").read_text())
    assert first["text_only"] == []  # every item of the file has events

    proc = nightly(tmp_path, redis_url, models, "--tolerance", "1")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["decision"] == "skipped: no new events or items" and report["new_items"] == 0

    with open(items, "a") as fh:
        fh.write("brand-new,A brand new item,topic-3\n")
    proc = nightly(tmp_path, redis_url, models, "--tolerance", "1")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["new_items"] == 1 and report["decision"] == "published"
    published = json.loads((Path(report["published"]) / "items.json").read_text())
    row = published["item_ids"].index("brand-new")
    assert published["text_only"] == [row] and published["titles"][row] == "A brand new item"
    assert load_bundle(report["published"]).index.ntotal == len(published["item_ids"])
