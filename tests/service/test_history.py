"""Both history stores against the same contract; Redis is a real server."""

import asyncio
import json

import pytest

from service.history import Event, InMemoryHistoryStore, RedisHistoryStore


def ev(user, item, event_id, ts=1.0):
    return Event(user, item, ts, event_id)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(params=["redis", "memory"])
def store_factory(request, redis_url):
    """Builds the store inside the test's event loop (tests close it there too)."""

    def build(max_len=5, ttl=60):
        if request.param == "redis":
            return RedisHistoryStore(redis_url, max_len, ttl, "test:events", 1000, 3600)
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
        redisdb.expire(RedisHistoryStore.history_key("u"), 5)
        await store.record([ev("u", "b", "2")])  # a write refreshes the TTL
        ttl = redisdb.ttl(RedisHistoryStore.history_key("u"))
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
