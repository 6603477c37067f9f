"""Load test of POST /recommend on loopback, beside the bare compute floor. Prints JSON.

For each bundle: starts `python -m service` (settings from the flags, e.g. --workers,
--batch-max-size) on a free loopback port with a throwaway redis-server, records a history
for each of --users users through POST /events, measures the floor (the same requests
computed in-process one at a time: Redis LRANGE + ONNX encoder + FAISS search + merge), then
for each concurrency level sends requests for --seconds with wrk (Debian's `wrk`; the httpx
client if it is missing) and reports req/s, p50/p99, errors by kind, HTTP overhead (HTTP p50
/ floor p50, at concurrency 1), the load average at the start and end of each level, and the
service's memory: PSS summed over its processes (/proc/<pid>/smaps_rollup, so pages shared
by workers count once), sampled during each level (peak).

Histories: `<store>/<name>.histories.json` next to the bundle's name directory if it exists
(benchmarks/bundle.py --keep writes held-out users' real histories there), else items drawn
by the bundle's training popularity.

Full-scale (after `python benchmarks/bundle.py --keep /var/tmp/bench-store ...`; each
command about 4 minutes on an idle 2-core machine). The defaults (one worker, batching on,
FAISS threads auto), then two workers, then batching off, then two FAISS threads:

    python benchmarks/service_load.py --bundle /var/tmp/bench-store/movielens-small \
        --bundle /var/tmp/bench-store/synthetic-1m --concurrency 1 16 64 --seconds 15 \
        --out benchmarks/results/service_load.json
    python benchmarks/service_load.py --bundle /var/tmp/bench-store/movielens-small \
        --bundle /var/tmp/bench-store/synthetic-1m --concurrency 1 16 64 --seconds 15 \
        --workers 2 --out benchmarks/results/service_load-workers2.json
    python benchmarks/service_load.py --bundle /var/tmp/bench-store/movielens-small \
        --bundle /var/tmp/bench-store/synthetic-1m --concurrency 1 16 64 --seconds 15 \
        --batch-max-size 1 --out benchmarks/results/service_load-nobatch.json
    python benchmarks/service_load.py --bundle /var/tmp/bench-store/synthetic-1m \
        --concurrency 1 16 64 --seconds 15 --faiss-threads 2 \
        --out benchmarks/results/service_load-faiss2.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from service.bundle.format import latest_version
from service.bundle.load import load_bundle
from service.serving.model_manager import search_threads
from service.serving.recommender import Recommender
from service.store.keys import KeyLayout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"service at {url} not ready after {timeout}s")


def summary(latencies: list[float], seconds: float) -> dict[str, Any]:
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3), "rps": round(len(ms) / seconds, 1)}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- memory -----------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (the supervisor and its uvicorn workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):  # the process exited meanwhile
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def pss_mb(pid: int) -> float:
    """PSS of the process tree in MB: each shared page (mapped bundle, page cache) is split
    between the processes that map it, so the sum counts it once."""
    total_kb = 0
    for p in process_tree(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        total_kb += int(match.group(1)) if match else 0
    return round(total_kb / 1024, 1)


class PssSampler:
    """The peak of pss_mb(pid) while running, sampled every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid, self.every, self.peak = pid, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pss_mb(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, pss_mb(self.pid))


# --- load generators --------------------------------------------------------------------------


async def httpx_load(url: str, users: int, k: int, concurrency: int, seconds: float,
                     filters: list[str] | None = None, extra: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        stop = time.monotonic() + seconds

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop:
                body = {"user_id": f"user{rng.randrange(users)}", "k": k, **(extra or {})}
                if filters:
                    body["filter"] = json.loads(rng.choice(filters))
                started = time.perf_counter()
                try:
                    r = await client.post("/recommend", json=body)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                if r.status_code != 200:
                    errors[f"status_{r.status_code}"] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.monotonic() - started
    return {"client": "httpx", **summary(latencies, elapsed), "errors": sum(errors.values()),
            "errors_by_kind": dict(errors)}


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
request = function()
  local body
  if #FILTERS > 0 then
    body = string.format('{"user_id": "user%d", "k": %d%s, "filter": %s}',
                         math.random(0, USERS - 1), K, EXTRA, FILTERS[math.random(1, #FILTERS)])
  else
    body = string.format('{"user_id": "user%d", "k": %d%s}', math.random(0, USERS - 1), K,
                         EXTRA)
  end
  return wrk.format(nil, nil, nil, body)
end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do
      io.write(string.format("STATUS %d %d\\n", code, n))
    end
  end
end
"""


def lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def wrk_load(url: str, users: int, k: int, concurrency: int, seconds: float,
             filters: list[str] | None = None, extra: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The load from wrk (C, one thread): client overhead far below the server's. `extra`:
    more fields of every request body (e.g. {"rows": 4})."""
    script = Path(tempfile.mkdtemp()) / "post.lua"
    table = ", ".join(lua_string(f) for f in filters or [])
    fields = "".join(f", {json.dumps(key)}: {json.dumps(value)}"
                     for key, value in (extra or {}).items())
    script.write_text(f"USERS = {users}\nK = {k}\nFILTERS = {{{table}}}\n"
                      f"EXTRA = {lua_string(fields)}\n" + WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
         "--latency", "-s", str(script), url + "/recommend"],
        capture_output=True, text=True, check=True).stdout
    shutil.rmtree(script.parent, ignore_errors=True)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def percentile(p: str) -> float:
        value, unit = re.search(rf"^\s*{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return round(float(value) * scale[unit], 3)

    errors: dict[str, int] = {}
    for code, n in re.findall(r"^STATUS (\d+) (\d+)$", out, re.M):
        if code != "200":
            errors[f"status_{code}"] = errors.get(f"status_{code}", 0) + int(n)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        for kind, n in zip(("connect", "read", "write", "timeout"), socket_errors.groups(),
                           strict=True):
            if int(n):
                errors[f"socket_{kind}"] = int(n)
    return {"client": "wrk", "p50_ms": percentile("50"), "p99_ms": percentile("99"),
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "errors": sum(errors.values()), "errors_by_kind": errors}


# --- the floor --------------------------------------------------------------------------------


def floor(bundle_dir: Path, redis_url: str, users: int, k: int, seconds: float, fanout: int,
          faiss_setting: int, onnx_threads: int, layout: KeyLayout, workers: int
          ) -> dict[str, Any]:
    """The same requests computed in this process one at a time: Redis LRANGE, ONNX encoder,
    FAISS search and merge, with one service worker's thread settings."""
    import faiss

    rec = Recommender(load_bundle(bundle_dir, threads=onnx_threads))
    threads = search_threads(faiss_setting, rec, workers)
    faiss.omp_set_num_threads(threads)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    rng = random.Random(0)
    for _ in range(50):  # warm-up: first searches fault the mapped index in
        rec.recommend(client.lrange(layout.history_key(f"user{rng.randrange(users)}"), 0, -1),
                      k, [], fanout)
    latencies = []
    stop = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < stop:
        t0 = time.perf_counter()
        history = client.lrange(layout.history_key(f"user{rng.randrange(users)}"), 0, -1)
        rec.recommend(history, k, [], fanout)
        latencies.append(time.perf_counter() - t0)
    return {**summary(latencies, time.monotonic() - started), "faiss_threads": threads,
            "index": rec.bundle.manifest.index.factory,
            "search_params": rec.bundle.manifest.index.search_params}


# --- one bundle -------------------------------------------------------------------------------


def category_filters(bundle_dir: Path, share: float, count: int = 16, seed: int = 0
                     ) -> tuple[list[str], float]:
    """`count` filters (JSON) that each include a random set of categories holding about
    `share` of the items (categories added until their union reaches it), and the mean share
    they allow."""
    bundle = load_bundle(bundle_dir, verify=False)
    postings = bundle.fields.get("category") or {}
    if not postings:
        raise SystemExit(f"{bundle_dir}: its items carry no categories to filter by")
    names = sorted(postings)
    n = len(bundle.item_ids)
    rng = random.Random(seed)
    filters, shares = [], []
    for _ in range(count):
        rng.shuffle(names)
        chosen: list[str] = []
        allowed = np.zeros(n, dtype=bool)
        for name in names:
            if chosen and allowed.mean() >= share:
                break
            chosen.append(name)
            allowed[postings[name]] = True
        filters.append(json.dumps({"include": {"category": chosen}}))
        shares.append(float(allowed.mean()))
    return filters, round(float(np.mean(shares)), 5)


def histories_for(name_dir: Path, bundle_dir: Path, users: int, length: int,
                  seed: int = 0) -> tuple[list[list[str]], str]:
    """Real held-out histories saved beside the store (benchmarks/bundle.py), else items drawn
    by training popularity."""
    saved = name_dir.parent / f"{name_dir.name}.histories.json"
    if saved.is_file():
        rows = [h[-length:] for h in json.loads(saved.read_text()) if h]
        if rows:
            return [rows[u % len(rows)] for u in range(users)], str(saved)
    bundle = load_bundle(bundle_dir, verify=False)
    weights = np.asarray(bundle.popularity, dtype=np.float64) + 1.0
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(weights), size=(users, length), p=weights / weights.sum())
    return [[str(bundle.item_ids[i]) for i in row] for row in picks], "popularity"


def resolve(path: Path) -> tuple[Path, Path]:
    """(name directory, newest version directory) of `path`: a bundle name directory, or a
    version directory (which must be the newest: the service serves the newest)."""
    if (path / "manifest.json").is_file():
        name_dir = path.parent
        if latest_version(name_dir) != int(path.name):
            raise SystemExit(f"{path} is not the newest version of {name_dir}; the service "
                             f"would serve another: pass the name directory")
        return name_dir, path
    version = latest_version(path)
    if version is None:
        raise SystemExit(f"no bundle in {path}")
    return path, path / str(version)


def run_bundle(path: Path, args: argparse.Namespace, redis_url: str,
               service_env: dict[str, str]) -> dict[str, Any]:
    name_dir, bundle_dir = resolve(path)
    redis.Redis.from_url(redis_url).flushall()
    port = free_port()
    env = {**os.environ, **service_env, "MODELS_DIR": str(name_dir.parent),
           "MODEL_NAME": name_dir.name, "REDIS_URL": redis_url, "PORT": str(port),
           "LOG_LEVEL": "WARNING"}
    url = f"http://127.0.0.1:{port}"
    service = subprocess.Popen([sys.executable, "-m", "service"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {"bundle": str(bundle_dir), "service_env": service_env}
    try:
        started = time.perf_counter()
        wait_ready(url, service)
        out["ready_seconds"] = round(time.perf_counter() - started, 1)
        histories, source = histories_for(name_dir, bundle_dir, args.users, args.history)
        out.update(items=load_bundle(bundle_dir, verify=False).manifest.item_count,
                   users=args.users, history=args.history, history_source=source, k=args.k)
        for lo in range(0, args.users, 25):
            events = [{"user_id": f"user{u}", "item_id": item, "timestamp": 1_700_000_000 + t}
                      for u in range(lo, min(lo + 25, args.users))
                      for t, item in enumerate(histories[u])]
            httpx.post(url + "/events", json={"events": events}, timeout=60).raise_for_status()
        out["pss_mb_ready"] = pss_mb(service.pid)
        # The floor runs while the service idles, with the service's thread settings, in a
        # fresh process (as a service worker is): no FAISS/OpenMP state from another bundle.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            out["floor"] = pool.submit(
                floor, bundle_dir, redis_url, args.users, args.k, args.floor_seconds,
                args.fanout, int(service_env.get("FAISS_THREADS", 0)),
                int(service_env.get("ONNX_THREADS", 1)),
                KeyLayout(shards=int(service_env.get("EVENT_STREAM_SHARDS", 1))),
                int(service_env.get("WORKERS", 1))).result()
        use_wrk = shutil.which("wrk") is not None and not args.httpx
        generate = wrk_load if use_wrk else (lambda *a: asyncio.run(httpx_load(*a)))
        filter_sets = {share: category_filters(bundle_dir, share)
                       for share in args.filter_share}
        generate(url, args.users, args.k, 1, args.warmup_seconds)  # fault the mapped files in
        peak = 0.0
        for c in args.concurrency:
            load_start = loadavg()
            with PssSampler(service.pid) as pss:
                level = generate(url, args.users, args.k, c, args.seconds)
            peak = max(peak, pss.peak)
            # HTTP p50 over the floor's p50: the serving overhead at c=1; above it, queueing
            # (and the batching that shares the compute) is in it too.
            out[f"http_c{c}"] = {"concurrency": c, **level, "loadavg_start": load_start,
                                 "loadavg_end": loadavg(), "pss_mb_peak": pss.peak,
                                 "p50_over_floor_p50": round(
                                     level["p50_ms"] / out["floor"]["p50_ms"], 2)}
            print(f"{bundle_dir} c={c}: {level['rps']} req/s, p50 {level['p50_ms']} ms, "
                  f"p99 {level['p99_ms']} ms, errors {level['errors_by_kind'] or 0}, "
                  f"load {load_start[0]} -> {loadavg()[0]}", file=sys.stderr)
            # The same level with interest rows in every answer, right after the list alone
            # (their ratio is what --rows measures).
            for rows in args.rows:
                load_start = loadavg()
                with PssSampler(service.pid) as pss:
                    level = generate(url, args.users, args.k, c, args.seconds, None,
                                     {"rows": rows})
                peak = max(peak, pss.peak)
                out[f"http_c{c}_rows{rows}"] = {
                    "concurrency": c, "rows": rows, **level, "loadavg_start": load_start,
                    "loadavg_end": loadavg(), "pss_mb_peak": pss.peak,
                    "p50_over_floor_p50": round(level["p50_ms"] / out["floor"]["p50_ms"], 2),
                    "p50_over_list_p50": round(level["p50_ms"] / out[f"http_c{c}"]["p50_ms"],
                                               2)}
                print(f"{bundle_dir} c={c} rows {rows}: {level['rps']} req/s, p50 "
                      f"{level['p50_ms']} ms (x{out[f'http_c{c}_rows{rows}']['p50_over_list_p50']}"
                      f" the list alone), p99 {level['p99_ms']} ms, errors "
                      f"{level['errors_by_kind'] or 0}", file=sys.stderr)
            # The same level with a category filter per request, right after the unfiltered
            # one (their ratio is what --filter-share measures).
            for share, (filters, allowed) in filter_sets.items():
                load_start = loadavg()
                with PssSampler(service.pid) as pss:
                    level = generate(url, args.users, args.k, c, args.seconds, filters)
                peak = max(peak, pss.peak)
                out[f"http_c{c}_filter{share:g}"] = {
                    "concurrency": c, "filter_share": share, "allowed_share": allowed,
                    **level, "loadavg_start": load_start, "loadavg_end": loadavg(),
                    "pss_mb_peak": pss.peak,
                    "p50_over_floor_p50": round(level["p50_ms"] / out["floor"]["p50_ms"], 2),
                    "p50_over_unfiltered_p50": round(
                        level["p50_ms"] / out[f"http_c{c}"]["p50_ms"], 2)}
                print(f"{bundle_dir} c={c} filter {share:g} (allows {allowed:.3%}): "
                      f"{level['rps']} req/s, p50 {level['p50_ms']} ms, p99 {level['p99_ms']} "
                      f"ms, errors {level['errors_by_kind'] or 0}", file=sys.stderr)
        out["pss_mb_peak"] = peak
        if "http_c1" in out:
            out["http_overhead_c1_p50"] = round(
                out["http_c1"]["p50_ms"] / out["floor"]["p50_ms"], 2)
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
    return out


def print_table(result: dict[str, Any]) -> None:
    f = result["floor"]
    print(f"\n{result['bundle']} ({result['items']:,} items, {f['index']} {f['search_params']}, "
          f"FAISS threads {f['faiss_threads']}): floor p50 {f['p50_ms']} ms, p99 "
          f"{f['p99_ms']} ms; PSS ready {result['pss_mb_ready']} MB, peak "
          f"{result['pss_mb_peak']} MB", file=sys.stderr)
    print("   c  filter      req/s    p50 ms    p99 ms  p50/floor  errors  load avg (1 min) "
          "start-end", file=sys.stderr)
    for key, level in result.items():
        if key.startswith("http_c") and isinstance(level, dict):
            share = (f"{level['filter_share']:g}" if "filter_share" in level
                     else f"rows {level['rows']}" if "rows" in level else "-")
            print(f"{level['concurrency']:4d} {share:>7} {level['rps']:10.1f} "
                  f"{level['p50_ms']:9.2f} "
                  f"{level['p99_ms']:9.2f} {level['p50_over_floor_p50']:10.2f} "
                  f"{level['errors']:7d}  {level['loadavg_start'][0]:.2f}-"
                  f"{level['loadavg_end'][0]:.2f}", file=sys.stderr)


def markdown(out: dict[str, Any]) -> str:
    """The run as markdown tables, one per bundle (what --out writes beside the JSON)."""
    lines = [f"`{' '.join(out.get('argv', [])) or 'benchmarks/service_load.py'}`; client "
             f"{out['client']}, {out['cpus']} CPUs, service settings {out['service_env']}"]
    for result in out["bundles"]:
        f = result["floor"]
        lines += ["", f"**{result['bundle']}** ({result['items']:,} items, {f['index']} "
                  f"{f['search_params']}, FAISS threads {f['faiss_threads']}): floor p50 "
                  f"{f['p50_ms']} ms ({f['rps']:,.0f} requests/s on one thread); PSS ready "
                  f"{result['pss_mb_ready']} MB, peak {result['pss_mb_peak']} MB", "",
                  "| c | filter (allows) or rows | req/s (x floor rate) | p50 ms (x floor) | "
                  "p99 ms | p50 / list alone | errors | load avg (1 min) |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, level in result.items():
            if not (key.startswith("http_c") and isinstance(level, dict)):
                continue
            share = (f"{level['filter_share']:g} ({level['allowed_share']:.2%})"
                     if "filter_share" in level else f"rows {level['rows']}" if "rows" in level
                     else "-")
            lines.append(
                f"| {level['concurrency']} | {share} | {level['rps']:,.0f} "
                f"({level['rps'] / f['rps']:.2f}x) | {level['p50_ms']} "
                f"({level['p50_over_floor_p50']}x) | {level['p99_ms']} | "
                f"{level.get('p50_over_unfiltered_p50', level.get('p50_over_list_p50', '-'))} | "
                f"{level['errors']} | "
                f"{level['loadavg_start'][0]}-{level['loadavg_end'][0]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, action="append",
                        help="a bundle's name directory (models/NAME) or its newest version; "
                             "repeat for several (default: --models-dir/--name)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--name", default="recommender")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--history", type=int, default=30, help="events per user")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--fanout", type=int, default=50, help="PER_INTEREST_FANOUT (floor)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--floor-seconds", type=float, default=10.0)
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--workers", type=int, help="WORKERS of the service")
    parser.add_argument("--batch-max-size", type=int, help="BATCH_MAX_SIZE")
    parser.add_argument("--batch-window-ms", type=float, help="BATCH_WINDOW_MS")
    parser.add_argument("--faiss-threads", type=int, help="FAISS_THREADS")
    parser.add_argument("--onnx-threads", type=int, help="ONNX_THREADS")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="any other service setting")
    parser.add_argument("--filter-share", type=float, nargs="*", default=[],
                        help="also run each level with a category filter allowing about this "
                             "share of the items (e.g. 0.1 0.01)")
    parser.add_argument("--rows", type=int, nargs="*", default=[],
                        help="also run each level with `rows: N` in every request (interest "
                             "rows beside the list), e.g. --rows 4")
    parser.add_argument("--httpx", action="store_true", help="use the httpx client, not wrk")
    parser.add_argument("--out", type=Path, help="also write the JSON here (and its tables "
                                                 "as markdown beside it, .md)")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="print the tables of a saved run's JSON and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())), end="")
        return

    service_env = {key: str(value) for key, value in (
        ("WORKERS", args.workers), ("BATCH_MAX_SIZE", args.batch_max_size),
        ("BATCH_WINDOW_MS", args.batch_window_ms), ("FAISS_THREADS", args.faiss_threads),
        ("ONNX_THREADS", args.onnx_threads)) if value is not None}
    for item in args.env:
        key, _, value = item.partition("=")
        service_env[key] = value
    bundles = args.bundle or [args.models_dir / args.name]

    redis_port = free_port()
    tmp = tempfile.mkdtemp()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    out: dict[str, Any] = {"cpus": os.cpu_count(), "loadavg_start": loadavg(),
                           "client": "httpx" if args.httpx or not shutil.which("wrk") else
                           "wrk", "concurrency": args.concurrency, "seconds": args.seconds,
                           "service_env": service_env, "argv": sys.argv[1:], "bundles": []}
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(redis_url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        for path in bundles:
            out["bundles"].append(run_bundle(path, args, redis_url, service_env))
            print_table(out["bundles"][-1])
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    out["loadavg_end"] = loadavg()
    text = json.dumps(out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(out))
    print(text)


if __name__ == "__main__":
    main()
