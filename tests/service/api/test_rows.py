"""Interest rows in POST /recommend: named explicit interests beside the list, each the best
items inside it; the list unchanged; filters, exclusions and availability apply to both."""

from __future__ import annotations

import numpy as np
import pytest

from service.bundle.load import load_bundle
from service.serving.retrieval import copy_groups, interest_support
from tests.service.api.test_filters import exact_filtered


@pytest.fixture(params=[1, 64], ids=["alone", "batched"])
def client(client_for, request):
    return client_for(batch_max_size=request.param)


@pytest.fixture
def bundle(models_dir):
    return load_bundle(models_dir / "tiny" / "1")


def topic_items(bundle, topic: str) -> list[str]:
    return bundle.item_ids[bundle.fields["category"][topic]].tolist()


def category_of(bundle) -> dict[str, str]:
    return {item: value for value, rows in bundle.fields["category"].items()
            for item in bundle.item_ids[rows].tolist()}


def recommend(client, **body):
    answer = client.post("/recommend", json={"user_id": "u", "use_stored_history": False,
                                             **body})
    assert answer.status_code == 200, answer.text
    return answer.json()


def two_topic_history(bundle) -> list[str]:
    return topic_items(bundle, "topic-2")[:4] + topic_items(bundle, "topic-7")[:4]


def test_rows_are_named_coherent_interests_of_the_history(client, bundle):
    history = two_topic_history(bundle)
    body = recommend(client, history=history, k=10, rows=4, row_size=5)
    rows, category = body["rows"], category_of(bundle)
    names = [row["name"] for row in rows]
    assert set(names) <= {"topic-2", "topic-7"} and len(names) >= 1
    # the rows share 5 items each by their confidence (ROW_MIN_SIZE 2 at least)
    assert sum(len(row["items"]) for row in rows) == 5 * len(rows)
    sizes = [len(row["items"]) for row in rows]
    assert sizes == sorted(sizes, reverse=True)
    seen: set[str] = set()
    for row in rows:
        assert row["source"] == "category" and row["interest"] == f"category:{row['name']}"
        assert 0 < row["confidence"] <= 1
        items = [i["item_id"] for i in row["items"]]
        assert len(items) >= 2 and all(category[i] == row["name"] for i in items)
        assert not seen & set(items)  # no item in two rows
        seen |= set(items)
        # because: the history items of that interest, most recent first
        assert row["because"] == [i for i in reversed(history) if category[i] == row["name"]]
        # the best items of the interest by the list's score, as an exact filtered search
        assert items == exact_filtered(bundle, history, bundle.fields["category"][row["name"]],
                                       len(items))
        scores = [i["score"] for i in row["items"]]
        assert scores == sorted(scores, reverse=True)


def test_the_list_is_the_same_with_and_without_rows(client, bundle):
    history = two_topic_history(bundle)
    plain = recommend(client, history=history, k=12)
    with_rows = recommend(client, history=history, k=12, rows=3)
    assert plain["rows"] == [] and with_rows["rows"]
    assert with_rows["items"] == plain["items"]
    assert with_rows["interests"] == plain["interests"]


def test_one_taste_gets_one_row(client, bundle):
    history = topic_items(bundle, "topic-4")[:6]
    body = recommend(client, history=history, k=10, rows=4, row_size=5)
    assert [row["name"] for row in body["rows"]] == ["topic-4"]


def test_filters_exclusions_and_availability_apply_to_the_rows(client, bundle):
    history = two_topic_history(bundle)
    first = recommend(client, history=history, k=10, rows=2, row_size=5)
    by_name = {row["name"]: [i["item_id"] for i in row["items"]] for row in first["rows"]}
    assert set(by_name) == {"topic-2", "topic-7"}
    gone, dropped = by_name["topic-2"][0], by_name["topic-7"][0]
    marked = client.post("/items/availability", json={"unavailable": [gone]})
    assert marked.status_code == 200, marked.text
    body = recommend(client, history=history, k=10, rows=2, row_size=5, exclude=[dropped],
                     exclude_seen=True, filter={"include": {"category": ["topic-2"]}})
    assert [row["name"] for row in body["rows"]] == ["topic-2"]  # the filter empties topic-7
    every = [i["item_id"] for i in body["items"]] + \
        [i["item_id"] for row in body["rows"] for i in row["items"]]
    assert gone not in every and dropped not in every and not set(history) & set(every)
    assert all(category_of(bundle)[i] == "topic-2" for i in every)
    client.post("/items/availability", json={"available": [gone]})


def test_the_popularity_fallback_has_no_rows(client):
    body = recommend(client, k=5, rows=3)
    assert body["fallback"] is True and body["rows"] == []


@pytest.mark.parametrize("extra", [{"rows": 11}, {"rows": -1}, {"rows": 2, "row_size": 0},
                                   {"rows": 2, "row_size": 101}, {"rows": 2.0}])
def test_bad_row_requests_are_422s_that_name_the_field(client, extra):
    answer = client.post("/recommend", json={"user_id": "u", "history": ["1"], **extra})
    assert answer.status_code == 422
    assert {d["loc"][-1] for d in answer.json()["detail"]} & {"rows", "row_size"}


@pytest.mark.parametrize("cosine", [0.3, 0.9, 1.0])
def test_near_copy_interests_are_reported_as_one(client_for, bundle, cosine):
    # What the summary reports: interests grouped by copy_groups at INTEREST_MERGE_COSINE,
    # each item credited to its group's kept interest; the list itself as without grouping.
    history = bundle.item_ids[:8].tolist()
    rows = np.arange(8)
    x = np.zeros((1, bundle.manifest.maxlen), dtype=np.int64)
    x[0, -8:] = rows + 1
    interests = bundle.encode(x)[0]
    support = interest_support(interests, np.asarray(bundle.item_vectors)[rows])
    group = copy_groups(interests, support, cosine)
    body = recommend(client_for(interest_merge_cosine=cosine), history=history, k=10)
    reported = [s["merged_into"] if s["merged_into"] is not None else s["interest"]
                for s in body["interests"]]
    assert reported == group.tolist()
    kept = {int(g) for g in group}
    assert {i["interest"] for i in body["items"]} <= kept
    for summary in body["interests"]:
        if summary["interest"] not in kept:
            assert summary["items"] == 0 and summary["weight"] == 0
    assert sum(s["items"] for s in body["interests"]) == 10
    assert np.isclose(sum(s["weight"] for s in body["interests"]), 1.0, atol=1e-3)
    plain = recommend(client_for(interest_merge_cosine=1.0), history=history, k=10)
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in plain["items"]]
