"""Both history stores against the same contract; Redis is a real server."""

import asyncio
import json

import pytest
from redis.crc import key_slot

from service.settings import Settings
from service.store.events import EVENT_GROUP, Event
from service.store.history import EventLogFull, InMemoryHistoryStore, RedisHistoryStore
from service.store.keys import KeyLayout


def ev(user, item, event_id, ts=1.0):
    return Event(user, item, ts, event_id)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(params=["redis", "redis-sharded", "memory"])
def store_factory(request, redis_url):
    """Builds the store inside the test's event loop (tests close it there too)."""

    def build(max_len=5, ttl=60):
        if request.param == "redis":
            return RedisHistoryStore(redis_url, max_len, ttl, "test:events", 1000, 3600)
        if request.param == "redis-sharded":
            return RedisHistoryStore(redis_url, max_len, ttl, "test:events", 1000, 3600,
                                     shards=4)
        return InMemoryHistoryStore(max_len, ttl, 1000, 3600)

    return build


def run(coro):
    return asyncio.run(coro)


def test_records_in_order_and_reads_back(store_factory):
    async def go():
        store = store_factory()
        assert await store.record([ev("u", "a", "1"), ev("u", "b", "2"), ev("v", "c", "3")])
        assert await store.history("u") == ["a", "b"]
        assert await store.history("v") == ["c"]
        assert await store.history("nobody") == []
        await store.close()

    run(go())


def test_cap_keeps_the_most_recent(store_factory):
    async def go():
        store = store_factory(max_len=3)
        await store.record([ev("u", str(i), f"e{i}") for i in range(5)])
        assert await store.history("u") == ["2", "3", "4"]
        await store.close()

    run(go())


def test_repeated_event_id_is_recorded_once(store_factory):
    async def go():
        store = store_factory()
        assert await store.record([ev("u", "a", "x"), ev("u", "a", "x")]) == [True, False]
        assert await store.record([ev("u", "a", "x")]) == [False]
        assert await store.history("u") == ["a"]
        await store.close()

    run(go())


def test_delete(store_factory):
    async def go():
        store = store_factory()
        await store.record([ev("u", "a", "1")])
        assert await store.delete("u") is True
        assert await store.history("u") == []
        assert await store.delete("u") is False
        await store.close()

    run(go())


def test_redis_ttl_is_set_and_refreshed(redis_url, redisdb):
    async def go():
        store = RedisHistoryStore(redis_url, 5, 100, "test:events", 1000, 3600)
        await store.record([ev("u", "a", "1")])
        redisdb.expire(store.layout.history_key("u"), 5)
        await store.record([ev("u", "b", "2")])  # a write refreshes the TTL
        ttl = redisdb.ttl(store.layout.history_key("u"))
        assert 90 < ttl <= 100
        await store.close()

    run(go())


def test_redis_history_expires(redis_url):
    async def go():
        store = RedisHistoryStore(redis_url, 5, 1, "test:events", 1000, 3600)
        await store.record([ev("u", "a", "1")])
        assert await store.history("u") == ["a"]
        await asyncio.sleep(1.3)
        assert await store.history("u") == []
        await store.close()

    run(go())


def test_memory_history_expires_with_the_clock():
    async def go():
        clock = FakeClock()
        store = InMemoryHistoryStore(5, 10, 100, 3600, clock=clock)
        await store.record([ev("u", "a", "1")])
        clock.now += 9
        assert await store.history("u") == ["a"]
        clock.now += 2
        assert await store.history("u") == []

    run(go())


def test_redis_stream_receives_every_accepted_event(redis_url, redisdb):
    async def go():
        store = RedisHistoryStore(redis_url, 5, 60, "test:events", 1000, 3600)
        await store.record([ev("u", "a", "1", ts=5.0), ev("u", "a", "1"), ev("v", "b", "2")])
        await store.close()

    run(go())
    entries = redisdb.xrange("test:events")
    events = [json.loads(fields["event"]) for _, fields in entries]
    assert [(e["user_id"], e["item_id"], e["event_id"]) for e in events] == [
        ("u", "a", "1"), ("v", "b", "2")]
    assert float(events[0]["timestamp"]) == 5.0


def test_memory_stream_receives_every_accepted_event():
    async def go():
        store = InMemoryHistoryStore(5, 60, 100, 3600)
        await store.record([ev("u", "a", "1"), ev("u", "a", "1"), ev("v", "b", "2")])
        return [e["event_id"] for e in store.stream]

    assert run(go()) == ["1", "2"]


# --- the key layout (Redis Cluster: docs/scaling.md) --------------------------------------------


def test_one_shard_keeps_the_unsharded_key_names():
    layout = KeyLayout()
    assert (layout.history_key("u"), layout.dedup_key("u", "e"), layout.streams()) == (
        "recsys:history:u", "recsys:event:e", {"recsys:events": ""})


def test_sharded_keys_of_one_event_share_a_slot_and_users_spread():
    layout = KeyLayout("recsys:events", 16)
    users = [f"user-{n}" for n in range(400)] + ["{s1}", "a{b}c", "ü/x"]
    for user in users:
        shard = layout.shard(user)
        keys = [layout.history_key(user), layout.dedup_key(user, "e{1}"),
                layout.stream_key(shard)]
        assert len({key_slot(k.encode()) for k in keys}) == 1, keys
        assert layout.streams()[layout.stream_key(shard)] == f"s{shard}"
    assert len({layout.shard(u) for u in users}) == 16
    # a shard's name does not depend on the count (N -> M keeps the stream shards)
    assert KeyLayout("recsys:events", 4).stream_key(3) == layout.stream_key(3)


def test_layout_settings_are_checked():
    with pytest.raises(ValueError, match="Redis Cluster"):
        KeyLayout.for_url("redis+cluster://h:7000", "recsys:events", 1)
    with pytest.raises(ValueError, match="braces"):
        KeyLayout("ev{x}", 4)
    assert KeyLayout.for_url("redis+cluster://h:7000", "recsys:events", None).shards == 16
    assert KeyLayout.for_url("redis://h:6379/0", "recsys:events", None).shards == 1
    with pytest.raises(ValueError, match="EVENT_STREAM_SHARDS=1"):
        Settings(redis_url="rediss+cluster://h:7000", event_stream_shards=1)


def test_sharded_stream_caps_stats_and_registry(redis_url, redisdb):
    layout = KeyLayout("test:events", 4)
    by_shard: dict[int, list[str]] = {}
    for n in range(200):
        by_shard.setdefault(layout.shard(f"u{n}"), []).append(f"u{n}")
    users = [shard_users[0] for _, shard_users in sorted(by_shard.items())]

    async def go():
        # 10 events over 4 shards: 3 per shard
        store = RedisHistoryStore(redis_url, 5, 60, "test:events", 10, 3600, shards=4)
        assert await store.record([ev(u, "a", f"{u}-1") for u in users]) == [True] * 4
        assert await store.record([ev(u, "b", f"{u}-2") for u in users]) == [True] * 4
        with pytest.raises(EventLogFull, match=r"test:events:\{s\d\} holds its maximum of 3"):
            await store.record([ev(users[0], "c", "x1"), ev(users[0], "d", "x2")])
        assert await store.record([ev(users[1], "c", "y1")]) == [True]  # other shards have room
        stats = await store.stream_stats()
        await store.close()
        return stats

    stats = run(go())
    assert (stats.length, stats.lag) == (9, 9)
    lengths = {key: redisdb.xlen(key) for key in layout.streams()}
    assert sorted(lengths.values()) == [2, 2, 2, 3]
    assert all(redisdb.xinfo_groups(key)[0]["name"] == EVENT_GROUP for key in lengths)
    assert redisdb.smembers("test:events:shards") == {"4"}
    assert not redisdb.exists("test:events")  # no unsharded stream
    assert redisdb.lrange(layout.history_key(users[0]), 0, -1) == ["a", "b"]


def test_concurrent_reads_of_an_unreachable_redis_each_fail_with_store_unavailable():
    from service.store.history import StoreUnavailable

    async def scenario():
        # Nothing listens there: every read must fail, none may hang.
        store = RedisHistoryStore("redis://127.0.0.1:9/0", 5, 60, "test:events", 1000, 3600)
        got = await asyncio.wait_for(asyncio.gather(
            *(store.history(f"u{u}") for u in range(3)), return_exceptions=True), 20)
        await store.close()
        return got

    assert all(isinstance(r, StoreUnavailable) for r in asyncio.run(scenario()))
