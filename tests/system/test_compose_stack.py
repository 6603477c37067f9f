"""`docker compose up` for real, when a Docker engine with Compose v2 is available (skipped with
the reason otherwise): the one-shot trainer completes, every container writes what it writes as
its own user, the api becomes ready and answers, a nightly cycle runs, and `docker compose stop`
is clean (no SIGKILL after the grace period).

Slow (image builds, a first training capped at 4 minutes): about 10 minutes with warm build
caches. Where Docker Hub or the PyTorch index cannot be reached, build stand-in base images
first (`../shared/tools/compose-check.sh` does) and point COMPOSE_TEST_TORCH_INDEX_URL at a
loopback index holding the CPU torch wheel; the build then runs on the host network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.service.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PROJECT = f"eimf-test-{os.getpid()}"


BASE_IMAGES = ("python:3.11-slim", "redis:7-alpine")
DEFAULT_TORCH_INDEX = "https://download.pytorch.org/whl/cpu/"


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False
    return True


def cannot_run() -> str | None:
    """Why the stack cannot be built and run here, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI on this machine"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "no running Docker engine (docker info failed)"
    if subprocess.run(["docker", "compose", "version"], capture_output=True,
                      timeout=30).returncode != 0:
        return "no Compose v2 (`docker compose`) plugin"
    missing = [image for image in BASE_IMAGES if subprocess.run(
        ["docker", "image", "inspect", image], capture_output=True, timeout=30).returncode]
    if missing and not reachable("https://registry-1.docker.io/v2/"):
        return f"base images {missing} are not local and Docker Hub is unreachable"
    index = os.environ.get("COMPOSE_TEST_TORCH_INDEX_URL")
    if not reachable(index or DEFAULT_TORCH_INDEX):
        return (f"the torch index {index or DEFAULT_TORCH_INDEX} is unreachable "
                "(set COMPOSE_TEST_TORCH_INDEX_URL to a reachable one)")
    return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = cannot_run()
    if reason:
        print(f"skipping the compose stack test: {reason}")
        pytest.skip(reason)
    files = ["-f", str(ROOT / "docker-compose.yml")]
    index = os.environ.get("COMPOSE_TEST_TORCH_INDEX_URL")
    if index:
        override = tmp_path_factory.mktemp("compose") / "override.yml"
        build = {"network": "host", "args": {"TORCH_INDEX_URL": index}}
        override.write_text(json.dumps(
            {"services": {"trainer": {"build": build}, "nightly": {"build": build}}}))
        files += ["-f", str(override)]
    port = free_port()
    env = {**os.environ, "API_PORT": str(port)}

    def compose(*args: str, timeout: float = 600, check: bool = True):
        result = subprocess.run(["docker", "compose", "-p", PROJECT, *files, *args],
                                cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} -> {result.returncode}\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    try:
        compose("build", timeout=3600)
        compose("up", "-d", timeout=1800)
        yield compose, f"http://127.0.0.1:{port}"
    finally:
        logs = compose("logs", "--no-color", check=False, timeout=120)
        print(logs.stdout[-5000:])
        compose("down", "-v", "--remove-orphans", check=False, timeout=300)


def container(compose, service: str) -> str:
    return compose("ps", "-a", "-q", service).stdout.strip()


def inspect(compose, service: str, template: str) -> str:
    return subprocess.run(["docker", "inspect", "-f", template, container(compose, service)],
                          capture_output=True, text=True, timeout=30).stdout.strip()


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_ready(base: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = http("GET", f"{base}/readyz")
            if status == 200:
                return body
            last = body
        except OSError as exc:
            last = exc
        time.sleep(2)
    raise AssertionError(f"api not ready after {timeout} s: {last}")


@pytest.mark.slow
def test_compose_up_trains_serves_and_stops_cleanly(stack):
    compose, base = stack
    # the one-shot trainer completed and published version 1 as its own user
    assert inspect(compose, "trainer", "{{.State.ExitCode}}") == "0"
    owners = compose("run", "--rm", "--no-deps", "--entrypoint", "sh", "trainer", "-c",
                     "id -u; stat -c '%u %n' /models/recommender/1/manifest.json /data/runs/*"
                     ).stdout.split()
    uid = owners[0]
    assert uid != "0" and owners[1] == uid, owners
    assert owners[3] == uid, owners  # the run directory under /data/runs
    assert wait_ready(base)["model_version"] == 1

    status, body = http("POST", f"{base}/recommend",
                        {"user_id": "alice", "history": ["1", "260", "1196"], "k": 10})
    assert status == 200 and len(body["items"]) == 10
    status, body = http("POST", f"{base}/events", {"events": [
        {"user_id": "bob", "item_id": "1", "event_id": "b1"},
        {"user_id": "bob", "item_id": "260", "event_id": "b2"}]})
    assert status == 200 and body["accepted"] == 2
    assert compose("exec", "-T", "api", "id", "-u").stdout.strip() != "0"
    # Redis persists (appendonly) as its own user into its volume
    info = compose("exec", "-T", "redis", "redis-cli", "INFO", "persistence").stdout
    assert "aof_enabled:1" in info and "aof_last_write_status:ok" in info
    assert compose("exec", "-T", "redis", "id", "-u").stdout.strip() != "0"

    # one nightly cycle in the nightly container: ingests bob's events, writes /data as uid
    cycle = compose("exec", "-T", "nightly", "python", "-m", "trainer", "nightly",
                    "--no-progress", "--epochs", "1", "--max-minutes", "2", timeout=900)
    report = json.loads(cycle.stdout.strip().splitlines()[-1])
    assert report["ingest"]["events"] == 2 and report["decision"] in ("published", "rejected")

    # `docker compose stop` is clean: every container exits by itself on SIGTERM
    started = time.monotonic()
    compose("stop", timeout=120)
    took = time.monotonic() - started
    codes = {s: inspect(compose, s, "{{.State.ExitCode}}") for s in ("api", "nightly", "redis")}
    assert "137" not in codes.values(), codes
    assert took < 10, f"docker compose stop took {took:.1f} s"
