"""Per-user recent-item histories: Redis (the deployment) or in-process (the embedded default).

Both stores keep the same contract: a capped list of item ids per user, most recent last,
refreshed TTL on every write, idempotent for a repeated event id, and every accepted event
also appended to a capped event stream that the nightly job trains on.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

EVENT_STREAM = "recsys:events"  # default Redis Stream of accepted events (the nightly job reads it)


class StoreUnavailable(RuntimeError):
    """The history store cannot be reached (Redis down); callers degrade or answer 503."""


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: float
    event_id: str

    def fields(self) -> dict[str, str]:
        return {"user_id": self.user_id, "item_id": self.item_id,
                "timestamp": repr(self.timestamp), "event_id": self.event_id}


def new_event_id() -> str:
    return uuid.uuid4().hex


class HistoryStore(Protocol):
    kind: str

    async def record(self, events: list[Event]) -> list[bool]:
        """Append events (in the given order); True for each one accepted, False for a
        repeated event id."""

    async def history(self, user_id: str) -> list[str]: ...

    async def delete(self, user_id: str) -> bool: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


# One round trip per event, atomic: a repeated event id changes nothing.
_RECORD_SCRIPT = """
if ARGV[1] ~= '' then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[5]) then return 0 end
end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[7])
return 1
"""


class RedisHistoryStore:
    kind = "redis"

    def __init__(self, url: str, max_len: int, ttl_seconds: int, stream: str,
                 stream_max_len: int, dedup_ttl_seconds: int) -> None:
        self.client = aioredis.from_url(url, decode_responses=True, socket_timeout=2,
                                        socket_connect_timeout=2)
        self.max_len, self.ttl, self.stream = max_len, ttl_seconds, stream
        self.stream_max_len, self.dedup_ttl = stream_max_len, dedup_ttl_seconds
        self.script = self.client.register_script(_RECORD_SCRIPT)

    @staticmethod
    def history_key(user_id: str) -> str:
        return f"recsys:history:{user_id}"

    async def record(self, events: list[Event]) -> list[bool]:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for e in events:
                    await self.script(
                        keys=[self.history_key(e.user_id), f"recsys:event:{e.event_id}",
                              self.stream],
                        args=[e.event_id, e.item_id, self.max_len, self.ttl, self.dedup_ttl,
                              self.stream_max_len, json.dumps(e.fields())],
                        client=pipe,
                    )
                results = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return [bool(r) for r in results]

    async def history(self, user_id: str) -> list[str]:
        try:
            return await self.client.lrange(self.history_key(user_id), 0, -1)
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def delete(self, user_id: str) -> bool:
        try:
            return bool(await self.client.delete(self.history_key(user_id)))
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.client.aclose()


class InMemoryHistoryStore:
    """The same contract in one process (the embedded default, no Redis): histories and the
    event log live in this process only and are lost when it stops."""

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

    async def close(self) -> None:
        return None
