"""Load test of POST /recommend on loopback, plus the bare compute floor. Prints JSON.

Starts a throwaway redis-server and `python -m service` (one worker) on free loopback ports,
records a history for each of --users users through POST /events, then for each concurrency
level sends requests for --seconds (bounded) and reports p50/p99 latency and requests/s. The
floor is the same work called directly in a loop (Redis LRANGE + ONNX encoder + one FAISS
search + merge), so HTTP overhead shows as a ratio.

    python benchmarks/service_load.py --models-dir models --name recommender
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis

from service.bundle import latest_version, load_bundle
from service.models import search_threads
from service.recommender import Recommender
from service.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"service at {url} not ready after {timeout}s")


def summary(latencies: list[float], seconds: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3), "rps": round(len(ms) / seconds, 1)}


async def load(url: str, users: int, k: int, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        stop = time.monotonic() + seconds

        async def worker(seed: int) -> None:
            nonlocal errors
            rng = random.Random(seed)
            while time.monotonic() < stop:
                body = {"user_id": f"user{rng.randrange(users)}", "k": k}
                started = time.perf_counter()
                r = await client.post("/recommend", json=body)
                latencies.append(time.perf_counter() - started)
                errors += r.status_code != 200

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.monotonic() - started
    return {**summary(latencies, elapsed), "errors": errors, "concurrency": concurrency}


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local body = string.format('{"user_id": "user%d", "k": %d}', math.random(0, USERS - 1), K)
  return wrk.format(nil, nil, nil, body)
end
"""


def wrk_load(url: str, users: int, k: int, concurrency: int, seconds: float) -> dict:
    """The same load from wrk (C, one thread): client overhead far below the server's."""
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(f"USERS = {users}\nK = {k}\n" + WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{int(seconds)}s", "--latency", "-s", str(script),
         url + "/recommend"], capture_output=True, text=True, check=True).stdout
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def percentile(p: str) -> float:
        value, unit = re.search(rf"^\s*{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return round(float(value) * scale[unit], 3)

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"client": "wrk", "concurrency": concurrency, "p50_ms": percentile("50"),
            "p99_ms": percentile("99"),
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "errors": int(errors.group(1)) if errors else 0}


def floor(bundle_dir: Path, redis_url: str, users: int, k: int, seconds: float,
          fanout: int) -> dict:
    import faiss

    rec = Recommender(load_bundle(bundle_dir))
    faiss.omp_set_num_threads(search_threads(Settings().faiss_threads, rec))  # as the service
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    rng = random.Random(0)
    latencies = []
    stop = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < stop:
        t0 = time.perf_counter()
        history = client.lrange(f"recsys:history:user{rng.randrange(users)}", 0, -1)
        rec.recommend(history, k, [], fanout)
        latencies.append(time.perf_counter() - t0)
    return summary(latencies, time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--name", default="recommender")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--history", type=int, default=30, help="events per user")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()

    version = latest_version(args.models_dir / args.name)
    if version is None:
        raise SystemExit(f"no bundle in {args.models_dir / args.name}")
    bundle_dir = args.models_dir / args.name / str(version)
    item_ids = load_bundle(bundle_dir, verify=False).item_ids

    redis_port, port = free_port(), free_port()
    tmp = tempfile.mkdtemp()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {**os.environ, "MODELS_DIR": str(args.models_dir), "MODEL_NAME": args.name,
           "REDIS_URL": redis_url, "PORT": str(port), "LOG_LEVEL": "WARNING"}
    service = subprocess.Popen([sys.executable, "-m", "service"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        rng = np.random.default_rng(0)
        for lo in range(0, args.users, 25):
            events = [{"user_id": f"user{u}", "item_id": str(item_ids[i]), "timestamp": t}
                      for u in range(lo, min(lo + 25, args.users))
                      for t, i in enumerate(rng.integers(0, len(item_ids), args.history))]
            httpx.post(url + "/events", json={"events": events}, timeout=60).raise_for_status()
        out = {"bundle": str(bundle_dir), "items": len(item_ids), "users": args.users,
               "history": args.history, "k": args.k, "cpus": os.cpu_count()}
        out["floor"] = floor(bundle_dir, redis_url, args.users, args.k, args.seconds, 50)
        use_wrk = shutil.which("wrk") is not None  # Debian's wrk; else the httpx client
        for c in args.concurrency:
            out[f"http_c{c}"] = (wrk_load if use_wrk else lambda *a: asyncio.run(load(*a)))(
                url, args.users, args.k, c, args.seconds)
        out["http_over_floor_p50"] = round(out["http_c1"]["p50_ms"] / out["floor"]["p50_ms"], 2)
    finally:
        service.terminate()
        redis_proc.terminate()
        service.wait(timeout=30)
        redis_proc.wait(timeout=30)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
