"""Text-only items: placed by their text at export, in the index and the encoder's table,
marked in items.json, and served (trainer/semantics/text_only.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from service.bundle.load import load_bundle
from service.serving.recommender import Recommender
from trainer.config import TrainConfig
from trainer.data.dataset import TextOnlyItems
from trainer.export import publish_bundle
from trainer.semantics.text_only import fit_text_map
from trainer.training.loop import train

# One unmistakable word per planted topic of the tiny synthetic data (10 topics): texts a
# sentence encoder tells apart, unlike "topic-3" and "topic-7".
WORDS = ("astronomy telescope", "baking bread", "football match", "jazz saxophone",
         "gardening roses", "chess opening", "surfing waves", "oil painting", "poetry sonnet",
         "robot engineering")


def test_ridge_map_recovers_a_linear_relation():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 30)).astype(np.float32)
    truth = rng.normal(size=(30, 8)).astype(np.float32)
    weights, strength = fit_text_map(features, features @ truth + 0.5)
    predicted = np.hstack([features, np.ones((400, 1), np.float32)]) @ weights
    assert np.allclose(predicted, features @ truth + 0.5, atol=0.05)
    assert strength <= 1.0  # noise-free data wants little shrinkage


def with_topic_texts(tiny_dataset):
    """(the tiny dataset with a topic word in every title and one text-only item per topic,
    each item's planted topic)."""
    topic = np.array([int(c.removeprefix("topic-")) if c else 0
                      for c in tiny_dataset.categories])
    titles = np.array([""] + [f"{WORDS[t]} {i}" for i, t in enumerate(topic[1:], 1)],
                      dtype=object)
    new = TextOnlyItems(np.array([f"new-{t}" for t in range(10)], dtype=object),
                        np.array([f"{w} special" for w in WORDS], dtype=object),
                        np.full(10, "", dtype=object), np.full(10, np.nan))
    return dataclasses.replace(tiny_dataset, titles=titles, text_only=new), topic


@pytest.fixture(scope="module")
def text_only_bundle(tiny_dataset, tmp_path_factory):
    """A tiny model without item text (trained long enough for its item vectors to follow the
    topics; new items placed by the ridge map) published with topic texts and one text-only
    item per topic."""
    cfg = TrainConfig(max_epochs=10, eval_every=10, dim=16, seed=0, item_text=False)
    result = train(tiny_dataset, cfg, progress=False)
    dataset, topic = with_topic_texts(tiny_dataset)
    models = tmp_path_factory.mktemp("models")
    path = publish_bundle(result.model, dataset, dataclasses.replace(cfg, text_only_items=True),
                          {"synthetic": {}}, {}, models, "tiny", progress=False)
    return path, dataset, topic


def test_text_only_items_are_in_the_bundle_and_marked(text_only_bundle):
    path, dataset, _ = text_only_bundle
    items = json.loads((path / "items.json").read_text())
    n = dataset.n_items
    assert items["item_ids"][n:] == [f"new-{t}" for t in range(10)]
    assert items["text_only"] == list(range(n, n + 10))
    bundle = load_bundle(path)
    assert bundle.index.ntotal == n + 10 and bundle.manifest.item_count == n + 10
    assert not bundle.popularity[n:].any()  # no events yet
    assert bundle.manifest.extra["text_only_items"] == 10


def test_new_items_sit_with_their_topic_and_are_served(text_only_bundle):
    path, dataset, topic = text_only_bundle
    bundle = load_bundle(path)
    n = dataset.n_items
    vectors = bundle.item_vectors
    centroids = np.stack([vectors[:n][topic[1:] == t].mean(axis=0) for t in range(10)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    # each new item's vector points at the trained items of its text's topic
    assert (np.argmax(vectors[n:] @ centroids.T, axis=1) == np.arange(10)).all()
    # one length for all (--text-only-length x the rarest fitted items' median), not ridge's
    lengths = np.linalg.norm(vectors[n:], axis=1)
    assert np.allclose(lengths, lengths[0])
    trained = np.linalg.norm(vectors[:n], axis=1)
    assert trained.min() <= lengths[0] <= trained.max()

    recommender = Recommender(bundle)
    history = dataset.item_ids[np.flatnonzero(topic == 3)[:8]].tolist()
    answer = recommender.recommend(history, n + 10)
    assert {f"new-{t}" for t in range(10)} <= set(answer.item_ids)  # in the index, served
    # A history holding a text-only item (a user clicked it) encodes, and it counts.
    clicked = recommender.recommend([*history, "new-3"], 20)
    assert clicked.used_history == len(history) + 1 and clicked.unknown_items == 0
    with_new = bundle.encode(np.array([[0] * 11 + [dataset.item_ids.tolist().index(h)
                                                   for h in history] + [n + 4]]))
    without = bundle.encode(np.array([[0] * 12 + [dataset.item_ids.tolist().index(h)
                                                  for h in history]]))
    assert not np.allclose(with_new, without)  # its vector goes into the interests


def test_new_items_take_the_lists_last_places_by_the_models_score(text_only_bundle):
    from service.serving.recommender import Shaping

    path, dataset, topic = text_only_bundle
    bundle = load_bundle(path)
    recommender = Recommender(bundle)
    history = dataset.item_ids[np.flatnonzero(topic == 3)[:8]].tolist()
    off = recommender.recommend(history, 20, shaping=Shaping(new_item_share=0))
    on = recommender.recommend(history, 20, shaping=Shaping(new_item_share=0.25))  # 5 places
    assert on.new == bundle.is_new[[recommender.internal[i] - 1 for i in on.item_ids]].tolist()
    assert len(on.item_ids) == 20 and sum(on.new) == max(5, sum(off.new))
    # The model's own list keeps its order; the new items it lacked come last, best first.
    kept = [i for i in on.item_ids if i in off.item_ids]
    assert kept == off.item_ids[: len(kept)]
    added = on.item_ids[len(kept):]
    assert added and all(i.startswith("new-") for i in added)
    assert on.scores[len(kept):] == sorted(on.scores[len(kept):], reverse=True)
    everything = recommender.recommend(history, bundle.manifest.item_count,
                                       shaping=Shaping(new_item_share=0))
    new_by_score = [i for i in everything.item_ids if i.startswith("new-")]
    assert added == [i for i in new_by_score if i not in off.item_ids][: len(added)]
    # Exclusions hold for the new places too; a share that rounds to nothing adds none.
    excluded = recommender.recommend(history, 20, exclude=added[:1],
                                     shaping=Shaping(new_item_share=0.25))
    assert added[0] not in excluded.item_ids and sum(excluded.new) == sum(on.new)
    few = recommender.recommend(history, 3, shaping=Shaping(new_item_share=0.1))
    assert few.item_ids == recommender.recommend(history, 3,
                                                 shaping=Shaping(new_item_share=0)).item_ids


def test_a_model_with_item_text_places_new_items_through_its_own_text_path(tiny_dataset):
    from trainer.semantics.text_only import TextPath, text_only_vectors

    dataset, topic = with_topic_texts(tiny_dataset)
    model = train(dataset, TrainConfig(max_epochs=10, eval_every=10, dim=16, seed=0),
                  progress=False).model.eval()
    with torch.no_grad():
        vectors = model.item_vectors().numpy()
        path = TextPath.of(model)
    assert path is not None
    placed = text_only_vectors(dataset, vectors, 0.95, path)
    ridge = text_only_vectors(dataset, vectors, 0.95)
    assert placed.shape == ridge.shape == (10, 16) and not np.allclose(placed, ridge)
    centroids = np.stack([vectors[topic[1:] == t].mean(axis=0) for t in range(10)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    assert (np.argmax(placed @ centroids.T, axis=1) == np.arange(10)).mean() >= 0.8
    assert np.allclose(np.linalg.norm(placed, axis=1), np.linalg.norm(placed[0]))
