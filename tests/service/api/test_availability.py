"""Item availability: an unavailable item leaves every answer (recommendations, the popularity
fallback, similar items) of every worker sharing a Redis, comes back when made available, and
stays unavailable through a bundle swap and a restart."""

from __future__ import annotations

import time

import pytest

from tests.helpers import metric, wait_for
from tests.service.conftest import publish_copy


def answer_ids(client, **body):
    answer = client.post("/recommend", json={"user_id": "u", "use_stored_history": False,
                                             **body})
    assert answer.status_code == 200, answer.text
    return [i["item_id"] for i in answer.json()["items"]]


def similar_ids(client, item, **params):
    return [i["item_id"] for i in client.get(f"/items/{item}/similar", params=params).json()
            ["items"]]


def mark(client, unavailable=(), available=()):
    answer = client.post("/items/availability", json={"unavailable": list(unavailable),
                                                      "available": list(available)})
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture
def client(client_for):
    return client_for()


def test_an_unavailable_item_leaves_every_answer_and_comes_back(client):
    popular = answer_ids(client, k=10)  # the popularity fallback
    history = popular[5:9]
    top = answer_ids(client, history=history, k=10)
    neighbours = similar_ids(client, history[0], k=5)
    gone = {popular[0], top[0], neighbours[0]}
    body = mark(client, unavailable=gone)
    assert body["unavailable_items"] == len(gone) and body["version"] == 1
    assert not gone & set(answer_ids(client, k=10))
    assert not gone & set(answer_ids(client, history=history, k=10))
    assert not gone & set(answer_ids(client, history=history, k=10,
                                     filter={"include": {"category": ["topic-1", "topic-2"]}}))
    assert not gone & set(similar_ids(client, history[0], k=5))
    assert len(answer_ids(client, history=history, k=10)) == 10  # still k items
    assert client.get("/items/availability").json()["unavailable"] == sorted(gone)
    mark(client, available=gone)
    assert answer_ids(client, history=history, k=10) == top
    assert answer_ids(client, k=10) == popular
    assert similar_ids(client, history[0], k=5) == neighbours


def test_many_unavailable_items_are_left_out_by_a_restricted_search(client):
    """Beyond UNAVAILABLE_AS_EXCLUSIONS the request searches the available rows only."""
    history = answer_ids(client, k=4)
    every = answer_ids(client, k=200)
    gone = set(every[:150]) | set(answer_ids(client, history=history, k=150))
    assert len(gone) > 160  # over half the tiny catalogue
    mark(client, unavailable=gone)
    for ids in (answer_ids(client, history=history, k=20), answer_ids(client, k=20),
                similar_ids(client, history[0], k=20)):
        assert ids and not gone & set(ids)


def test_marking_both_ways_at_once_is_a_422(client):
    answer = client.post("/items/availability", json={"unavailable": ["1", "2"],
                                                      "available": ["2"]})
    assert answer.status_code == 422 and "'2'" in str(answer.json()["detail"])


def test_every_worker_sharing_redis_sees_a_change_within_100_ms(client_for, redis_url):
    first = client_for(redis_url=redis_url)
    second = client_for(redis_url=redis_url)  # another worker or replica: its own app
    history = answer_ids(first, k=4)
    top = answer_ids(second, history=history, k=5)
    mark(first, unavailable=[top[0]])
    started = time.perf_counter()
    assert wait_for(lambda: top[0] not in answer_ids(second, history=history, k=5), 5)
    # Polled every 50 ms (the 100 ms target is measured by benchmarks, not asserted here).
    assert time.perf_counter() - started < 1.0
    assert metric(second.get("/metrics").text, "recsys_unavailable_items") == 1
    mark(second, available=[top[0]])
    assert wait_for(lambda: answer_ids(first, history=history, k=5) == top, 5)


def test_availability_survives_a_bundle_swap_and_a_restart(client_for, models_dir, redis_url):
    client = client_for(redis_url=redis_url)
    history = answer_ids(client, k=4)
    top = answer_ids(client, history=history, k=5)
    mark(client, unavailable=[top[0]])
    publish_copy(models_dir, models_dir / "tiny" / "1")
    assert wait_for(lambda: client.get("/model").json()["manifest"]["version"] == 2)
    assert top[0] not in answer_ids(client, history=history, k=5)
    restarted = client_for(redis_url=redis_url)  # a fresh process's app: no wait
    assert top[0] not in answer_ids(restarted, history=history, k=5)
    assert restarted.get("/items/availability").json()["unavailable"] == [top[0]]
