"""The HTTP contract, through the real app (TestClient runs its lifespan)."""

import json

import pytest

from service.bundle.format import ENCODER
from tests.helpers import wait_for
from tests.service.conftest import publish_copy


def known_items(client, n=5):
    """Some item ids of the served catalogue (from the popularity fallback)."""
    body = client.post("/recommend", json={"user_id": "probe", "k": n}).json()
    return [i["item_id"] for i in body["items"]]


@pytest.fixture
def client(client_for):
    return client_for()


def test_recommend_honours_k_exclusions_and_has_no_duplicates(client):
    history = known_items(client, 6)
    excluded = known_items(client, 30)[10:20]
    body = client.post("/recommend", json={"user_id": "u", "k": 15, "history": history,
                                           "exclude": excluded}).json()
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 15 and len(set(ids)) == 15
    assert not set(ids) & set(excluded)
    assert body["fallback"] is False and body["model_version"] == 1
    assert all(0 <= i["interest"] < 4 for i in body["items"])
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert sum(s["items"] for s in body["interests"]) == 15


@pytest.mark.parametrize("overrides", [{}, {"adaptive_interests": True}])
def test_recommend_bodies_are_exactly_their_schema_model(client_for, overrides):
    # The answer is serialised directly (service/schemas.py FastJSONResponse), not through
    # RecommendResponse: it must still be that model, field for field, key order included.
    from service.schemas import RecommendResponse

    client = client_for(**overrides)
    history = known_items(client, 8)
    for request in ({"user_id": "u", "k": 12, "history": history},
                    {"user_id": "u", "k": 5},  # popularity fallback: interest null
                    {"user_id": "u", "k": 3, "history": ["no-such-item"]}):
        response = client.post("/recommend", json=request)
        assert response.status_code == 200 and response.headers["content-type"] == \
            "application/json"
        body = response.json()
        model = RecommendResponse.model_validate(body)
        assert list(body) == list(RecommendResponse.model_fields)
        assert model.model_dump(mode="json") == body
        for item in body["items"]:
            assert list(item) == ["item_id", "score", "interest", "title", "new"]
        for summary in body["interests"]:
            assert list(summary) == ["interest", "items", "weight", "name", "confidence",
                                     "merged_into", "dropped"]


def test_exclude_seen_drops_the_history(client):
    history = known_items(client, 8)
    plain = client.post("/recommend", json={"user_id": "u", "k": 50, "history": history}).json()
    seen = client.post("/recommend", json={"user_id": "u", "k": 50, "history": history,
                                           "exclude_seen": True}).json()
    assert set(history) & {i["item_id"] for i in plain["items"]}  # would be there otherwise
    assert not set(history) & {i["item_id"] for i in seen["items"]}


def test_diversity_zero_answers_as_before_and_more_spreads_the_interests(client):
    history = known_items(client, 12)
    request = {"user_id": "u", "k": 20, "history": history}
    plain = client.post("/recommend", json=request).json()
    zero = client.post("/recommend", json={**request, "diversity": 0}).json()
    spread = client.post("/recommend", json={**request, "diversity": 1}).json()

    def answer(body):
        return [(i["item_id"], i["score"], i["interest"]) for i in body["items"]]

    assert answer(zero) == answer(plain)
    assert len({i["item_id"] for i in spread["items"]}) == 20
    counts = [s["items"] for s in spread["interests"]]
    assert sum(counts) == 20
    assert max(counts) <= max(s["items"] for s in plain["interests"])
    assert sum(c > 0 for c in counts) >= sum(s["items"] > 0 for s in plain["interests"])
    refused = client.post("/recommend", json={**request, "diversity": 1.5})
    assert refused.status_code == 422 and "diversity" in refused.text


def test_fallback_is_flagged_and_unknown_ids_counted(client):
    body = client.post("/recommend", json={"user_id": "new", "k": 5,
                                           "history": ["no-such-item", "nor-this"]}).json()
    assert body["fallback"] is True and body["unknown_items"] == 2
    assert all(i["interest"] is None for i in body["items"])
    assert body["history_source"] == "request" and body["history_length"] == 0
    metrics = client.get("/metrics").text
    assert "recsys_fallbacks_total 1.0" in metrics
    assert "recsys_unknown_items_total 2.0" in metrics


def test_ids_are_strings_only(client):
    item = known_items(client, 1)[0]
    ok = client.post("/recommend", json={"user_id": "7", "k": 3, "history": [item]})
    assert ok.status_code == 200 and ok.json()["unknown_items"] == 0
    for body in ({"user_id": 7}, {"user_id": "7", "history": [int(item)]}):
        refused = client.post("/recommend", json=body)
        assert refused.status_code == 422 and "valid string" in refused.text


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({}, 422, "user_id"),
        ({"user_id": "u", "k": 0}, 422, "greater than or equal to 1"),
        ({"user_id": "u", "k": "many"}, 422, "valid integer"),
        ({"user_id": "u", "k": 201}, 422, "above the maximum 200"),
        ({"user_id": "u", "history": ["a"] * 1001}, 422, "at most 1000"),
        ({"user_id": "u", "history": "abc"}, 422, "valid list"),
        ({"user_id": "u", "exclude": [None]}, 422, "exclude"),
        ({"user_id": "u", "colour": "red"}, 422, "Extra inputs"),
        ({"user_id": ""}, 422, "at least 1 character"),
        ({"user_id": " "}, 422, "whitespace"),
        ([1, 2], 422, "the body must be a JSON object"),
    ],
)
def test_bad_recommend_bodies_get_4xx_with_a_message(client, payload, status, needle):
    response = client.post("/recommend", json=payload)
    assert response.status_code == status
    assert needle in json.dumps(response.json()["detail"])


def test_malformed_json_and_oversize_bodies(client_for):
    client = client_for(max_body_bytes=2048)
    bad = client.post("/recommend", content=b"{nope", headers={"content-type": "application/json"})
    assert bad.status_code == 422 and "JSON decode error" in bad.text
    big = client.post("/recommend", json={"user_id": "u", "history": ["x" * 100] * 50})
    assert big.status_code == 413 and "over the limit of 2048 bytes" in big.json()["detail"]

    def chunks():  # no Content-Length: the limit still holds
        yield b'{"user_id": "u", "history": ['
        for _ in range(100):
            yield b'"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",'
        yield b'"x"]}'

    chunked = client.post("/recommend", content=chunks(),
                          headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def test_events_with_redis_recorded_read_back_and_deleted(client_for, redis_url, redisdb):
    client = client_for(redis_url=redis_url, history_max_len=4)
    item_ids = known_items(client, 6)
    batch = [{"user_id": "u", "item_id": item, "timestamp": 100 - i}  # newest first in body
             for i, item in enumerate(item_ids[:3])]
    assert client.post("/events", json={"events": batch}).json() == {"accepted": 3,
                                                                     "duplicates": 0}
    single = {"user_id": "u", "item_id": item_ids[3], "event_id": "ev-1"}
    assert client.post("/events", json=single).json()["accepted"] == 1
    assert client.post("/events", json=single).json() == {"accepted": 0, "duplicates": 1}
    history = client.get("/users/u/history").json()["items"]
    assert history == [item_ids[2], item_ids[1], item_ids[0], item_ids[3]]  # timestamp order
    assert redisdb.xlen("recsys:events") == 4

    used = client.post("/recommend", json={"user_id": "u", "k": 5}).json()
    assert used["history_source"] == "stored" and used["history_length"] == 4

    client.post("/events", json={"events": [{"user_id": "u", "item_id": "z", "timestamp": 1e9}]})
    assert len(client.get("/users/u/history").json()["items"]) == 4  # capped
    assert client.delete("/users/u/history").json() == {"user_id": "u", "deleted": True}
    assert client.get("/users/u/history").json()["items"] == []


@pytest.mark.parametrize(
    "payload",
    [{"user_id": "u"}, {"events": []}, {"events": [{"item_id": "a"}]},
     {"user_id": "u", "item_id": "a", "timestamp": "yesterday"},
     {"user_id": "u", "item_id": "a", "timestamp": -5}],
)
def test_bad_events_are_refused_and_store_nothing(client, payload):
    response = client.post("/events", json=payload)
    assert response.status_code == 422 and response.json()["detail"]
    assert client.get("/users/u/history").json()["items"] == []


def test_redis_down_degrades_or_answers_503(client_for):
    client = client_for(redis_url="redis://127.0.0.1:1/0")
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"] == {"model": True, "store": False}
    history = known_items(client_for(), 3)
    degraded = client.post("/recommend", json={"user_id": "u", "history": history})
    assert degraded.status_code == 200 and degraded.json()["degraded"] is True
    assert degraded.json()["history_source"] == "request"
    no_history = client.post("/recommend", json={"user_id": "u"})  # popularity, flagged
    assert no_history.status_code == 200
    assert no_history.json()["degraded"] is True and no_history.json()["fallback"] is True
    assert client.post("/events", json={"user_id": "u", "item_id": "a"}).status_code == 503
    assert client.get("/users/u/history").status_code == 503
    assert "recsys_redis_errors_total 4.0" in client.get("/metrics").text


def test_api_key(client_for):
    client = client_for(api_key="s3cret")
    assert client.post("/recommend", json={"user_id": "u"}).status_code == 401
    ok = client.post("/recommend", json={"user_id": "u"}, headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 200
    bearer = client.get("/model", headers={"Authorization": "Bearer s3cret"})
    assert bearer.status_code == 200
    assert client.get("/healthz").status_code == 200  # probes stay open


def test_no_bundle_means_not_ready(tmp_path, client_for):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.service.conftest import make_settings

    with TestClient(create_app(make_settings(tmp_path / "empty"))) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        response = client.post("/recommend", json={"user_id": "u"})
        assert response.status_code == 503 and "no model loaded" in response.json()["detail"]




def test_hot_reload_swaps_and_refuses_a_broken_bundle(client, models_dir):
    assert client.get("/model").json()["manifest"]["version"] == 1
    v2 = publish_copy(models_dir, models_dir / "tiny" / "1")
    assert wait_for(lambda: client.get("/model").json()["manifest"]["version"] == 2)
    body = client.post("/recommend", json={"user_id": "u", "history": known_items(client, 3)})
    assert body.json()["model_version"] == 2

    v3 = publish_copy(models_dir, v2)
    with open(v3 / ENCODER, "r+b") as fh:  # damaged after publishing
        fh.seek(10)
        fh.write(b"\x00\x00\x00")
    assert wait_for(lambda: 'result="failure"' in client.get("/metrics").text)
    info = client.get("/model").json()
    assert info["manifest"]["version"] == 2 and info["refused_versions"] == [3]
    assert "encoder.onnx: checksum mismatch" in info["last_error"]
    assert client.post("/recommend", json={"user_id": "u"}).json()["model_version"] == 2


def test_the_heap_is_frozen_at_start_and_again_after_a_swap(client_for, models_dir):
    # service/app.py freeze_heap: the collector's full passes skip the app, libraries and model.
    import gc

    gc.unfreeze()
    client = client_for()
    assert gc.get_freeze_count() > 0
    gc.unfreeze()
    publish_copy(models_dir, models_dir / "tiny" / "1")
    assert wait_for(lambda: client.get("/model").json()["manifest"]["version"] == 2)
    assert gc.get_freeze_count() > 0  # refrozen by the swap
    assert client.post("/recommend", json={"user_id": "u"}).status_code == 200


def test_request_id_is_echoed_or_made(client):
    given = client.get("/healthz", headers={"X-Request-ID": "req-42"})
    assert given.headers["x-request-id"] == "req-42"
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32 and made != "req-42"
