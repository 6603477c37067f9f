"""Issue 33, points 3 and 4: 503s carry Retry-After and no internals (Redis's address, the
models folder). Each test here failed before its fix."""

from __future__ import annotations

import pytest

from tests.service.conftest import free_port

# "\n" at the end passed `re.match(r"...$")`; "\r" and a leading "\n" are checked as well.
LINE_BREAK_IDS = ["a\n", "a\r", "\na"]


@pytest.fixture
def client(client_for):
    return client_for()


# --- 3, 4: 503 with Retry-After and no internals ------------------------------------------------


@pytest.fixture
def redis_down(client_for):
    port = free_port()  # nothing listens there
    return client_for(redis_url=f"redis://127.0.0.1:{port}/0"), port


def test_a_redis_outage_is_a_503_with_retry_after_and_no_address(redis_down):
    client, port = redis_down
    calls = [("POST", "/events", {"user_id": "u", "item_id": "1"}),
             ("POST", "/events", {"events": [{"user_id": "u", "item_id": "1"}]}),
             ("GET", "/users/u/history", None), ("DELETE", "/users/u/history", None),
             ("GET", "/users/u/history/titles", None),
             ("POST", "/items/availability", {"unavailable": ["1"]})]
    for method, path, body in calls:
        response = client.request(method, path, json=body, headers={"x-request-id": "r-503"})
        assert response.status_code == 503, (path, response.text)
        assert int(response.headers["retry-after"]) > 0, path
        assert str(port) not in response.text and "127.0.0.1" not in response.text, path
        assert "Error" not in response.text, (path, response.text)
        assert response.json()["request_id"] == "r-503"


def test_no_model_loaded_is_a_503_without_the_models_folder(client_for, models_dir):
    client = client_for(model_name="absent")
    for response in (client.post("/recommend", json={"user_id": "u"}),
                     client.get("/items/1/similar"), client.get("/model")):
        assert response.status_code == 503, response.text
        assert str(models_dir) not in response.text and "/" not in response.json()["detail"]
        assert int(response.headers["retry-after"]) > 0


