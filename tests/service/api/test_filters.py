"""Filters in POST /recommend and GET /items/{id}/similar: the best k among the allowed items
(equal to an exact filtered search on the flat tiny bundle), clear 422s, empty answers."""

from __future__ import annotations

import numpy as np
import pytest

from service.bundle.load import load_bundle


@pytest.fixture(params=[1, 64], ids=["alone", "batched"])
def client(client_for, request):
    return client_for(batch_max_size=request.param)


@pytest.fixture
def bundle(models_dir):
    return load_bundle(models_dir / "tiny" / "1")


def rows_of(bundle, ids):
    where = {item: row for row, item in enumerate(bundle.item_ids.tolist())}
    return [where[i] for i in ids]


def exact_filtered(bundle, history, allowed, k):
    """The best k allowed items for a history by their best interest's inner product, with
    no index: what a filtered answer must be."""
    rows = rows_of(bundle, history)[-bundle.manifest.maxlen:]
    x = np.zeros((1, bundle.manifest.maxlen), dtype=np.int64)
    x[0, -len(rows):] = np.array(rows) + 1
    interests = bundle.encode(x)[0]
    best = (np.asarray(bundle.item_vectors) @ interests.T).max(axis=1)
    allowed = np.asarray(sorted(allowed))
    order = allowed[np.argsort(-best[allowed], kind="stable")][:k]
    return bundle.item_ids[order].tolist()


def category_rows(bundle, value):
    return set(bundle.fields["category"][value].tolist())


def recommend(client, **body):
    return client.post("/recommend", json={"user_id": "u", "use_stored_history": False,
                                           **body})


def test_bundle_carries_the_items_categories(bundle):
    categories = bundle.fields["category"]
    assert len(categories) == 10  # the tiny synthetic data's ten topics
    rows = np.concatenate(list(categories.values()))
    assert sorted(rows.tolist()) == list(range(bundle.manifest.item_count))  # one each


def test_include_filter_answers_the_best_allowed_items(client, bundle):
    history = bundle.item_ids[:8].tolist()
    allowed = category_rows(bundle, "topic-3") | category_rows(bundle, "topic-5")
    body = recommend(client, history=history, k=10,
                     filter={"include": {"category": ["topic-3", "topic-5"]}}).json()
    ids = [i["item_id"] for i in body["items"]]
    assert ids == exact_filtered(bundle, history, allowed, 10)
    assert body["fallback"] is False


def test_exclude_and_allow_list_combine(client, bundle):
    history = bundle.item_ids[10:16].tolist()
    allow = bundle.item_ids[::3].tolist()
    allowed = ({rows_of(bundle, [i])[0] for i in allow} - category_rows(bundle, "topic-1"))
    body = recommend(client, history=history, k=15, exclude=allow[:2],
                     filter={"exclude": {"category": ["topic-1"]},
                             "item_ids": [*allow, "no-such-item"]}).json()
    ids = [i["item_id"] for i in body["items"]]
    expected = [i for i in exact_filtered(bundle, history, allowed, 17) if i not in allow[:2]]
    assert ids == expected[:15]


def test_unknown_field_or_value_is_a_422_naming_it(client):
    wrong_field = recommend(client, history=["1"], filter={"include": {"colour": ["red"]}})
    assert wrong_field.status_code == 422
    assert "colour" in str(wrong_field.json()["detail"])
    assert "category" in str(wrong_field.json()["detail"])  # what there is instead
    wrong_value = recommend(client, history=["1"],
                            filter={"exclude": {"category": ["topic-3", "topic-99"]}})
    assert wrong_value.status_code == 422
    detail = wrong_value.json()["detail"]
    assert "topic-99" in detail[0]["msg"] and "topic-3" not in detail[0]["msg"]
    assert detail[0]["loc"] == ["body", "filter", "exclude", "category"]


def test_a_filter_that_allows_nothing_answers_an_empty_list(client, bundle):
    outside = sorted(set(range(bundle.manifest.item_count)) - category_rows(bundle, "topic-2"))
    body = recommend(client, history=bundle.item_ids[:5].tolist(),
                     filter={"include": {"category": ["topic-2"]},
                             "item_ids": bundle.item_ids[outside[:20]].tolist()})
    assert body.status_code == 200
    assert body.json()["items"] == [] and body.json()["fallback"] is False


def test_the_popularity_fallback_respects_the_filter(client, bundle):
    allowed = category_rows(bundle, "topic-4")
    body = recommend(client, k=5, filter={"include": {"category": ["topic-4"]}}).json()
    rows = rows_of(bundle, [i["item_id"] for i in body["items"]])
    assert body["fallback"] is True and len(rows) == 5 and set(rows) <= allowed
    popularity = np.asarray(bundle.popularity)
    best = sorted(allowed, key=lambda r: -popularity[r])[:5]
    assert sorted(popularity[rows].tolist()) == sorted(popularity[best].tolist())


# --- similar items ---------------------------------------------------------------------------


def exact_similar(bundle, item_row, allowed, k):
    vectors = np.asarray(bundle.item_vectors)
    scores = vectors @ vectors[item_row]
    rows = np.array(sorted(set(allowed) - {item_row}))
    return bundle.item_ids[rows[np.argsort(-scores[rows], kind="stable")][:k]].tolist()


def test_similar_items_are_the_exact_nearest_neighbours(client, bundle):
    item = bundle.item_ids[7]
    body = client.get(f"/items/{item}/similar", params={"k": 12}).json()
    ids = [i["item_id"] for i in body["items"]]
    assert item not in ids
    assert ids == exact_similar(bundle, 7, range(bundle.manifest.item_count), 12)
    assert body["model_version"] == 1


def test_similar_items_respect_filters(client, bundle):
    item = bundle.item_ids[3]
    allowed = category_rows(bundle, "topic-6") - category_rows(bundle, "topic-7")
    body = client.get(f"/items/{item}/similar",
                      params={"k": 8, "include": "category:topic-6",
                              "exclude": "category:topic-7"}).json()
    assert [i["item_id"] for i in body["items"]] == exact_similar(bundle, 3, allowed, 8)


def test_similar_items_of_an_unknown_item_is_a_404_naming_it(client):
    answer = client.get("/items/no-such-item/similar")
    assert answer.status_code == 404 and "no-such-item" in answer.json()["detail"]
    bad = client.get("/items/1/similar", params={"include": "colour:red"})
    assert bad.status_code == 422 and "colour" in str(bad.json()["detail"])
    malformed = client.get("/items/1/similar", params={"include": "category"})
    assert malformed.status_code == 422
    assert malformed.json()["detail"][0]["loc"] == ["query", "include", 0]
