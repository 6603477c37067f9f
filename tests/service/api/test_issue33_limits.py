"""Issue 33, point 6: limits a client cannot blow up: request headers (capped by the server,
in every mode), `exclude` and `filter.item_ids` (stated in the schema). Each test here
failed before its fix."""

from __future__ import annotations

import contextlib
import http.client
import socket

import pytest

from service.schemas import MAX_FILTER_IDS
from tests.service.conftest import live_server, make_settings

# "\n" at the end passed `re.match(r"...$")`; "\r" and a leading "\n" are checked as well.
LINE_BREAK_IDS = ["a\n", "a\r", "\na"]


@pytest.fixture
def client(client_for):
    return client_for()


# --- 6: limits a client cannot blow up ------------------------------------------------------------


def raw_request(base: str, head: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)  # refused mid-send: what came back before says why
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


@pytest.fixture
def limited_server(models_dir):
    from service.__main__ import server_options

    settings = make_settings(models_dir)
    with live_server(create_app_for(settings), **server_options(settings)) as base:
        yield base, settings


def create_app_for(settings):
    from service.app import create_app

    return create_app(settings)


def test_headers_are_capped_by_the_server(limited_server):
    from service.http_limits import MAX_HEADERS

    base, settings = limited_server
    ok = raw_request(base, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 << 20) + b"\r\n\r\n"
    assert raw_request(base, big).startswith(b"HTTP/1.1 431")
    just_over = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
                 + b"a" * settings.max_header_bytes + b"\r\n\r\n")
    assert raw_request(base, just_over).startswith(b"HTTP/1.1 431")
    many = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: 1\r\n" % n for n in range(5000)) + b"\r\n")
    assert raw_request(base, many).startswith(b"HTTP/1.1 431")
    count_over = (b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                  + b"".join(b"X-%d: 1\r\n" % n for n in range(MAX_HEADERS)) + b"\r\n")
    assert raw_request(base, count_over).startswith(b"HTTP/1.1 431")
    # the server still answers, and a request within the limits on a keep-alive connection
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    for _ in range(2):
        conn.request("GET", "/healthz", headers={"X-Fine": "b" * 4000})
        response = conn.getresponse()
        assert response.status == 200 and response.read()
    conn.close()


def test_every_server_mode_gets_the_same_header_limits(models_dir, monkeypatch):
    import uvicorn

    import service.__main__ as main

    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append(kw))
    for workers in (1, 2):
        settings = make_settings(models_dir, workers=workers,
                                 redis_url="redis://127.0.0.1:1/0" if workers > 1 else None,
                                 max_header_bytes=12345)
        main.serve_uvicorn(settings)
    assert len(seen) == 2
    for options in seen:
        assert options["h11_max_incomplete_event_size"] == 12345
        assert options["http"] == main.LIMITED_HTTP
    assert seen[1]["workers"] == 2


def test_exclude_and_filter_ids_have_a_stated_limit(client):
    from service.schemas import MAX_EXCLUDE_IDS

    models = client.get("/openapi.json").json()["components"]["schemas"]
    request = models["RecommendRequest"]["properties"]
    assert request["exclude"]["maxItems"] == MAX_EXCLUDE_IDS
    item_ids = models["FilterBody"]["properties"]["item_ids"]
    assert [b.get("maxItems") for b in item_ids["anyOf"] if b.get("type") == "array"] == [
        MAX_FILTER_IDS]
    over = client.post("/recommend", json={"user_id": "u",
                                           "exclude": ["x"] * (MAX_EXCLUDE_IDS + 1)})
    assert over.status_code == 422 and over.json()["detail"][0]["type"] == "too_long"
    at = client.post("/recommend", json={"user_id": "u", "exclude": ["x"] * MAX_EXCLUDE_IDS})
    assert at.status_code == 200
    over = client.post("/recommend", json={"user_id": "u", "filter": {
        "item_ids": ["x"] * (MAX_FILTER_IDS + 1)}})
    assert over.status_code == 422 and over.json()["detail"][0]["type"] == "too_long"


@pytest.mark.parametrize(("server", "workers"), [("uvicorn", 2), ("granian", 1)])
def test_served_processes_cap_headers(models_dir, redis_url, tmp_path, server, workers):
    """`python -m service` itself: uvicorn's multi-worker mode and granian refuse the same."""
    from service.http_limits import MAX_HEADERS
    from tests.service.test_workers import serve

    with serve(models_dir, tmp_path / "service.log", workers, server=server,
               redis_url=redis_url) as running:
        base = running.base
        fine = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Fine: "
                + b"b" * 4000 + b"\r\n\r\n")
        assert raw_request(base, fine).startswith(b"HTTP/1.1 200")
        for head in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
                     + b"\r\n\r\n",
                     b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                     + b"".join(b"X-%d: 1\r\n" % n for n in range(MAX_HEADERS + 50))
                     + b"\r\n"):
            assert raw_request(base, head).startswith(b"HTTP/1.1 431"), server
