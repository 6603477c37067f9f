"""Several worker processes (`WORKERS`): a real `python -m service` on loopback with a real
throwaway Redis; bundle memory shared through memory maps; hot reload and metrics per worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import httpx
import numpy as np

from service.bundle import mmap as mapping
from service.bundle.format import (
    ENCODER,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    INDEX,
    ITEM_EMBEDDINGS,
    ITEMS,
    POPULARITY,
    publish,
    write_items,
)
from service.bundle.load import load_bundle
from tests.helpers import metric
from tests.service.conftest import free_port, publish_copy

REPO = Path(__file__).resolve().parents[2]


# --- a real server --------------------------------------------------------------------------


class Server:
    def __init__(self, process: subprocess.Popen[bytes], base: str, log: Path) -> None:
        self.process, self.base, self.log = process, base, log
        self.workers: set[int] = set()  # pids of the worker processes (from /readyz)

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        """One request on a new connection: the kernel hands each connection to a worker, so
        requests spread over workers only across connections."""
        with httpx.Client(base_url=self.base, timeout=10) as client:
            return client.get(path, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, json: object) -> httpx.Response:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            return client.post(path, json=json)

    def pids(self) -> list[int]:
        """The supervisor and every process under it."""
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
        return found

    def ready_workers(self, workers: int, version: int | None = None,
                      timeout: float = 30) -> set[int]:
        """Poll /readyz on new connections until `workers` distinct processes said ready
        (serving `version`, if given); their pids."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < workers:
            tail = self.log.read_text()[-3000:]
            assert self.process.poll() is None, f"server exited: {tail}"
            assert time.monotonic() < deadline, f"ready: {seen}; log: {tail}"
            with contextlib.suppress(httpx.HTTPError):
                body = self.get("/readyz").json()
                if body.get("ready") and (version is None or body["model_version"] == version):
                    seen.add(body["pid"])
                    continue
            time.sleep(0.05)
        return seen


def service_env(models_dir: Path, port: int, **settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PROMETHEUS_MULTIPROC_DIR", "REDIS_URL", "API_KEY", "ADMIN_API_KEY",
                        "ALLOW_OPEN_ADMIN")}
    env.update({"MODELS_DIR": str(models_dir), "MODEL_NAME": "tiny", "HOST": "127.0.0.1",
                "PORT": str(port), "LOG_LEVEL": "WARNING", "RELOAD_INTERVAL_SECONDS": "0.2"})
    env.update({k.upper(): str(v) for k, v in settings.items()})
    return env


@contextlib.contextmanager
def serve(models_dir: Path, log: Path, workers: int, **settings: object) -> Iterator[Server]:
    """`python -m service` with WORKERS=workers; stopped (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env=service_env(models_dir, port, workers=workers, **settings),
            start_new_session=True)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        server.workers = server.ready_workers(workers)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)  # uvicorn's supervisor stops its workers
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group of the server started here
            process.wait(timeout=5)




# --- settings ---------------------------------------------------------------------------------


def test_workers_without_redis_refuse_to_start(models_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, capture_output=True,
                          text=True, timeout=60,
                          env=service_env(models_dir, free_port(), workers=2))
    assert done.returncode == 2
    assert "WORKERS=2 needs REDIS_URL" in done.stderr
    assert "Traceback" not in done.stderr


# --- memory maps ------------------------------------------------------------------------------


def test_bundle_files_are_memory_mapped_and_answer_the_same(tiny_bundle, monkeypatch):
    plain = load_bundle(tiny_bundle, mmap=False)
    monkeypatch.setattr(mapping, "MMAP_MIN_BYTES", 0)  # the tiny item table is a few KB
    mapped = load_bundle(tiny_bundle, mmap=True)
    assert plain.mapped == ()
    assert "index" in mapped.mapped and ITEM_EMBEDDINGS in mapped.mapped
    tables = [m for m in mapped.mapped if m.startswith("encoder:")]
    assert len(tables) == 1, mapped.mapped  # the item embedding table, nothing else
    assert isinstance(mapped.item_vectors, np.memmap)
    m = plain.manifest
    rows = np.random.default_rng(0).integers(0, m.item_count + 1, (16, m.maxlen))
    np.testing.assert_array_equal(mapped.encode(rows), plain.encode(rows))
    queries = plain.encode(rows).reshape(-1, m.dim)
    for got, want in zip(mapped.search(queries, 20), plain.search(queries, 20), strict=True):
        np.testing.assert_array_equal(got, want)


def write_large_bundle(models_dir: Path, items: int, dim: int, interests: int = 4,
                       maxlen: int = 20) -> Path:
    """A bundle as the trainer lays one out (an encoder whose item table is items x dim, a flat
    index, the .npy arrays, the id map), published with service.bundle.format.publish."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((items, dim), dtype=np.float32)

    def write_files(staging: Path) -> None:
        # Encoder: look the ids up in an (items + 1) x dim table (row 0 = padding), keep the
        # last `interests` positions as the interest vectors.
        table = np.vstack([np.zeros((1, dim), np.float32), vectors])
        graph = helper.make_graph(
            [helper.make_node("Gather", ["item_table", ENCODER_INPUT], ["looked_up"]),
             helper.make_node("Slice", ["looked_up", "starts", "ends", "axes"],
                              [ENCODER_OUTPUT])],
            "encoder",
            [helper.make_tensor_value_info(ENCODER_INPUT, TensorProto.INT64,
                                           ["batch", maxlen])],
            [helper.make_tensor_value_info(ENCODER_OUTPUT, TensorProto.FLOAT,
                                           ["batch", interests, dim])],
            [numpy_helper.from_array(table, "item_table"),
             numpy_helper.from_array(np.array([maxlen - interests]), "starts"),
             numpy_helper.from_array(np.array([maxlen]), "ends"),
             numpy_helper.from_array(np.array([1]), "axes")])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  str(staging / ENCODER))
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        faiss.write_index(index, str(staging / INDEX))
        np.save(staging / ITEM_EMBEDDINGS, vectors)
        np.save(staging / POPULARITY, rng.integers(0, 1000, items))
        write_items(staging / ITEMS, [f"sku-{i}" for i in range(items)],
                        [f"item {i}" for i in range(items)])

    manifest = {"git_commit": None, "dataset": {"name": "synthetic-large"}, "data_spec": {},
                "config": {}, "backbone": "lookup", "interests": interests, "dim": dim,
                "maxlen": maxlen, "item_count": items, "metrics": {},
                "index": {"kind": "flat", "factory": "Flat", "recall_at_50": 1.0,
                          "build_seconds": 0.0}}
    return publish(models_dir, "tiny", write_files, manifest)


def memory_kb(pid: int) -> dict[str, int]:
    """Rss, Pss, Anonymous, ... (kB) of a process, from /proc/<pid>/smaps_rollup. Pss counts
    each shared page divided by the processes that map it, so Pss sums to the real total."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        out[key.rstrip(":")] = int(value)
    return out


def test_second_worker_shares_the_bundle(tmp_path, redis_url):
    """Pss of WORKERS=1 (one process) vs WORKERS=2 (supervisor, spawn's resource tracker, two
    workers) on one bundle with 200k items. Without the maps a second worker would add another
    copy of the index and of the encoder's item table (205 MB each)."""
    items, dim = 200_000, 256  # index, encoder item table and item vectors: 205 MB each
    models = tmp_path / "models"
    write_large_bundle(models, items, dim)
    history = [f"sku-{i}" for i in range(0, items, items // 10)]
    pss: dict[int, dict[str, int]] = {}
    for workers in (1, 2):
        with serve(models, tmp_path / f"w{workers}.log", workers, redis_url=redis_url) as server:
            for _ in range(20):  # each worker has searched the whole index (its smoke test)
                assert server.post("/recommend", {"user_id": "m", "history": history}
                                   ).status_code == 200
            usage = {pid: memory_kb(pid) for pid in server.pids()}
            pss[workers] = {
                "workers": sum(usage[p]["Pss"] for p in server.workers),
                "others": sum(u["Pss"] for p, u in usage.items() if p not in server.workers)}
        print(f"\nWORKERS={workers} MB (Rss, Pss, Anonymous) by pid:",
              {("worker" if p in server.workers else "other", p):
               (u["Rss"] // 1024, u["Pss"] // 1024, u["Anonymous"] // 1024)
               for p, u in usage.items()})
    first = pss[1]["workers"]
    added = pss[2]["workers"] - first  # what the second worker process costs
    overhead = pss[2]["others"]  # once for any WORKERS > 1: the supervisor, the tracker
    print(f"first worker {first // 1024} MB Pss; second adds {added // 1024} MB "
          f"({added / first:.2f}x) plus {overhead // 1024} MB for the supervisor")
    assert added < 0.4 * first, f"second worker added {added // 1024} MB of Pss to " \
                                f"{first // 1024} MB"
    assert overhead < 0.15 * first


# --- hot reload and metrics across workers -----------------------------------------------------


def test_each_worker_swaps_to_a_new_version(models_dir, redis_url, tmp_path):
    with serve(models_dir, tmp_path / "server.log", 2, redis_url=redis_url) as server:
        assert len(server.workers) == 2
        for pid in server.workers:  # one BLAS thread each (service/__main__.py)
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert b"OPENBLAS_NUM_THREADS=1" in environ
        probe = server.post("/recommend", {"user_id": "p", "k": 3}).json()
        assert probe["model_version"] == 1
        history = [i["item_id"] for i in probe["items"]]
        publish_copy(models_dir, models_dir / "tiny" / "1")
        published = time.monotonic()
        # Both workers report version 2 within the reload interval (0.2 s) plus load time.
        assert server.ready_workers(2, version=2, timeout=10) == server.workers
        swapped = time.monotonic() - published
        answers = [server.post("/recommend", {"user_id": f"u{n}", "k": 5, "history": history})
                   for n in range(30)]
        ready = [server.get("/readyz").json() for _ in range(30)]
    assert {a.status_code for a in answers} == {200}
    assert {a.json()["model_version"] for a in answers} == {2}
    assert {r["model_version"] for r in ready} == {2}
    assert swapped < 5, f"workers took {swapped:.1f} s to swap"


def test_metrics_add_up_over_workers(models_dir, redis_url, tmp_path):
    with serve(models_dir, tmp_path / "server.log", 2, redis_url=redis_url) as server:
        before = server.get("/metrics").text
        pids: list[int] = []  # until both workers answered, at least 40 requests
        while len(pids) < 40 or set(pids) != server.workers:
            assert len(pids) < 2000, f"one worker answered everything: {set(pids)}"
            pids.append(server.get("/healthz").json()["pid"])
        n = len(pids)
        for i in range(n):
            assert server.post("/recommend", {"user_id": f"u{i}", "history": ["1"]}
                               ).status_code == 200
        after = server.get("/metrics").text
        workers = server.workers
    assert set(pids) == workers

    def grown(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grown("recsys_request_seconds_count", route="/healthz") == n
    assert grown("recsys_request_seconds_count", route="/recommend") == n
    assert grown("recsys_recommendations_total") == n
    # Each worker's own model version, one series per live worker.
    versions = {pid: metric(after, "recsys_model_version", pid=str(pid)) for pid in workers}
    assert versions == {pid: 1.0 for pid in workers}
    assert metric(after, "recsys_reloads_total", result="success") == 2  # one load per worker


def test_granian_serves_the_same_app_with_two_workers(models_dir, redis_url, tmp_path):
    # SERVER=granian: the same app behind granian's workers; /metrics still sums them.
    with serve(models_dir, tmp_path / "server.log", 2, redis_url=redis_url,
               server="granian") as server:
        assert len(server.workers) == 2
        pids = {server.get("/healthz").json()["pid"] for _ in range(200)}
        answers = [server.post("/recommend", {"user_id": f"u{i}", "history": ["1"], "k": 4})
                   for i in range(20)]
        bad = server.post("/recommend", {"user_id": "u", "k": "four"})
        after = server.get("/metrics").text
        process = server.process
    assert pids == server.workers
    assert {a.status_code for a in answers} == {200}
    assert all(len(a.json()["items"]) == 4 for a in answers)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "k"]
    assert metric(after, "recsys_recommendations_total") == 20
    assert process.returncode == 0  # SIGTERM: a clean stop of both workers


def test_workers_stop_cleanly_right_after_concurrent_load(models_dir, redis_url, tmp_path):
    # SIGTERM just after concurrent requests were dropped mid-flight: every worker finishes
    # its shutdown (an orphaned worker keeps the port's other half and Redis connections).
    import asyncio

    async def burst(base: str, seconds: float) -> int:
        """Concurrent requests on 16 connections, dropped mid-flight after `seconds` (as a
        load generator stops): how many were answered 200."""
        answered = 0
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            async def loop(worker: int) -> None:
                nonlocal answered
                for i in range(10**6):
                    r = await client.post("/recommend",
                                          json={"user_id": f"u{worker}-{i % 20}", "k": 5})
                    answered += r.status_code == 200

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(loop(w) for w in range(16))), seconds)
        return answered

    for _ in range(2):
        with serve(models_dir, tmp_path / "server.log", 2, redis_url=redis_url) as server:
            answered = asyncio.run(burst(server.base, 1.5))
            process = server.process
        assert answered > 0
        assert process.returncode == 0, (tmp_path / "server.log").read_text()[-2000:]


def test_auto_faiss_threads_split_the_cores_between_workers(monkeypatch):
    from types import SimpleNamespace

    from service.serving.model_manager import search_threads

    def served(kind: str) -> SimpleNamespace:
        index = SimpleNamespace(kind=kind)
        return SimpleNamespace(bundle=SimpleNamespace(manifest=SimpleNamespace(index=index)))

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    kinds = ("flat", "hnsw", "ivf", "ivfpq")
    assert [search_threads(0, served(kind)) for kind in kinds] == [1, 8, 8, 8]
    assert [search_threads(0, served(kind), workers=3) for kind in kinds] == [1, 2, 2, 2]
    assert search_threads(0, served("hnsw"), workers=16) == 1
    assert search_threads(3, served("flat"), workers=2) == 3  # a setting wins


def test_an_unavailable_item_leaves_both_workers_of_two_replicas(models_dir, redis_url,
                                                                 tmp_path):
    """Two replicas of two workers each on one Redis: marked through one worker, the item is
    gone from every worker's answers after the poll interval, and back when available."""
    with serve(models_dir, tmp_path / "a.log", 2, redis_url=redis_url) as first, \
            serve(models_dir, tmp_path / "b.log", 2, redis_url=redis_url) as second:
        probe = first.post("/recommend", {"user_id": "p", "k": 4}).json()
        history = [i["item_id"] for i in probe["items"]]
        request = {"user_id": "u", "k": 5, "history": history, "use_stored_history": False}
        top = first.post("/recommend", request).json()["items"][0]["item_id"]

        def answers(server: Server, rounds: int = 12) -> list[list[str]]:
            return [[i["item_id"] for i in server.post("/recommend", request).json()["items"]]
                    for _ in range(rounds)]  # new connections: both workers answer

        assert all(top in ids for ids in answers(first) + answers(second))
        assert first.post("/items/availability", {"unavailable": [top]}).status_code == 200
        time.sleep(0.2)  # AVAILABILITY_REFRESH_SECONDS is 0.05
        assert not any(top in ids for ids in answers(first) + answers(second))
        views = [metric(s.get("/metrics").text, "recsys_availability_version", pid=str(pid))
                 for s in (first, second) for pid in s.workers]
        assert views == [1.0] * 4  # every worker of both replicas has the change
        assert second.post("/items/availability", {"available": [top]}).status_code == 200
        time.sleep(0.2)
        assert all(top in ids for ids in answers(first) + answers(second))
