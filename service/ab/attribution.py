"""Attribution: which variant served a request id, which events it earned, and the per-variant
counters (in process, or in Redis with one script per event); the package docstring has the rules.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.ab.assign import user_digest


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion (sound for small counts and 0 or 1)."""
    if trials <= 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# --- attribution stores -------------------------------------------------------------------------


@dataclass
class VariantCounts:
    requests: int = 0  # answers served (request ids remembered)
    events: int = 0  # events attributed
    clicked: int = 0  # requests with at least one attributed event


@dataclass(frozen=True)
class Claim:
    """An accepted event that names the request it came from."""
    request_id: str
    user_id: str


@dataclass
class Counts:
    variants: dict[str, VariantCounts] = field(default_factory=dict)
    unattributed: int = 0


class AttributionUnavailable(RuntimeError):
    """The attribution store cannot be reached; answers and events go on without it."""


class AttributionStore(Protocol):
    kind: str

    async def served(self, request_id: str, user_id: str, variant: str) -> None:
        """Remember that `variant` answered `request_id` for `user_id`; count the request."""

    async def attribute(self, claims: list[Claim]) -> list[str | None]:
        """Count each claim for the variant that served its request (None: unattributed)."""

    async def counts(self, variants: list[str]) -> Counts: ...


class InMemoryAttributionStore:
    """The same contract in this process (no REDIS_URL): lost on restart. At most `capacity`
    request ids are remembered; beyond it the oldest are forgotten first (their events then
    count as unattributed), so memory stays bounded whatever the TTL."""

    kind = "memory"

    def __init__(self, experiment: str, ttl_seconds: int, capacity: int = 1_000_000,
                 clock=time.monotonic) -> None:
        self.experiment, self.ttl, self.capacity, self.clock = (
            experiment, ttl_seconds, capacity, clock)
        # request id -> (variant, user digest, clicked, expires); insertion order = expiry
        # order (one TTL for all; a re-served id moves to the end).
        self.requests: OrderedDict[str, list[Any]] = OrderedDict()
        self.totals: dict[str, VariantCounts] = {}
        self.unattributed = 0
        self.lock = asyncio.Lock()

    def _expire(self, now: float) -> None:
        while self.requests and (len(self.requests) > self.capacity
                                 or next(iter(self.requests.values()))[3] <= now):
            self.requests.popitem(last=False)

    async def served(self, request_id: str, user_id: str, variant: str) -> None:
        async with self.lock:
            now = self.clock()
            # A request id answered again (a client that reuses X-Request-ID) keeps its
            # clicked flag, as the Redis store's separate flag key does.
            previous = self.requests.pop(request_id, None)
            clicked = previous is not None and previous[2]
            self.requests[request_id] = [variant, user_digest(user_id), clicked, now + self.ttl]
            self.totals.setdefault(variant, VariantCounts()).requests += 1
            self._expire(now)

    async def attribute(self, claims: list[Claim]) -> list[str | None]:
        async with self.lock:
            now = self.clock()
            self._expire(now)
            out: list[str | None] = []
            for claim in claims:
                entry = self.requests.get(claim.request_id)
                if entry is None or entry[1] != user_digest(claim.user_id):
                    self.unattributed += 1
                    out.append(None)
                    continue
                counts = self.totals.setdefault(entry[0], VariantCounts())
                counts.events += 1
                if not entry[2]:
                    entry[2] = True
                    counts.clicked += 1
                out.append(entry[0])
            return out

    async def counts(self, variants: list[str]) -> Counts:
        return Counts({v: VariantCounts(**vars(self.totals.get(v, VariantCounts())))
                       for v in variants}, self.unattributed)


# KEYS: the request's key, its clicked flag (one hash tag: one slot). ARGV: the claimant's user
# digest. Returns nil when the request is unknown (or another user's), else {variant, 1 if
# this is the request's first attributed event else 0}. The flag expires with the request.
_ATTRIBUTE_SCRIPT = """
local served = redis.call('GET', KEYS[1])
if not served then return false end
local sep = string.find(served, ' ', 1, true)
if not sep or string.sub(served, sep + 1) ~= ARGV[1] then return false end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 1 then ttl = 1 end
local first = redis.call('SET', KEYS[2], '1', 'NX', 'PX', ttl)
if first then return {string.sub(served, 1, sep - 1), 1} end
return {string.sub(served, 1, sep - 1), 0}
"""


class RedisAttributionStore:
    """The contract on Redis (single or Cluster), on the history store's client: see the
    module docstring for the keys. Writes are pipelined: one round trip per answer (SET EX and
    HINCRBY), two per /events batch that carries request ids (the scripts, then the counters).
    """

    kind = "redis"

    def __init__(self, client: Any, experiment: str, ttl_seconds: int,
                 cluster: bool = False) -> None:
        # Imported here: this module is imported by the settings, which must stay light.
        from service.store.history import REDIS_ERRORS

        self.errors = REDIS_ERRORS
        self.client, self.experiment, self.ttl, self.cluster = (
            client, experiment, ttl_seconds, cluster)
        self.script = client.register_script(_ATTRIBUTE_SCRIPT)

    def request_key(self, request_id: str) -> str:
        return f"recsys:ab:{self.experiment}:req:{{{request_id}}}"

    def clicked_key(self, request_id: str) -> str:
        return f"recsys:ab:{self.experiment}:clk:{{{request_id}}}"

    def variant_key(self, variant: str) -> str:
        return f"recsys:ab:{self.experiment}:variant:{variant}"

    @property
    def unattributed_key(self) -> str:
        return f"recsys:ab:{self.experiment}:unattributed"

    async def served(self, request_id: str, user_id: str, variant: str) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self.request_key(request_id), f"{variant} {user_digest(user_id)}",
                         ex=self.ttl)
                pipe.hincrby(self.variant_key(variant), "requests", 1)
                await pipe.execute()
        except self.errors as exc:
            raise AttributionUnavailable(f"redis: {exc}") from exc

    async def attribute(self, claims: list[Claim]) -> list[str | None]:
        if not claims:
            return []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for claim in claims:
                    keys = [self.request_key(claim.request_id),
                            self.clicked_key(claim.request_id)]
                    args = [user_digest(claim.user_id)]
                    if self.cluster:  # redis-py refuses EVALSHA in a cluster pipeline
                        pipe.eval(_ATTRIBUTE_SCRIPT, len(keys), *keys, *args)
                    else:
                        await self.script(keys=keys, args=args, client=pipe)
                replies = await pipe.execute()
            increments: Counter[tuple[str, str]] = Counter()
            out: list[str | None] = []
            for reply in replies:
                if not reply:
                    out.append(None)
                    continue
                variant, first = str(reply[0]), int(reply[1])
                increments[variant, "events"] += 1
                increments[variant, "clicked"] += first
                out.append(variant)
            unattributed = out.count(None)
            async with self.client.pipeline(transaction=False) as pipe:
                for (variant, name), n in increments.items():
                    if n:
                        pipe.hincrby(self.variant_key(variant), name, n)
                if unattributed:
                    pipe.incrby(self.unattributed_key, unattributed)
                await pipe.execute()
        except self.errors as exc:
            raise AttributionUnavailable(f"redis: {exc}") from exc
        return out

    async def counts(self, variants: list[str]) -> Counts:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for variant in variants:
                    pipe.hgetall(self.variant_key(variant))
                pipe.get(self.unattributed_key)
                replies = await pipe.execute()
        except self.errors as exc:
            raise AttributionUnavailable(f"redis: {exc}") from exc
        out = {variant: VariantCounts(**{k: int(reply.get(k, 0))
                                         for k in ("requests", "events", "clicked")})
               for variant, reply in zip(variants, replies[:-1], strict=True)}
        return Counts(out, int(replies[-1] or 0))
