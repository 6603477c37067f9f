"""Service fixtures: apps built on a private copy of the tiny bundle."""

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def make_settings(models_dir, **overrides) -> Settings:
    base = dict(models_dir=models_dir, model_name="tiny", redis_url=None,
                reload_interval_seconds=0.1, log_level="WARNING")
    return Settings(**{**base, **overrides})


@pytest.fixture
def client_for(models_dir):
    """Builds a started TestClient for the given setting overrides."""
    clients = []

    def build(**overrides) -> TestClient:
        client = TestClient(create_app(make_settings(models_dir, **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def publish_copy(models_dir, source, name="tiny"):
    """Publish the files of bundle `source` as the next version of `name` (a real publish)."""
    from service.bundle.format import republish

    return republish(source, models_dir, name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app: FastAPI, **options: Any) -> Iterator[str]:
    """The app behind a real uvicorn server on loopback (in a thread); yields its base URL.
    `options`: more uvicorn settings (e.g. `service.__main__.server_options`, the limits
    `python -m service` serves with)."""
    port = free_port()
    config = {"log_level": "warning", "access_log": False, **options,
              "host": "127.0.0.1", "port": port}
    server = uvicorn.Server(uvicorn.Config(app, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
