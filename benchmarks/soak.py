"""Bounded soak test of the service under mixed load and disruptions. Prints one JSON object.

Copies the newest bundle of --models-dir/--name into a temporary model store (the user's store
is never written), starts a throwaway redis-server on loopback (AOF, fsync on every write) and
`python -m service` against both, records a short history for each soak user, then for
--seconds runs --concurrency async workers: ~70% POST /recommend, ~30% POST /events (1-5
events, each with a unique event_id). Meanwhile, at ~20%, ~40% and ~60% of the run (and again
at ~70%, ~80%, ~90% when --seconds >= 300) it:

    redis_restart   `redis-cli shutdown` (graceful), then the same redis-server again (AOF replay)
    publish         republish() (service.bundle.format) of the newest bundle; time until /readyz
                    serves it
    kill9_restart   SIGKILL the service, start it again; time until /readyz is 200

At the end it reads the whole `recsys:events` stream back and checks that every event id the
service acknowledged (a 200 answer to /events) is in it: `lost` must be 0.

Progress goes to stderr; the temporary directory (store, Redis data, service logs) is removed
unless --keep. Usage:

    python benchmarks/soak.py --seconds 600 --concurrency 8 [--out soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import httpx
import numpy as np
import redis
import redis.asyncio as aioredis

from service.bundle.format import ITEMS, latest_version, republish
from service.store.keys import EVENT_STREAM

RECOMMEND, EVENTS = "/recommend", "/events"
RECOMMEND_SHARE = 0.7
REQUEST_TIMEOUT = 5.0
ERROR_PAUSE = 0.02  # after a non-200 answer or a failed request: no busy loop while it is down
READY_TIMEOUT = 120.0  # for the service to (re)start or hot-swap a model
REDIS_TIMEOUT = 30.0
XRANGE_PAGE = 1000
MAX_UNPLANNED = 5  # restarts of a process that exited by itself (watchdog)
CYCLE = ("redis_restart", "publish", "kill9_restart")
T = TypeVar("T")


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- pure helpers (tests/benchmarks/test_soak_script.py) ---------------------------------------


class Record(NamedTuple):
    end_s: float  # completion time, seconds since the load started
    endpoint: str
    status: str  # "200", "503", ... or "error:<ExceptionName>"
    latency_s: float


def schedule(seconds: float) -> list[tuple[float, str]]:
    """(offset in seconds, disruption kind): one cycle at 20/40/60% of the run, a second one
    at 70/80/90% when the run lasts at least 300 s."""
    fractions = [0.2, 0.4, 0.6] + ([0.7, 0.8, 0.9] if seconds >= 300 else [])
    return [(round(seconds * f, 3), CYCLE[i % len(CYCLE)]) for i, f in enumerate(fractions)]


def status_name(exc: BaseException) -> str:
    return f"error:{type(exc).__name__}"


def status_counts(records: Iterable[Record]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """({endpoint: {status: n}}, {status: n}), keys sorted."""
    by_endpoint: dict[str, Counter[str]] = {}
    overall: Counter[str] = Counter()
    for r in records:
        by_endpoint.setdefault(r.endpoint, Counter())[r.status] += 1
        overall[r.status] += 1
    return ({e: dict(sorted(c.items())) for e, c in sorted(by_endpoint.items())},
            dict(sorted(overall.items())))


def longest_non_200(records: Sequence[Record]) -> dict[str, Any]:
    """The longest stretch of consecutive non-200 requests in completion order: its duration
    (first to last completion in it), request count, and bounds (seconds since load start)."""
    best: dict[str, Any] = {"seconds": 0.0, "requests": 0, "from_s": None, "to_s": None}
    start: Record | None = None
    count = 0
    for r in sorted(records, key=lambda r: r.end_s) + [Record(float("inf"), "", "200", 0.0)]:
        if r.status != "200":
            if start is None:
                start, count = r, 0
            count += 1
            last = r
            continue
        if start is not None:
            seconds = last.end_s - start.end_s
            if (seconds, count) > (best["seconds"], best["requests"]):
                best = {"seconds": round(seconds, 3), "requests": count,
                        "from_s": round(start.end_s, 3), "to_s": round(last.end_s, 3)}
            start = None
    return best


def longest_without_200(records: Sequence[Record], end_s: float) -> dict[str, Any]:
    """The longest time with no 200 completing at all (covers hung requests too): the gap
    between consecutive 200 completions, the load's start and its end counting as bounds."""
    times = [0.0] + sorted(r.end_s for r in records if r.status == "200") + [end_s]
    gaps = [(b - a, a, b) for a, b in zip(times, times[1:], strict=False)]
    seconds, lo, hi = max(gaps)
    return {"seconds": round(seconds, 3), "from_s": round(lo, 3), "to_s": round(hi, 3)}


def percentiles_ms(latencies: Sequence[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None}
    ms = np.asarray(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def lost_events(acknowledged: Sequence[str], found: set[str], limit: int = 10) \
        -> tuple[int, list[str]]:
    """(how many acknowledged ids are not in `found`, the first `limit` of them)."""
    lost = [e for e in acknowledged if e not in found]
    return len(lost), lost[:limit]


def window_statuses(records: Sequence[Record], lo: float, hi: float) -> dict[str, int]:
    """Statuses of the requests completed in [lo, hi)."""
    return dict(sorted(Counter(r.status for r in records if lo <= r.end_s < hi).items()))


# --- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM outside the event loop stops the script as Ctrl-C does (the finally blocks stop
    the child processes); inside it, run_async() cancels the load instead."""
    raise KeyboardInterrupt(f"signal {signum}")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(coro), with SIGTERM cancelling it (as asyncio.run does for Ctrl-C): the
    workers stop at their next await and the processes are cleaned up by the caller."""

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro

    try:
        return asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, _on_sigterm)  # closing the loop reset it to the default


@dataclass
class Harness:
    """The redis-server and service processes this script started, and how to (re)start them."""

    tmp: Path
    models_dir: Path
    name: str
    port: int
    redis_port: int
    api_key: str | None
    log_level: str = "WARNING"
    redis_proc: subprocess.Popen[bytes] | None = None
    service_proc: subprocess.Popen[bytes] | None = None
    service_starts: int = 0
    redis_starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_redis(self) -> None:
        data = self.tmp / "redis"
        data.mkdir(exist_ok=True)
        self.redis_starts += 1
        with open(self.tmp / "redis.log", "ab") as out:  # the child keeps its own descriptor
            self.redis_proc = subprocess.Popen(
                ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                 "--dir", str(data), "--appendonly", "yes", "--appendfsync", "always",
                 "--save", "", "--daemonize", "no", "--protected-mode", "yes"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)  # a Ctrl-C reaches only this script, which cleans up

    def start_service(self) -> None:
        env = {**os.environ, "MODELS_DIR": str(self.models_dir), "MODEL_NAME": self.name,
               "REDIS_URL": self.redis_url, "HOST": "127.0.0.1", "PORT": str(self.port),
               "RELOAD_INTERVAL_SECONDS": "1", "LOG_LEVEL": self.log_level}
        self.service_starts += 1
        # cwd = the temp dir: a .env file in the caller's directory changes nothing here.
        with open(self.tmp / "service.stdout.log", "ab") as out, \
                open(self.tmp / "service.stderr.log", "ab") as err:
            self.service_proc = subprocess.Popen(
                [sys.executable, "-m", "service"], env=env, cwd=self.tmp, stdout=out,
                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)

    def redis_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.redis_port),
                               *args], capture_output=True, text=True, timeout=REDIS_TIMEOUT)

    def stop_all(self) -> None:
        for proc in (self.service_proc, self.redis_proc):  # the service first: it uses Redis
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()  # redis-server: a graceful shutdown on SIGTERM
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return proc.poll() is not None


async def wait_ready(client: httpx.AsyncClient, timeout: float, version: int | None = None,
                     proc: subprocess.Popen[bytes] | None = None) -> bool:
    """/readyz answers 200 (and serves `version`, when given) within `timeout` seconds; False
    at once if `proc` (the service) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            r = await client.get("/readyz", timeout=2)
            if r.status_code == 200 and (version is None or
                                         r.json().get("model_version") == version):
                return True
        except (httpx.HTTPError, ValueError):
            pass
        await asyncio.sleep(0.05)
    return False


async def wait_redis(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    client = aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        while time.monotonic() < deadline:
            try:
                if await client.ping():
                    return True
            except (redis.RedisError, OSError):
                pass
            await asyncio.sleep(0.05)
        return False
    finally:
        await client.aclose()


# --- the load -------------------------------------------------------------------------------


@dataclass
class Ledger:
    records: list[Record] = field(default_factory=list)
    sent: set[str] = field(default_factory=set)  # event ids (a retry re-sends the same ids)
    acknowledged: list[str] = field(default_factory=list)
    duplicates_reported: int = 0
    # The first answer of each (endpoint, status) other than 200: what the service said.
    samples: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def sample(self, at_s: float, endpoint: str, status: str, body: str) -> None:
        seen = self.samples.setdefault(endpoint, {})
        if status != "200" and status not in seen:
            seen[status] = {"at_s": round(at_s, 3), "body": body[:300]}


class Soak:
    def __init__(self, args: argparse.Namespace, harness: Harness, item_ids: list[str]) -> None:
        self.args, self.h, self.item_ids = args, harness, item_ids
        self.users = [f"soak-{n}" for n in range(args.users)]
        self.ledger = Ledger()
        self.disruptions: list[dict[str, Any]] = []
        self.unplanned: list[dict[str, Any]] = []  # exits no disruption caused (watchdog)
        self.lock = asyncio.Lock()
        self.t0 = 0.0
        headers = {"X-API-Key": harness.api_key} if harness.api_key else {}
        self.headers = headers

    def now(self) -> float:
        return time.monotonic() - self.t0

    def batch(self, rng: random.Random, user: str, n: int) -> list[dict[str, str]]:
        return [{"user_id": user, "item_id": rng.choice(self.item_ids),
                 "event_id": uuid.uuid4().hex} for _ in range(n)]

    async def post(self, client: httpx.AsyncClient, endpoint: str, body: dict[str, Any]) -> str:
        """POST and return the status; a failed request is recorded as error:<Exception>."""
        events: list[dict[str, str]] = body.get("events", [])
        self.ledger.sent.update(e["event_id"] for e in events)
        try:
            r = await client.post(endpoint, json=body)
            if r.status_code == 200 and events:
                duplicates = int(r.json().get("duplicates", 0))  # ValueError: not JSON
                self.ledger.acknowledged.extend(e["event_id"] for e in events)
                self.ledger.duplicates_reported += duplicates
            status, text = str(r.status_code), r.text
        except (httpx.HTTPError, ValueError) as exc:
            status, text = status_name(exc), str(exc)
        self.ledger.sample(self.now(), endpoint, status, text)
        return status

    async def seed(self, client: httpx.AsyncClient) -> None:
        """A few events for every soak user (so /recommend reads a real history); a failed
        batch is retried with the same event ids, at most 5 times."""
        rng = random.Random(self.args.seed)
        events = [e for u in self.users for e in self.batch(rng, u, 5)]
        for lo in range(0, len(events), 500):
            chunk = events[lo:lo + 500]
            for attempt in range(5):
                status = await self.post(client, EVENTS, {"events": chunk})
                if status == "200":
                    break
                log(f"seed batch failed ({status}), retrying")
                await asyncio.sleep(0.5 * (attempt + 1))
            else:
                raise SystemExit("could not record the seed events (see the service logs)")

    async def worker(self, client: httpx.AsyncClient, seed: int, stop: float,
                     max_requests: int) -> None:
        rng = random.Random(seed)
        for _ in range(max_requests):
            if time.monotonic() >= stop:
                return
            user = rng.choice(self.users)  # every soak user has events (seed())
            endpoint = RECOMMEND if rng.random() < RECOMMEND_SHARE else EVENTS
            body: dict[str, Any] = (
                {"user_id": user, "k": 20} if endpoint == RECOMMEND
                else {"events": self.batch(rng, user, rng.randint(1, 5))})
            started = time.monotonic()
            status = await self.post(client, endpoint, body)
            ended = time.monotonic()
            self.ledger.records.append(Record(ended - self.t0, endpoint, status, ended - started))
            if status != "200":
                await asyncio.sleep(ERROR_PAUSE)

    # --- disruptions ---

    async def redis_restart(self, ops: httpx.AsyncClient) -> dict[str, Any]:
        at = self.now()
        out: dict[str, Any] = {"kind": "redis_restart", "at_s": round(at, 3)}
        proc = self.h.redis_proc
        assert proc is not None
        reply = await asyncio.to_thread(self.h.redis_cli, "shutdown")
        if not await wait_exit(proc, REDIS_TIMEOUT):
            out["error"] = f"redis-server still running after shutdown ({reply.stdout.strip()})"
            proc.kill()
            await wait_exit(proc, 10)
        out["down_s"] = round(self.now() - at, 3)
        await asyncio.sleep(self.args.redis_down)
        self.h.start_redis()
        if await wait_redis(self.h.redis_url, REDIS_TIMEOUT):
            out["redis_up_s"] = round(self.now() - at, 3)
        else:
            out["error"] = "redis-server did not come back"
        ok = await wait_ready(ops, READY_TIMEOUT)
        out["recovered_s"] = round(self.now() - at, 3) if ok else None
        return out

    async def publish(self, ops: httpx.AsyncClient) -> dict[str, Any]:
        at = self.now()
        root = self.h.models_dir / self.h.name
        newest = root / str(latest_version(root))
        path = await asyncio.to_thread(republish, newest, self.h.models_dir, self.h.name,
                                       {"soak": True})
        published = self.now()
        version = int(path.name)
        ok = await wait_ready(ops, READY_TIMEOUT, version)
        return {"kind": "publish", "at_s": round(at, 3), "version": version,
                "publish_s": round(published - at, 3),
                "swap_s": round(self.now() - published, 3) if ok else None}

    async def kill9_restart(self, ops: httpx.AsyncClient) -> dict[str, Any]:
        at = self.now()
        proc = self.h.service_proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        await wait_exit(proc, 10)
        self.h.start_service()
        ok = await wait_ready(ops, READY_TIMEOUT, proc=self.h.service_proc)
        return {"kind": "kill9_restart", "at_s": round(at, 3),
                "ready_after_s": round(self.now() - at, 3) if ok else None}

    async def disrupt(self, ops: httpx.AsyncClient, stop: float) -> None:
        for offset, kind in schedule(self.args.seconds):
            delay = self.t0 + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= stop:
                log(f"skipping {kind}: the run is over")
                break
            log(f"{kind} at {self.now():.1f}s")
            async with self.lock:  # the watchdog leaves planned downtime alone
                try:
                    result = await getattr(self, kind)(ops)
                except Exception as exc:  # recorded, never fatal: the load goes on
                    result = {"kind": kind, "at_s": round(offset, 3), "error": repr(exc)}
            log(f"  {json.dumps(result)}")
            self.disruptions.append(result)

    async def watchdog(self, ops: httpx.AsyncClient, stop: float) -> None:
        """A service or redis-server that exits outside a planned disruption (a crash, the OOM
        killer, a stray signal) is recorded and started again, at most MAX_UNPLANNED times
        each: the soak goes on, and the report shows it."""
        restarts = Counter[str]()
        while time.monotonic() < stop:
            await asyncio.sleep(0.2)
            async with self.lock:
                for process in ("service", "redis"):
                    proc = self.h.service_proc if process == "service" else self.h.redis_proc
                    if proc is None or proc.poll() is None or restarts[process] >= MAX_UNPLANNED:
                        continue
                    restarts[process] += 1
                    code = proc.returncode
                    at = self.now()
                    out: dict[str, Any] = {"process": process, "pid": proc.pid,
                                           "detected_at_s": round(at, 3), "returncode": code}
                    if code < 0:
                        out["signal"] = signal.Signals(-code).name
                    log(f"UNPLANNED EXIT of {process}: {json.dumps(out)}; starting it again")
                    if process == "service":
                        self.h.start_service()
                        ok = await wait_ready(ops, READY_TIMEOUT, proc=self.h.service_proc)
                    else:
                        self.h.start_redis()
                        ok = await wait_redis(self.h.redis_url, REDIS_TIMEOUT)
                    out["restarted_after_s"] = round(self.now() - at, 3) if ok else None
                    self.unplanned.append(out)

    async def run(self) -> float:
        """Seed, then load + disruptions; returns the load's duration in seconds."""
        limits = httpx.Limits(max_connections=self.args.concurrency + 2,
                              max_keepalive_connections=self.args.concurrency + 2)
        async with httpx.AsyncClient(base_url=self.h.url, timeout=REQUEST_TIMEOUT, limits=limits,
                                     headers=self.headers) as client, \
                httpx.AsyncClient(base_url=self.h.url, timeout=REQUEST_TIMEOUT) as ops:
            if not await wait_ready(ops, READY_TIMEOUT, proc=self.h.service_proc):
                tail = (self.h.tmp / "service.stderr.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"service not ready (exited or {READY_TIMEOUT}s passed); "
                                 f"its stderr ends:\n{tail}")
            self.t0 = time.monotonic()
            await self.seed(client)
            log(f"seeded {len(self.ledger.acknowledged)} events for {len(self.users)} users; "
                f"load for {self.args.seconds}s at concurrency {self.args.concurrency}")
            self.t0 = time.monotonic()
            stop = self.t0 + self.args.seconds
            max_requests = int(self.args.seconds * 5000) + 1  # far above what one worker does
            workers = [self.worker(client, self.args.seed + 1 + i, stop, max_requests)
                       for i in range(self.args.concurrency)]
            background = [asyncio.create_task(self.disrupt(ops, stop)),
                          asyncio.create_task(self.watchdog(ops, stop))]
            try:
                await asyncio.gather(self.progress(stop), *workers)
                elapsed = self.now()
                # A disruption still under way finishes (bounded by its own timeouts).
                await asyncio.wait(background, timeout=READY_TIMEOUT + 2 * REDIS_TIMEOUT)
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
            return elapsed

    async def progress(self, stop: float) -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(min(10.0, max(0.0, stop - time.monotonic())))
            _, overall = status_counts(self.ledger.records)
            log(f"{self.now():.0f}s: {len(self.ledger.records)} requests {overall}")


def read_stream_ids(url: str, stream: str) -> tuple[set[str], int]:
    """Every event_id in the stream (XRANGE in pages) and the number of entries read."""
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=30)
    try:
        ids: set[str] = set()
        entries = 0
        start = "-"
        for _ in range(int(client.xlen(stream)) // XRANGE_PAGE + 2):
            page = client.xrange(stream, min=start, max="+", count=XRANGE_PAGE)
            for entry_id, fields in page:
                entries += 1
                try:
                    ids.add(str(json.loads(fields["event"])["event_id"]))
                except (KeyError, TypeError, ValueError):
                    log(f"stream entry {entry_id} has no event_id: {fields}")
            if len(page) < XRANGE_PAGE:
                break
            start = "(" + page[-1][0]
        return ids, entries
    finally:
        client.close()


def report(args: argparse.Namespace, soak: Soak, elapsed: float, found: set[str],
           entries: int, load_start: tuple[float, ...], bundle: Path) -> dict[str, Any]:
    records = soak.ledger.records
    by_endpoint, overall = status_counts(records)
    acknowledged = soak.ledger.acknowledged
    lost, lost_ids = lost_events(acknowledged, found)
    # Sent, answered with an error, but stored all the same (a client retry would be deduped).
    unacknowledged_found = len((soak.ledger.sent - set(acknowledged)) & found)
    disruptions = soak.disruptions
    bounds = [d.get("at_s", 0.0) for d in disruptions] + [elapsed]
    for d, lo, hi in zip(disruptions, bounds, bounds[1:], strict=False):
        d["window_statuses"] = window_statuses(records, lo, hi)  # until the next one
    latency = {e: percentiles_ms([r.latency_s for r in records
                                  if r.endpoint == e and r.status == "200"])
               for e in (RECOMMEND, EVENTS)}
    return {
        "seconds": args.seconds, "concurrency": args.concurrency, "bundle": str(bundle),
        "users": args.users, "cpus": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "requests": len(records), "by_endpoint": by_endpoint, "statuses": overall,
        "events": {"sent": len(soak.ledger.sent), "acknowledged": len(acknowledged),
                   "found_in_redis": len(acknowledged) - lost, "lost": lost,
                   "lost_ids": lost_ids, "stream_entries": entries,
                   "unacknowledged_found_in_redis": unacknowledged_found,
                   "duplicates_reported": soak.ledger.duplicates_reported},
        "disruptions": disruptions, "unplanned_exits": soak.unplanned,
        "longest_non_200": longest_non_200(records),
        "longest_without_200": longest_without_200(records, elapsed),
        "service_starts": soak.h.service_starts, "redis_starts": soak.h.redis_starts,
        "req_per_s": round(len(records) / elapsed, 1) if elapsed > 0 else None,
        **percentiles_ms([r.latency_s for r in records]),
        "latency_200_by_endpoint": latency,
        "non_200_samples": soak.ledger.samples,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="load duration")
    parser.add_argument("--concurrency", type=int, default=8, help="async workers")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--name", default="recommender")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--port", type=int, help="service port (default: a free one)")
    parser.add_argument("--redis-port", type=int, help="redis-server port (default: a free one)")
    parser.add_argument("--users", type=int, default=200, help="soak users (soak-0 ...)")
    parser.add_argument("--redis-down", type=float, default=1.0,
                        help="seconds Redis stays down in a restart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--service-log-level", default="WARNING",
                        help="the service's LOG_LEVEL (INFO logs every request)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (store, Redis data, service logs)")
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 24 * 3600:
        parser.error("--seconds must be in 1..86400")
    if not 1 <= args.concurrency <= 1024:
        parser.error("--concurrency must be in 1..1024")
    if not 1 <= args.users <= 100_000:
        parser.error("--users must be in 1..100000")
    if not 0 <= args.redis_down <= 60:
        parser.error("--redis-down must be in 0..60")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.models_dir / args.name
    version = latest_version(root)
    if version is None:
        print(f"soak: no complete bundle in {root}; run `make train` first "
              f"(or pass --models-dir/--name of a model store)", file=sys.stderr)
        return 2
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            print(f"soak: {tool} not found (apt-get install -y redis-server)", file=sys.stderr)
            return 2
    source = root / str(version)
    item_ids = [str(i) for i in json.loads((source / ITEMS).read_text())["item_ids"]]

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    store = tmp / "models"
    shutil.copytree(source, store / args.name / str(version))
    harness = Harness(tmp=tmp, models_dir=store, name=args.name, port=args.port or free_port(),
                      redis_port=args.redis_port or free_port(),
                      api_key=os.environ.get("API_KEY") or None,
                      log_level=args.service_log_level)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    code = 0
    try:
        log(f"temp dir {tmp}; bundle {source}; redis :{harness.redis_port}, "
            f"service :{harness.port}")
        load_start = os.getloadavg()
        harness.start_redis()
        harness.start_service()
        soak = Soak(args, harness, item_ids)
        elapsed = run_async(soak.run())
        log("load over; reading the event stream back")
        if not run_async(wait_redis(harness.redis_url, REDIS_TIMEOUT)):
            raise SystemExit("redis-server not reachable at the end")
        found, entries = read_stream_ids(harness.redis_url, EVENT_STREAM)
        out = report(args, soak, elapsed, found, entries, load_start, source)
        if args.keep:
            out["temp_dir"] = str(tmp)
        text = json.dumps(out)
        print(text, flush=True)
        if args.out:
            args.out.write_text(text + "\n")
        if out["events"]["lost"]:
            log(f"LOST {out['events']['lost']} acknowledged events")
            code = 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; cleaning up")
        code = 130
    finally:
        # Cleanup is bounded (stop_all waits at most 30 s a process): no signal cuts it short.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        harness.stop_all()
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            log(f"kept {tmp} (models/, redis/, *.log)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
