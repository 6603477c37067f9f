"""Defects found by trying the service as a new user and as an attacker would (issue 10): bad
input never reaches a 500, every answer carries its request id, odd bundles are refused once,
roll-back by deletion works, the event log never drops unread events, Redis restarts are
invisible to clients."""

import http.client
import json
import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from service.app import create_app
from service.bundle.format import MANIFEST, BundleError
from service.bundle.load import Bundle, load_bundle
from service.observability import JsonFormatter
from service.store.events import EVENT_GROUP, MAX_TIMESTAMP
from tests.service.api.test_api import known_items, wait_for
from tests.service.conftest import free_port, live_server, make_settings, publish_copy


@pytest.fixture
def client(client_for):
    return client_for()


def post_raw(client, path: str, body: str):
    return client.post(path, content=body.encode("utf-8", "surrogatepass"),
                       headers={"content-type": "application/json"})


# --- 5, 6, 16: numbers, surrogates, strict types -----------------------------------------------


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", ["k", "timestamp"])
def test_non_finite_numbers_are_422_not_500(client, field, number):
    if field == "k":
        response = post_raw(client, "/recommend", f'{{"user_id": "u", "k": {number}}}')
    else:
        response = post_raw(client, "/events",
                            f'{{"user_id": "u", "item_id": "a", "timestamp": {number}}}')
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail[0]["loc"][-1] == field and detail[0]["msg"]


@pytest.mark.parametrize("where", ["user_id", "history", "exclude"])
def test_lone_surrogate_in_a_recommend_id_is_422(client, where):
    body = {"user_id": "u", where: "\\ud800" if where == "user_id" else ["\\ud800"]}
    text = json.dumps(body).replace("\\\\ud800", "\\ud800")
    response = post_raw(client, "/recommend", text)
    assert response.status_code == 422, response.text
    assert re.search("surrogate|unicode", response.text)


def test_a_batch_with_one_bad_event_stores_nothing(client):
    events = [{"user_id": "u", "item_id": "a", "event_id": "e1"},
              {"user_id": "u", "item_id": "\\ud800", "event_id": "e2"}]
    text = json.dumps({"events": events}).replace("\\\\ud800", "\\ud800")
    response = post_raw(client, "/events", text)
    assert response.status_code == 422 and re.search("surrogate|unicode", response.text)
    locs = [d["loc"] for d in response.json()["detail"]]
    assert ["body", "events", 1, "item_id"] in locs
    assert client.get("/users/u/history").json()["items"] == []
    # the good event alone is accepted: nothing was half-recorded before
    assert client.post("/events", json=events[0]).json() == {"accepted": 1, "duplicates": 0}


@pytest.mark.parametrize("timestamp", [1e300, MAX_TIMESTAMP + 1, -1])
def test_timestamps_are_bounded(client, timestamp):
    response = client.post("/events", json={"user_id": "u", "item_id": "a",
                                            "timestamp": timestamp})
    assert response.status_code == 422
    assert client.post("/events", json={"user_id": "u", "item_id": "a",
                                        "timestamp": MAX_TIMESTAMP}).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [("/recommend", {"user_id": "u", "k": "5"}),
     ("/recommend", {"user_id": "u", "k": True}),
     ("/recommend", {"user_id": "u", "k": 3.0}),
     ("/recommend", {"user_id": "u", "exclude_seen": "true"}),
     ("/recommend", {"user_id": "u", "use_stored_history": 1}),
     ("/events", {"user_id": "u", "item_id": "a", "event_id": 0}),
     ("/events", {"user_id": "u", "item_id": 5}),
     ("/events", {"user_id": "u", "item_id": "a", "timestamp": "5"})],
)
def test_loose_types_are_refused(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["type"].endswith("_type")


def test_a_422_never_echoes_a_large_input(client_for):
    client = client_for(max_body_bytes=4 << 20)
    huge = "x" * (1 << 20)
    for body in ({"user_id": huge}, {"user_id": "u", "history": [huge]},
                 {"user_id": "u", "k": huge}):
        response = client.post("/recommend", json=body)
        assert response.status_code == 422
        assert len(response.content) < 2000, len(response.content)


# --- 7: request ids on every answer, keep-alive after a 500 -------------------------------------


class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record):  # formatted now: the request id lives in a context variable
        self.lines.append(json.loads(JsonFormatter().format(record)))


def test_a_500_carries_its_request_id_and_keeps_the_connection(models_dir):
    app = create_app(make_settings(models_dir))
    captured = Captured()
    logging.getLogger("service").addHandler(captured)
    try:
        with live_server(app) as base:
            def broken(*args, **kwargs):
                raise RuntimeError("boom")

            app.state.recsys.models.current.prepare = broken
            conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
            body = json.dumps({"user_id": "u", "history": ["1"]})
            conn.request("POST", "/recommend", body, {"content-type": "application/json",
                                                      "x-request-id": "trace-500"})
            first = conn.getresponse()
            payload = json.loads(first.read())
            assert first.status == 500 and first.getheader("x-request-id") == "trace-500"
            assert payload == {"detail": "internal error", "request_id": "trace-500"}
            assert "boom" not in json.dumps(payload)
            # the same connection answers the next request (it was not dropped)
            conn.request("GET", "/healthz")
            second = conn.getresponse()
            assert second.status == 200 and second.read()
            made = second.getheader("x-request-id")
            assert made and made != "trace-500"
            conn.close()
    finally:
        logging.getLogger("service").removeHandler(captured)
    errors = [line for line in captured.lines if line["msg"] == "unhandled error"]
    assert errors and errors[0]["request_id"] == "trace-500" and "boom" in errors[0]["exc"]


def test_error_bodies_carry_the_request_id(client):
    for response in (client.post("/recommend", json={}, headers={"x-request-id": "r-1"}),
                     client.get("/no-such-route", headers={"x-request-id": "r-1"})):
        assert response.json()["request_id"] == "r-1" == response.headers["x-request-id"]


def test_an_unsafe_client_request_id_is_replaced(client):
    made = client.get("/healthz", headers={"x-request-id": "a" * 500}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)


# --- 8: one rule for user ids -------------------------------------------------------------------


def test_path_ids_follow_the_body_rule(client_for, redis_url, redisdb):
    client = client_for(redis_url=redis_url)
    assert client.get("/users/%20/history").status_code == 422
    assert client.get("/users/%20u/history").status_code == 422
    long_id = "x" * 10000  # httpx refuses longer URLs; the issue saw 64 KB
    assert client.get(f"/users/{long_id}/history").status_code == 422
    assert client.delete(f"/users/{long_id}/history").status_code == 422
    assert client.post("/events", json={"user_id": long_id, "item_id": "a"}).status_code == 422
    assert not [k for k in redisdb.keys("*") if len(k) > 1000]
    # ids holding "/" are written and read back, encoded or not
    assert client.post("/events", json={"user_id": "team/a", "item_id": "i1"}).status_code == 200
    assert client.get("/users/team/a/history").json() == {"user_id": "team/a", "items": ["i1"]}
    assert client.get("/users/team%2Fa/history").json()["items"] == ["i1"]
    assert client.delete("/users/team/a/history").json()["deleted"] is True


def test_body_ids_are_not_stripped_but_refused(client):
    response = client.post("/events", json={"user_id": " u ", "item_id": "a"})
    assert response.status_code == 422 and "whitespace" in response.text
    response = client.post("/events", json={"user_id": "u\x00", "item_id": "a"})
    assert response.status_code == 422 and "control" in response.text


# --- 9, 10, 11: bundles the service should refuse; roll-back by deletion ------------------------


def edit_manifest(bundle_dir: Path, **changes) -> None:
    path = bundle_dir / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(("field", "value", "needle"),
                         [("maxlen", 30, "maxlen=30"), ("interests", 3, "interests=3"),
                          ("dim", 8, "dim=8")])
def test_manifest_disagreeing_with_the_graph_is_refused(models_dir, field, value, needle):
    bundle_dir = models_dir / "tiny" / "1"
    edit_manifest(bundle_dir, **{field: value})
    with pytest.raises(BundleError, match=needle):
        load_bundle(bundle_dir)


def test_a_mismatched_only_bundle_leaves_the_service_not_ready(models_dir, client_for):
    edit_manifest(models_dir / "tiny" / "1", maxlen=30)
    client = client_for()
    assert client.get("/readyz").status_code == 503
    assert client.post("/recommend", json={"user_id": "u", "history": ["1"]}).status_code == 503


def test_a_bundle_whose_test_inference_fails_is_refused(models_dir, monkeypatch):
    def no_search(self, queries, n):
        raise RuntimeError("index broken")

    monkeypatch.setattr(Bundle, "search", no_search)
    with pytest.raises(BundleError, match="test inference failed"):
        load_bundle(models_dir / "tiny" / "1")


def reloads(client, result):
    match = re.search(rf'recsys_reloads_total{{result="{result}"}} (\d+)',
                      client.get("/metrics").text)
    return float(match.group(1)) if match else 0.0


def test_a_copied_version_directory_is_refused_once(client, models_dir):
    shutil.copytree(models_dir / "tiny" / "1", models_dir / "tiny" / "2")  # `cp -a 1 2`
    assert wait_for(lambda: reloads(client, "failure") == 1)
    time.sleep(0.5)  # five more watcher intervals: no retries
    assert reloads(client, "failure") == 1
    info = client.get("/model").json()
    assert info["manifest"]["version"] == 1 and info["refused_versions"] == [2]
    assert "its manifest says version 1" in info["last_error"]


def test_deleting_the_served_version_rolls_back(client, models_dir):
    v2 = publish_copy(models_dir, models_dir / "tiny" / "1")
    assert wait_for(lambda: client.get("/readyz").json()["model_version"] == 2)
    shutil.rmtree(v2)
    assert wait_for(lambda: client.get("/readyz").json()["model_version"] == 1)
    body = client.post("/recommend", json={"user_id": "u", "history": known_items(client, 3)})
    assert body.status_code == 200 and body.json()["model_version"] == 1
    # and a new publication after the roll-back is picked up again
    publish_copy(models_dir, models_dir / "tiny" / "1")
    assert wait_for(lambda: client.get("/readyz").json()["model_version"] == 2)


def test_deleting_every_version_keeps_serving_from_memory(client, models_dir):
    shutil.rmtree(models_dir / "tiny" / "1")
    time.sleep(0.4)
    assert client.post("/recommend", json={"user_id": "u"}).json()["model_version"] == 1


# --- 12: the event log never drops unread events ------------------------------------------------


def test_the_stream_is_not_trimmed_and_refuses_when_full(client_for, redis_url, redisdb):
    client = client_for(redis_url=redis_url, event_stream_max_len=5)
    assert [g["name"] for g in redisdb.xinfo_groups("recsys:events")] == [EVENT_GROUP]
    batch = [{"user_id": "u", "item_id": f"i{n}", "event_id": f"e{n}"} for n in range(4)]
    assert client.post("/events", json={"events": batch}).json()["accepted"] == 4
    two = [{"user_id": "u", "item_id": f"j{n}", "event_id": f"f{n}"} for n in range(2)]
    full = client.post("/events", json={"events": two})
    assert full.status_code == 503 and "event log full" in full.json()["detail"]
    assert full.headers["retry-after"]
    assert redisdb.xlen("recsys:events") == 4  # nothing of the refused batch was stored
    assert len(client.get("/users/u/history").json()["items"]) == 4
    metrics = client.get("/metrics").text
    assert "recsys_event_stream_length 4.0" in metrics
    assert "recsys_event_stream_lag 4.0" in metrics

    # the nightly job reads and acknowledges; what it acknowledged may go, the rest frees room
    entries = redisdb.xreadgroup(EVENT_GROUP, "nightly", {"recsys:events": ">"}, count=3)
    ids = [stream_id for stream_id, _ in entries[0][1]]
    redisdb.xack("recsys:events", EVENT_GROUP, *ids)
    redisdb.xtrim("recsys:events", minid=ids[-1], approximate=False)  # keeps ids >= the last
    assert "recsys_event_stream_lag 1.0" in client.get("/metrics").text
    assert client.post("/events", json={"events": two}).json()["accepted"] == 2


# --- 3: a Redis restart is invisible --------------------------------------------------------------


@pytest.fixture
def restartable_redis(tmp_path):
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "yes", "--dir", str(tmp_path)]
    procs = []

    def start():
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        client = redis.Redis(port=port)
        assert wait_for(lambda: _pings(client)), "redis-server did not start"

    def restart():
        redis.Redis(port=port).shutdown(nosave=False)
        procs[-1].wait(timeout=10)
        start()

    start()
    yield f"redis://127.0.0.1:{port}/0", restart
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_first_request_after_a_redis_restart_succeeds(client_for, restartable_redis):
    url, restart = restartable_redis
    client = client_for(redis_url=url)
    assert client.post("/events", json={"user_id": "u", "item_id": "a"}).status_code == 200
    assert client.get("/users/u/history").json()["items"] == ["a"]
    restart()
    history = client.get("/users/u/history")
    assert history.status_code == 200 and history.json()["items"] == ["a"]
    restart()
    assert client.post("/events", json={"user_id": "u", "item_id": "b"}).status_code == 200
    restart()
    assert client.post("/recommend", json={"user_id": "u"}).json()["history_length"] >= 0


# --- 15: /docs works offline --------------------------------------------------------------------


def test_docs_are_served_without_a_cdn(client):
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", page.text)
    urls = [a or b for a, b in urls]
    assert urls and not [u for u in urls if u.startswith(("http:", "https:", "//"))], urls
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 100, url
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls)
    assert client.get("/openapi.json").json()["paths"]["/recommend"]


def test_a_path_id_with_a_newline_is_a_422_not_a_404(client):
    response = client.delete("/users/a%0Ab/history")
    assert response.status_code == 422 and "control characters" in response.text


def test_the_schema_states_the_limits_from_the_settings(client_for):
    client = client_for(max_k=50, max_request_history=30, max_events_per_request=7)
    models = client.get("/openapi.json").json()["components"]["schemas"]
    k = models["RecommendRequest"]["properties"]["k"]["anyOf"][0]
    assert k["maximum"] == 50 and k["minimum"] == 1
    assert models["RecommendRequest"]["properties"]["history"]["anyOf"][0]["maxItems"] == 30
    assert models["EventBatch"]["properties"]["events"]["maxItems"] == 7
    too_many = client.post("/recommend", json={"user_id": "u", "k": 51})
    assert too_many.status_code == 422
    assert too_many.json()["detail"][0]["loc"] == ["body", "k"]


def test_a_stop_does_not_hang_on_a_store_that_never_closes(models_dir, monkeypatch):
    import asyncio

    from fastapi.testclient import TestClient

    import service.app as app_module

    monkeypatch.setattr(app_module, "SHUTDOWN_STEP_SECONDS", 0.5)
    app = create_app(make_settings(models_dir))

    async def never() -> None:
        await asyncio.Event().wait()

    captured = Captured()
    logging.getLogger("service").addHandler(captured)
    try:
        with TestClient(app) as client:
            assert client.get("/healthz").status_code == 200
            monkeypatch.setattr(app.state.recsys.store, "close", never)
            started = time.perf_counter()
        assert time.perf_counter() - started < 5
    finally:
        logging.getLogger("service").removeHandler(captured)
    assert [line["step"] for line in captured.lines
            if line["msg"] == "shutdown step did not finish; going on"] == ["history store"]
