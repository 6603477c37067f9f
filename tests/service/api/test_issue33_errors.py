"""Issue 33, point 2: error answers that say what is wrong (the content type, the /events
shape the body has, why a body does not parse, one rule for k, URLs that are not UTF-8).
Each test here failed before its fix."""

from __future__ import annotations

import json

import pytest

from tests.service.api.test_api import known_items

# "\n" at the end passed `re.match(r"...$")`; "\r" and a leading "\n" are checked as well.
LINE_BREAK_IDS = ["a\n", "a\r", "\na"]


@pytest.fixture
def client(client_for):
    return client_for()


# --- 2: errors that say what is wrong ------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("path", ["/events", "/recommend", "/items/availability"])
def test_a_json_body_with_the_wrong_content_type_is_a_415_that_says_so(client, path,
                                                                      content_type):
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"user_id": "u", "item_id": "1"}).encode()
    response = client.post(path, content=body, headers=headers)
    assert response.status_code == 415, response.text
    detail = response.json()["detail"]
    assert "application/json" in detail and "Content-Type" in detail
    assert "dictionary" not in detail and response.json()["request_id"]


def test_a_json_body_that_is_not_an_object_says_so(client):
    response = client.post("/events", json=["u", "1"])
    assert response.status_code == 422
    messages = [d["msg"] for d in response.json()["detail"]]
    assert messages == ["the body must be a JSON object"], messages


def test_event_errors_name_the_shape_the_body_has(client):
    one = client.post("/events", json={"user_id": "u"})
    assert one.status_code == 422
    assert [d["loc"] for d in one.json()["detail"]] == [["body", "item_id"]]
    batch = client.post("/events", json={"events": [{"user_id": "u", "item_id": "a"},
                                                    {"user_id": "u", "item_id": " b"}]})
    assert [d["loc"] for d in batch.json()["detail"]] == [["body", "events", 1, "item_id"]]
    for response in (one, batch):
        assert "EventIn" not in response.text and "EventBatch" not in response.text


@pytest.mark.parametrize(("body", "needle"), [
    (b'{"user_id": "\xff\xfe", "item_id": "1"}', "UTF-8"),
    (b'{"user_id": "u", "item_id": "1", "timestamp": ' + b"9" * 5000 + b"}", "digits"),
    (b"[" * 50_000 + b"]" * 50_000, "nested"),
])
def test_an_unparseable_body_says_why(client, body, needle):
    response = client.post("/events", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert needle in detail and detail != "There was an error parsing the body"


def test_k_follows_one_rule_in_the_body_and_the_query(client):
    item = known_items(client, 1)[0]
    assert client.post("/recommend", json={"user_id": "u", "k": 3.0}).status_code == 422
    for k in ("3.0", "3e0", " 3", "+3"):
        response = client.get(f"/items/{item}/similar", params={"k": k})
        assert response.status_code == 422, (k, response.text)
        assert response.json()["detail"][0]["loc"] == ["query", "k"]
    assert client.get(f"/items/{item}/similar", params={"k": "3"}).status_code == 200


@pytest.mark.parametrize("path", ["/users/%FF%FE/history", "/users/a%C3/history/titles",
                                  "/items/%80/similar", "/items/availability?x=%FF"])
def test_percent_encoded_invalid_utf8_in_the_url_is_refused(client, path):
    response = client.get(path)
    assert response.status_code == 400, response.text
    assert "UTF-8" in response.json()["detail"] and response.json()["request_id"]


def test_a_percent_encoded_replacement_character_is_still_an_id(client):
    # U+FFFD sent as itself is a valid id: only bytes that are not UTF-8 are refused.
    assert client.get("/users/%EF%BF%BD/history").status_code == 200


