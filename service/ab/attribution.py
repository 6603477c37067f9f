"""A/B tests between bundles: which variant serves a user, and which variant earned an event.

Configuration (service/settings.py, README "A/B tests"): `AB_VARIANTS` lists the variants as
`name=model[@version][:share]`, comma-separated; the first one is the control (the one /model
and /readyz report at top level). Unset, the service serves one variant, `default` = MODEL_NAME,
and records nothing (no request ids, no counters): exactly the service without A/B.

Assignment: a user's point in [0, 1) is the first 8 bytes of sha256(AB_EXPERIMENT "\\n"
user_id) read as an integer over 2**64; the variants own consecutive intervals as long as their
shares, in the order given. It is the same in every process, replica, restart and Python version
(Python's hash() is salted per process, so it is not used); a new AB_EXPERIMENT reshuffles
users and starts the counters from zero. A user keeps their variant as long as AB_EXPERIMENT
and the shares do not change (growing a later variant's share moves some users into it from
the one next to it only).

Attribution: every /recommend answer of an A/B test remembers which variant served its request
id (with a digest of the user id) for AB_ATTRIBUTION_TTL_SECONDS; an event that carries that
`request_id` (and the same user) counts for that variant. Per variant: `requests` (answers
served), `events` (events attributed) and `clicked` (requests with at least one attributed
event, each counted once); click-through is clicked / requests. An event whose request id is
unknown, expired, from another experiment or another user's is still stored and counted as
unattributed. Only accepted events count: a repeated `event_id` is not attributed twice.

Storage: Redis when REDIS_URL is set (the history store's client, so workers and replicas share
the counters), else in this process. Keys (`<exp>` = AB_EXPERIMENT):

* `recsys:ab:<exp>:req:{<request id>}` string "<variant> <user digest>", TTL; written with SET
  EX on every answer;
* `recsys:ab:<exp>:clk:{<request id>}` "1", set NX by the first attributed event (same TTL as
  the request's key, which it shares a hash tag and so a Redis Cluster slot with: the one script
  that reads one and sets the other stays in one slot);
* `recsys:ab:<exp>:variant:<name>` hash {requests, events, clicked} (HINCRBY), no TTL;
* `recsys:ab:<exp>:unattributed` integer (INCRBY), no TTL.

This module is imported by the settings, so it imports nothing heavy (no redis, no FAISS):
the multi-worker supervisor reads the settings only.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

DEFAULT_VARIANT = "default"  # the one variant served when AB_VARIANTS is unset
VARIANT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")  # a metric label and a Redis key part
MODEL_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")  # one directory, no "..".
EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ENTRY = re.compile(r"^(?P<name>[^=]*)=(?P<model>[^@:]*)(?:@(?P<version>[^:]*))?"
                    r"(?::(?P<share>.*))?$")
SHARE_TOLERANCE = 1e-6  # shares must add up to 1 within this


@dataclass(frozen=True)
class VariantSpec:
    name: str
    model: str  # model name: the bundles in MODELS_DIR/<model>/
    version: int | None  # pinned version; None: the newest, hot-reloaded
    share: float  # fraction of users, in [0, 1]

    @property
    def label(self) -> str:
        return self.model if self.version is None else f"{self.model}@{self.version}"


def parse_variants(text: str, models_dir: Path | None = None) -> list[VariantSpec]:
    """AB_VARIANTS -> the variants, or ValueError saying what is wrong.

    Shares: if none is given the users are split equally; otherwise at most one variant may
    leave its share out and gets what the others leave; they must add up to 1. With
    `models_dir`, every model directory (and pinned version) must exist: a typo would
    otherwise leave the service unready forever.
    """
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise ValueError("AB_VARIANTS is empty: give at least one name=model[@version][:share]")
    parsed: list[tuple[str, str, int | None, float | None]] = []
    for entry in entries:
        match = _ENTRY.match(entry)
        if match is None:
            raise ValueError(f"AB_VARIANTS entry {entry!r}: expected name=model[@version][:share]"
                             f", e.g. control=recommender:0.5")
        name, model = match["name"].strip(), match["model"].strip()
        if not VARIANT_NAME.match(name):
            raise ValueError(f"AB_VARIANTS entry {entry!r}: variant name {name!r} must be 1..32 "
                             f"letters, digits, '_' or '-'")
        if not MODEL_NAME.match(model):
            raise ValueError(f"AB_VARIANTS entry {entry!r}: model name {model!r} must be a "
                             f"directory name in MODELS_DIR (letters, digits, '.', '_', '-')")
        version: int | None = None
        if match["version"] is not None:
            if not re.fullmatch(r"[0-9]+", match["version"]) or int(match["version"]) < 1:
                raise ValueError(f"AB_VARIANTS entry {entry!r}: version {match['version']!r} "
                                 f"must be a positive integer")
            version = int(match["version"])
        share: float | None = None
        if match["share"] is not None:
            try:
                share = float(match["share"])
            except ValueError:
                raise ValueError(f"AB_VARIANTS entry {entry!r}: share {match['share']!r} is "
                                 f"not a number") from None
            if not 0 <= share <= 1:  # also refuses NaN
                raise ValueError(f"AB_VARIANTS entry {entry!r}: share {share} is not in [0, 1]")
        parsed.append((name, model, version, share))

    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"AB_VARIANTS: variant names must differ; repeated: {', '.join(dupes)}")
    given = [p[3] for p in parsed if p[3] is not None]
    missing = len(parsed) - len(given)
    if not given:
        shares = [1 / len(parsed)] * len(parsed)
    elif missing > 1:
        raise ValueError("AB_VARIANTS: give every variant's share, or leave out exactly one "
                         "(it gets the rest), or none (equal split)")
    else:
        rest = 1 - sum(given)
        if missing and rest < -SHARE_TOLERANCE:
            raise ValueError(f"AB_VARIANTS: the shares given add up to {sum(given):g}, over 1")
        shares = [p[3] if p[3] is not None else max(rest, 0.0) for p in parsed]
    if abs(sum(shares) - 1) > SHARE_TOLERANCE:
        raise ValueError(f"AB_VARIANTS: shares add up to {sum(shares):g}; they must add up to 1")
    specs = [VariantSpec(n, m, v, s) for (n, m, v, _), s in zip(parsed, shares, strict=True)]
    if models_dir is not None:
        for spec in specs:
            root = Path(models_dir) / spec.model
            if not root.is_dir():
                raise ValueError(f"AB_VARIANTS: variant {spec.name!r}: no model {spec.model!r} "
                                 f"({root} is not a directory)")
            if spec.version is not None and not (root / str(spec.version)).is_dir():
                raise ValueError(f"AB_VARIANTS: variant {spec.name!r}: pinned version "
                                 f"{spec.version} of {spec.model!r} does not exist "
                                 f"({root / str(spec.version)})")
    return specs


def check_experiment(name: str) -> str:
    if not EXPERIMENT_NAME.match(name):
        raise ValueError(f"AB_EXPERIMENT={name!r}: 1..64 letters, digits, '.', '_' or '-' (it "
                         f"is part of Redis key names)")
    return name


def user_point(experiment: str, user_id: str) -> float:
    """The user's stable point in [0, 1) for this experiment (see the module docstring)."""
    digest = hashlib.sha256(f"{experiment}\n{user_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Assigner:
    """User id -> variant name, by the shares in the order given."""

    def __init__(self, specs: list[VariantSpec], experiment: str) -> None:
        self.experiment = experiment
        self.bounds: list[tuple[float, str]] = []
        total = 0.0
        for spec in specs:
            if spec.share > 0:  # a variant at 0 is loaded but gets nobody
                total += spec.share
                self.bounds.append((total, spec.name))
        if not self.bounds:
            raise ValueError("no variant has a share above 0")

    def variant(self, user_id: str) -> str:
        point = user_point(self.experiment, user_id)
        for bound, name in self.bounds:
            if point < bound:
                return name
        return self.bounds[-1][1]  # a rounding remainder of the shares' sum


def user_digest(user_id: str) -> str:
    """What a request id remembers of its user: enough to tell another user's event apart,
    16 bytes of Redis memory whatever the id's length."""
    return hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


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
        from service.history import REDIS_ERRORS

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
