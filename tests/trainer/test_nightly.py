"""The nightly job against a real Redis server and a real model store."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service import bundle as fmt
from service.history import Event, RedisHistoryStore
from trainer.data import load_event_log
from trainer.nightly import NightlyOptions, RunLock, ingest

STREAM = "recsys:events"


def record_events(redis_url, events):
    import asyncio

    async def go():
        store = RedisHistoryStore(redis_url, 200, 3600, STREAM, 100_000, 3600)
        await store.record(events)
        await store.close()

    asyncio.run(go())


def catalogue_events(tiny_dataset, users=20, per_user=8, prefix="n"):
    """Events over known items, as the service would record them."""
    items = tiny_dataset.item_ids[1:]
    return [Event(f"{prefix}{u}", str(items[(u * 7 + i) % len(items)]), 2e9 + i,
                  f"{prefix}-{u}-{i}") for u in range(users) for i in range(per_user)]


def nightly(tmp_path, redis_url, models_dir, *extra):
    cmd = [sys.executable, "-m", "trainer", "nightly", "--redis-url", redis_url,
           "--data-dir", str(tmp_path / "data"), "--models", str(models_dir), "--name", "tiny",
           "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def options(tmp_path, redis_url, models_dir, batch_size=10_000):
    return NightlyOptions(redis_url=redis_url, stream=STREAM, group="nightly",
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

    more = catalogue_events(tiny_dataset, users=3, prefix="m")
    record_events(redis_url, more)
    rerun = nightly(tmp_path, redis_url, models_dir, "--epochs", "1")
    assert rerun.returncode == 0, rerun.stderr
    assert redisdb.xpending(STREAM, "nightly")["pending"] == 0
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
    assert report["candidate"]["recall@50"] < report["served"]["recall@50"] - 0.005
    assert fmt.complete_versions(models_dir / "tiny") == [1]
    saved = json.loads(Path(report["report"]).read_text())
    assert saved["decision"] == "rejected" and "recall@20" in saved["served"]


def test_candidate_within_tolerance_is_published(tmp_path, redis_url, models_dir, tiny_dataset):
    record_events(redis_url, catalogue_events(tiny_dataset))
    proc = nightly(tmp_path, redis_url, models_dir, "--epochs", "2", "--tolerance", "1")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["decision"] == "published" and report["ingest"]["events"] == 160
    published = fmt.load_bundle(report["published"])
    assert published.version == 2
    assert published.manifest.extra["nightly_gate"]["tolerance"] == 1
    assert published.manifest.data_spec["base"] == fmt.read_manifest(
        models_dir / "tiny" / "1").data_spec


def test_second_run_waits_for_the_lock(tmp_path, redis_url, models_dir):
    with RunLock(tmp_path / "data" / "nightly.lock"):
        proc = nightly(tmp_path, redis_url, models_dir)
    assert proc.returncode == 3 and "another nightly run holds the lock" in proc.stderr


def test_unreachable_redis_fails_non_zero(tmp_path, models_dir):
    proc = nightly(tmp_path, "redis://127.0.0.1:1/0", models_dir)
    assert proc.returncode == 1 and "redis" in proc.stderr


@pytest.fixture(autouse=True)
def _never_the_shared_redis(redis_url):
    assert not redis_url.endswith(":6379/0")  # the tests' own server, not the machine's
