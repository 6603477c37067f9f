"""How fast "never this item again" reaches every worker of every replica (docs/architecture.md,
"Availability").

Starts a throwaway redis-server and --replicas copies of `python -m service` (WORKERS=--workers
each) on one bundle, then --rounds times: marks an item unavailable through replica 0 and
measures, from the moment that POST answered, how long until every worker of every replica
serves with the new version (each worker's `recsys_availability_version` gauge, read from each
replica's /metrics, as a worker sets it when it adopts the change), and until answers taken on
new connections of every replica no longer hold the item; then makes it available again.

    python benchmarks/availability.py --models-dir models --name recommender \\
        --out benchmarks/results/availability.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_load import free_port, loadavg, wait_ready  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def worker_versions(base: str) -> dict[str, float]:
    """pid -> recsys_availability_version of each live worker of one replica."""
    text = httpx.get(base + "/metrics", timeout=5).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^recsys_availability_version\{pid="(\d+)"\} (\S+)$', text, re.M)}


def item_served(base: str, request: dict[str, Any], item: str, tries: int) -> bool:
    """Whether any of `tries` answers (new connections: the workers take turns) holds it."""
    for _ in range(tries):
        body = httpx.post(base + "/recommend", json=request, timeout=5).json()
        if item in {i["item_id"] for i in body["items"]}:
            return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--name", default="recommender")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp()
    redis_port = free_port()
    procs: list[subprocess.Popen] = [subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)]
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    bases = []
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError):
                redis.Redis.from_url(redis_url).ping()
                break
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.1)
        for _ in range(args.replicas):
            port = free_port()
            env = {**os.environ, "MODELS_DIR": str(args.models_dir), "MODEL_NAME": args.name,
                   "REDIS_URL": redis_url, "PORT": str(port), "HOST": "127.0.0.1",
                   "WORKERS": str(args.workers), "LOG_LEVEL": "WARNING"}
            procs.append(subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
            bases.append(f"http://127.0.0.1:{port}")
            wait_ready(bases[-1], procs[-1])
        popular = httpx.post(bases[0] + "/recommend", json={"user_id": "probe", "k": 6}).json()
        request = {"user_id": "bench", "k": 20, "use_stored_history": False,
                   "history": [i["item_id"] for i in popular["items"]]}
        top = [i["item_id"] for i in
               httpx.post(bases[0] + "/recommend", json=request).json()["items"]]
        load_start = loadavg()
        to_workers, to_answers = [], []
        for n in range(args.rounds):
            item = top[n % len(top)]
            body = httpx.post(bases[0] + "/items/availability",
                              json={"unavailable": [item]}, timeout=5).json()
            answered = time.perf_counter()
            version = body["version"]
            # Each time is when the first sweep that found the change everywhere *started*
            # (an upper bound on when it was in effect, without the sweep's own duration).
            while True:  # every worker of every replica at the new version
                swept = time.perf_counter()
                views = [v for base in bases for v in worker_versions(base).values()]
                if len(views) == args.replicas * args.workers and min(views) >= version:
                    break
                if swept - answered > 10:
                    raise SystemExit(f"workers still at {views} after 10 s (round {n})")
            to_workers.append(swept - answered)
            while True:  # and answers on new connections of every replica lack the item
                swept = time.perf_counter()
                if not any(item_served(base, request, item, 2 * args.workers)
                           for base in bases):
                    break
                if swept - answered > 10:
                    raise SystemExit(f"{item} still served after 10 s (round {n})")
            to_answers.append(swept - answered)
            httpx.post(bases[0] + "/items/availability", json={"available": [item]}, timeout=5)
        ms = {"to_every_worker": np.array(to_workers) * 1000,
              "to_every_answer": np.array(to_answers) * 1000}
        result = {"replicas": args.replicas, "workers": args.workers, "rounds": args.rounds,
                  "refresh_seconds": 0.05,
                  **{name: {"p50_ms": round(float(np.percentile(v, 50)), 1),
                            "p99_ms": round(float(np.percentile(v, 99)), 1),
                            "max_ms": round(float(v.max()), 1)} for name, v in ms.items()},
                  "load_average": {"start": load_start, "end": loadavg()}}
    finally:
        for proc in procs[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
        for proc in procs[1:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        procs[0].terminate()
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
