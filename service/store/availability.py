"""Item availability: the items never to serve until made available again (recalled, sold
out), shared by every worker and replica (docs/architecture.md, "Availability").

The set lives in Redis beside a version counter, both under one hash tag so that a change is
one transaction on Redis Cluster too. Each worker holds a snapshot (version, ids) and polls the
version every AVAILABILITY_REFRESH_SECONDS; a new version loads the set. The worker that takes
a change applies it at once. Ids are external item ids, so the set survives bundle swaps and
restarts; each served model maps it to its own rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from service.store.history import StoreUnavailable

log = logging.getLogger("service.availability")

# One hash tag: both keys in one Redis Cluster slot (a MULTI may not span slots).
UNAVAILABLE_KEY = "recsys:{availability}:unavailable"
VERSION_KEY = "recsys:{availability}:version"


@dataclass(frozen=True)
class Snapshot:
    version: int  # 0: nothing was ever marked
    unavailable: frozenset[str]


EMPTY = Snapshot(0, frozenset())


class AvailabilityStore(Protocol):
    kind: str

    async def change(self, unavailable: list[str], available: list[str]) -> Snapshot:
        """Mark `unavailable` ids unavailable and `available` ids available again, as one
        change; the set after it."""
        ...

    async def version(self) -> int: ...

    async def snapshot(self) -> Snapshot: ...


class RedisAvailabilityStore:
    kind = "redis"

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self.client = client  # the history store's: it closes it

    async def change(self, unavailable: list[str], available: list[str]) -> Snapshot:
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                if available:
                    pipe.srem(UNAVAILABLE_KEY, *available)
                if unavailable:
                    pipe.sadd(UNAVAILABLE_KEY, *unavailable)
                pipe.incr(VERSION_KEY)
                pipe.smembers(UNAVAILABLE_KEY)
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"availability store: {exc}") from exc
        return Snapshot(int(replies[-2]), frozenset(replies[-1]))

    async def version(self) -> int:
        try:
            return int(await self.client.get(VERSION_KEY) or 0)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"availability store: {exc}") from exc

    async def snapshot(self) -> Snapshot:
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(VERSION_KEY)
                pipe.smembers(UNAVAILABLE_KEY)
                version, members = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"availability store: {exc}") from exc
        return Snapshot(int(version or 0), frozenset(members))


class InMemoryAvailabilityStore:
    """Without REDIS_URL (one process only)."""

    kind = "memory"

    def __init__(self) -> None:
        self._current = EMPTY

    async def change(self, unavailable: list[str], available: list[str]) -> Snapshot:
        ids = (self._current.unavailable - set(available)) | set(unavailable)
        self._current = Snapshot(self._current.version + 1, frozenset(ids))
        return self._current

    async def version(self) -> int:
        return self._current.version

    async def snapshot(self) -> Snapshot:
        return self._current


class Availability:
    """A worker's view: the latest snapshot it has seen, refreshed by `watch`."""

    def __init__(self, store: AvailabilityStore,
                 on_change: Callable[[Snapshot], None] | None = None) -> None:
        self.store = store
        self.current = EMPTY
        self.on_change = on_change  # e.g. this worker's gauges

    async def change(self, unavailable: list[str], available: list[str]) -> Snapshot:
        snapshot = await self.store.change(unavailable, available)
        self.adopt(snapshot)
        return snapshot

    def adopt(self, snapshot: Snapshot) -> None:
        # Never back to an older snapshot (a poll that raced this worker's own change).
        if snapshot.version > self.current.version:
            self._set(snapshot)

    def _set(self, snapshot: Snapshot) -> None:
        self.current = snapshot
        if self.on_change is not None:
            self.on_change(snapshot)

    async def refresh(self) -> None:
        """Load the set when its version moved (one GET otherwise). A version below ours
        means the store was emptied (a flushed Redis): its state is taken as it is."""
        version = await self.store.version()
        if version > self.current.version:
            self.adopt(await self.store.snapshot())
        elif version < self.current.version:
            self._set(await self.store.snapshot())

    async def watch(self, interval: float) -> None:
        """Poll until cancelled; an unreachable store keeps the last snapshot (logged once
        per outage)."""
        failing = False
        while True:
            try:
                await self.refresh()
                if failing:
                    log.info("availability store reachable again")
                failing = False
            except StoreUnavailable as exc:
                if not failing:
                    log.warning("availability store unavailable; serving with the last known "
                                "unavailable items", extra={"error": str(exc),
                                                            "items": len(self.current.unavailable)})
                failing = True
            await asyncio.sleep(interval)
