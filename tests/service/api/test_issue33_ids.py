"""Issue 33, point 1: one id rule, checked on the whole string at every entry point (an id
ending in a newline passed `re.match(r"...$")`). Each test here failed before its fix."""

from __future__ import annotations

import json

import pytest

from service.ab.spec import check_experiment
from service.app import client_request_id
from service.schemas import is_request_id
from service.store.events import Malformed, check_id, parse_entry
from tests.service.api.test_api import known_items
from trainer.data.loaders import DataError, check_field_names

# "\n" at the end passed `re.match(r"...$")`; "\r" and a leading "\n" are checked as well.
LINE_BREAK_IDS = ["a\n", "a\r", "\na"]


@pytest.fixture
def client(client_for):
    return client_for()


# --- 1: one id rule, whole-string, everywhere -----------------------------------------------


@pytest.mark.parametrize("value", LINE_BREAK_IDS)
def test_the_id_rules_refuse_line_breaks(value):
    with pytest.raises(ValueError, match="control"):
        check_id(value)
    assert not is_request_id(value)
    assert client_request_id(value.encode()) != value  # X-Request-ID: replaced, not kept


@pytest.mark.parametrize("value", LINE_BREAK_IDS)
@pytest.mark.parametrize("field", ["user_id", "item_id", "event_id", "request_id"])
def test_events_refuse_ids_with_line_breaks(client, field, value):
    event = {"user_id": "lf-user", "item_id": "1", field: value}
    for body in (event, {"events": [event]}):
        response = client.post("/events", json=body)
        assert response.status_code == 422, (body, response.text)
    assert client.get("/users/lf-user/history").json()["items"] == []


def test_an_event_id_with_a_newline_is_not_a_second_event(client):
    first = client.post("/events", json={"user_id": "u", "item_id": "1", "event_id": "ev-1"})
    again = client.post("/events", json={"user_id": "u", "item_id": "1", "event_id": "ev-1\n"})
    assert first.json()["accepted"] == 1 and again.status_code == 422
    assert client.get("/users/u/history").json()["items"] == ["1"]


@pytest.mark.parametrize("value", ["a%0A", "a%0D", "%0Aa", "lf-user%0A"])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_path_ids_refuse_line_breaks(client, method, value):
    response = client.request(method, f"/users/{value}/history")
    assert response.status_code == 422, response.text
    assert "control characters" in response.text
    if method == "GET":
        assert client.get(f"/users/{value}/history/titles").status_code == 422
        assert client.get(f"/items/{value}/similar").status_code == 422


@pytest.mark.parametrize("value", LINE_BREAK_IDS)
@pytest.mark.parametrize("field", ["unavailable", "available"])
def test_availability_refuses_ids_with_line_breaks(client, field, value):
    response = client.post("/items/availability", json={field: [value]})
    assert response.status_code == 422, response.text
    assert client.get("/items/availability").json()["version"] == 0


@pytest.mark.parametrize("value", LINE_BREAK_IDS)
def test_recommend_and_similar_refuse_ids_with_line_breaks(client, value):
    for body in ({"user_id": value}, {"user_id": "u", "history": [value]},
                 {"user_id": "u", "exclude": [value]},
                 {"user_id": "u", "filter": {"item_ids": [value]}}):
        assert client.post("/recommend", json=body).status_code == 422, body
    item = known_items(client, 1)[0]
    assert client.get(f"/items/{item}/similar", params={"item_ids": value}).status_code == 422


@pytest.mark.parametrize("value", LINE_BREAK_IDS)
@pytest.mark.parametrize("field", ["user_id", "item_id", "event_id"])
def test_the_nightly_parser_refuses_ids_with_line_breaks(field, value):
    event = {"user_id": "u", "item_id": "1", "event_id": "e", "timestamp": "1.0", field: value}
    with pytest.raises(Malformed, match=field):
        parse_entry({b"event": json.dumps(event).encode()})


@pytest.mark.parametrize("value", ["ab\n", "ab\r", "\nab"])
def test_names_in_settings_refuse_line_breaks(value):
    # AB_EXPERIMENT names Redis keys; --item-fields names bundle fields
    with pytest.raises(ValueError, match="AB_EXPERIMENT"):
        check_experiment(value)
    with pytest.raises(DataError, match="bad field name"):
        check_field_names([value])


