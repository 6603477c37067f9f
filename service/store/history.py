"""Per-user recent-item histories: Redis (the deployment) or in-process (the embedded default).

Both stores keep the same contract: a capped list of item ids per user, most recent last,
refreshed TTL on every write, idempotent for a repeated event id, and every accepted event
also appended to an event stream that the nightly job trains on. The Redis stream is never
trimmed by the service (the nightly job trims what it has acknowledged); when it is full the
service refuses new events instead of dropping unread ones.

The Redis store runs on a single Redis or on Redis Cluster (REDIS_URL `redis+cluster://...`)
with the same code: the key layout (service.store.keys.KeyLayout) shards the stream by user and puts
every key of one event's script in one hash slot.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError

from service.store.events import EVENT_GROUP, Event
from service.store.keys import KeyLayout, is_cluster_url, node_url

# What a failing Redis raises: the cluster client's own errors (no node reachable, a slot not
# covered) are not RedisErrors.
REDIS_ERRORS = (RedisError, RedisClusterException)


class StoreUnavailable(RuntimeError):
    """The history store cannot be reached (Redis down); callers degrade or answer 503."""


class EventLogFull(RuntimeError):
    """The event stream holds its maximum of unconsumed entries (the nightly job has not run
    for a long time): new events are refused, not written over unread ones; answered 503."""


@dataclass(frozen=True)
class StreamStats:
    length: int  # entries in the event stream
    lag: int  # entries the nightly job's consumer group has not read yet


class HistoryStore(Protocol):
    kind: str

    async def record(self, events: list[Event]) -> list[bool]:
        """Append events (in the given order); True for each one accepted, False for a
        repeated event id."""

    async def history(self, user_id: str) -> list[str]: ...

    async def delete(self, user_id: str) -> bool: ...

    async def ping(self) -> bool: ...

    async def stream_stats(self) -> StreamStats | None:
        """The event stream's length and the nightly group's lag; None if unknown."""

    async def close(self) -> None: ...


# One round trip per event, atomic: a repeated event id changes nothing. The stream is not
# trimmed here: the nightly job trims what its consumer group has acknowledged. KEYS are the
# user's history, the event id's dedup key and the user's stream shard: one hash slot
# (service.store.keys.KeyLayout), as Redis Cluster requires of a script.
_RECORD_SCRIPT = """
if ARGV[1] ~= '' then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[5]) then return 0 end
end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('XADD', KEYS[3], '*', 'event', ARGV[6])
return 1
"""


class RedisHistoryStore:
    kind = "redis"

    def __init__(self, url: str, max_len: int, ttl_seconds: int, stream: str,
                 stream_max_len: int, dedup_ttl_seconds: int, shards: int | None = None) -> None:
        # One retry with a short backoff on a dropped connection or a timeout: after a Redis
        # restart the pooled connections are dead, and the first command on each would fail.
        # Retrying a recorded event is safe: it carries its event id, so it is stored once.
        options = dict(decode_responses=True, socket_timeout=2, socket_connect_timeout=2,
                       retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1))
        self.cluster = is_cluster_url(url)
        self.client: aioredis.Redis | RedisCluster = (
            RedisCluster.from_url(node_url(url), **options) if self.cluster
            else aioredis.from_url(url, **options))
        self.layout = KeyLayout.for_url(url, stream, shards)
        self.max_len, self.ttl, self.dedup_ttl = max_len, ttl_seconds, dedup_ttl_seconds
        self.stream_max_len = stream_max_len
        # EVENT_STREAM_MAX_LEN bounds the whole log: each shard holds its share.
        self.shard_max_len = math.ceil(stream_max_len / self.layout.shards)
        self.script = self.client.register_script(_RECORD_SCRIPT)
        self.group_ready = False

    async def ensure_group(self) -> None:
        """Create the nightly job's consumer group on every stream shard (from its start) if
        missing, so that its lag counts every event from the first one; and record this
        shard count for the nightly job (service.store.keys.KeyLayout)."""
        if self.group_ready:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for key in self.layout.streams():
                pipe.xgroup_create(key, EVENT_GROUP, id="0", mkstream=True)
            pipe.sadd(self.layout.registry_key, self.layout.shards)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply
        self.group_ready = True

    async def record(self, events: list[Event]) -> list[bool]:
        layout = self.layout
        try:
            # Once per process: the nightly job must know this shard count before it has events.
            await self.ensure_group()
            # Refuse the whole batch rather than grow a shard past its cap: the client is
            # told (503) and nothing unread is ever trimmed. Concurrent batches may overshoot
            # the cap by a batch each; it bounds memory, it is not a count to the entry.
            arriving = Counter(layout.shard(e.user_id) for e in events)
            async with self.client.pipeline(transaction=False) as pipe:
                for shard in arriving:
                    pipe.xlen(layout.stream_key(shard))
                lengths = await pipe.execute()
            for (shard, count), length in zip(arriving.items(), lengths, strict=True):
                if length + count > self.shard_max_len:
                    raise EventLogFull(
                        f"event log full: {layout.stream_key(shard)} holds its maximum of "
                        f"{self.shard_max_len} entries not yet consumed by the nightly job "
                        f"(EVENT_STREAM_MAX_LEN={self.stream_max_len} shared by "
                        f"{layout.shards} stream shard(s)); retry later")
            async with self.client.pipeline(transaction=False) as pipe:
                for e in events:
                    shard = layout.shard(e.user_id)
                    keys = [layout.history_key(e.user_id), layout.dedup_key(e.user_id, e.event_id),
                            layout.stream_key(shard)]
                    args = [e.event_id, e.item_id, self.max_len, self.ttl, self.dedup_ttl,
                            json.dumps(e.fields())]
                    if self.cluster:
                        # redis-py refuses EVALSHA in a cluster pipeline (a node may lack the
                        # script); EVAL sends the text, which Redis compiles once.
                        pipe.eval(_RECORD_SCRIPT, len(keys), *keys, *args)
                    else:
                        await self.script(keys=keys, args=args, client=pipe)
                results = await pipe.execute()
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return [bool(r) for r in results]

    async def stream_stats(self) -> StreamStats | None:
        """Summed over the stream's shards."""
        try:
            await self.ensure_group()
            async with self.client.pipeline(transaction=False) as pipe:
                for key in self.layout.streams():
                    pipe.xlen(key)
                    pipe.xinfo_groups(key)
                replies = await pipe.execute()
        except REDIS_ERRORS:
            return None
        lengths, infos = replies[::2], replies[1::2]
        lag = sum(_lag(length, groups) for length, groups in zip(lengths, infos, strict=True))
        return StreamStats(length=sum(lengths), lag=lag)

    async def history(self, user_id: str) -> list[str]:
        try:
            return await self.client.lrange(self.layout.history_key(user_id), 0, -1)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def delete(self, user_id: str) -> bool:
        try:
            return bool(await self.client.delete(self.layout.history_key(user_id)))
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (*REDIS_ERRORS, OSError):
            return False

    async def close(self) -> None:
        await self.client.aclose()


def _lag(length: int, groups: list[dict]) -> int:
    """One stream shard's entries the nightly group has not read yet."""
    group = next((g for g in groups if g["name"] == EVENT_GROUP), None)
    if group is None:
        return length
    # Redis >= 7 reports the lag; None when it cannot tell (after some trims).
    lag = group.get("lag")
    if lag is None:
        lag = length - int(group.get("entries-read") or 0)
    return max(0, int(lag))


class InMemoryHistoryStore:
    """The same contract in one process (the embedded default, no Redis): histories and the
    event log live in this process only and are lost when it stops. No nightly job reads this
    log, so it keeps the most recent events only (a bounded deque, never refuses)."""

    kind = "memory"

    def __init__(self, max_len: int, ttl_seconds: int, stream_max_len: int,
                 dedup_ttl_seconds: int, clock=time.monotonic) -> None:
        self.max_len, self.ttl, self.dedup_ttl, self.clock = (
            max_len, ttl_seconds, dedup_ttl_seconds, clock)
        self.histories: dict[str, tuple[deque[str], float]] = {}
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.stream: deque[dict[str, str]] = deque(maxlen=stream_max_len)
        self.lock = asyncio.Lock()

    def _expire(self, now: float) -> None:
        while self.seen and next(iter(self.seen.values())) <= now:
            self.seen.popitem(last=False)

    async def record(self, events: list[Event]) -> list[bool]:
        async with self.lock:
            now = self.clock()
            self._expire(now)
            accepted = []
            for e in events:
                if e.event_id in self.seen:
                    accepted.append(False)
                    continue
                self.seen[e.event_id] = now + self.dedup_ttl
                items = self._live(e.user_id, now)
                if items is None:
                    items = deque(maxlen=self.max_len)
                items.append(e.item_id)
                self.histories[e.user_id] = (items, now + self.ttl)
                self.stream.append(e.fields())
                accepted.append(True)
            return accepted

    def _live(self, user_id: str, now: float) -> deque[str] | None:
        entry = self.histories.get(user_id)
        if entry is None or entry[1] <= now:
            self.histories.pop(user_id, None)
            return None
        return entry[0]

    async def history(self, user_id: str) -> list[str]:
        items = self._live(user_id, self.clock())
        return list(items) if items is not None else []

    async def delete(self, user_id: str) -> bool:
        async with self.lock:
            return self._live(user_id, self.clock()) is not None and \
                self.histories.pop(user_id, None) is not None

    async def ping(self) -> bool:
        return True

    async def stream_stats(self) -> StreamStats | None:
        return None  # no consumer reads this log

    async def close(self) -> None:
        return None
