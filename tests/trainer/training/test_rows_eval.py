"""Interest rows measured offline (trainer/training/rows_eval.py): the service's row code on
each evaluated user, against the list at the same size."""

import numpy as np
import torch

from service.serving.row_policy import RowPolicy
from trainer.training.interests import item_clusters
from trainer.training.rows_eval import item_labels, planted_topics, row_measures


def test_row_measures_on_planted_topics(tiny_dataset, tiny_trained):
    cfg, result = tiny_trained
    split = tiny_dataset.eval_split("test", cfg.maxlen)
    model = result.model.eval()
    with torch.no_grad():
        interests = model.encode(torch.from_numpy(split.histories)).interests.numpy()
        items = model.item_vectors().numpy()
    clusters = item_clusters(tiny_dataset.flat, tiny_dataset.offsets, tiny_dataset.train_users,
                             tiny_dataset.n_items)
    measures = row_measures(tiny_dataset, split, interests, items, clusters)
    users = len(split.histories)
    assert all(len(v) == users for v in measures.values())
    rows = measures["rows_per_user"]
    assert ((rows >= 1) & (rows <= 4)).all()  # every user has a history of some topic
    assert np.nanmin(measures["rows_coherence"]) == 1.0  # filled inside their interest
    assert (measures["rows_items"] <= 10 * rows).all()
    # the tiny data plants 4 topics per user; every row is one of them (its history's)
    assert (measures["planted_topics"] <= 4).all()
    assert (measures["rows_planted"] == rows).all()
    assert (measures["two_named_rows"] == (rows >= 2)).all()
    # the list at the rows' size is the list's own top m
    for name in ("rows_recall", "list_recall_at_rows"):
        assert ((measures[name] >= 0) & (measures[name] <= 1)).all()


def test_rows_recall_is_the_union_of_the_rows_against_the_targets(tiny_dataset, tiny_trained):
    cfg, result = tiny_trained
    split = tiny_dataset.eval_split("test", cfg.maxlen)
    # One hand-made interest per user pointing at one item; targets known: recall is counted
    # on the union of the rows only.
    items = np.eye(tiny_dataset.n_items, dtype=np.float32)[:, :16]
    interests = np.zeros((len(split.histories), 1, 16), dtype=np.float32)
    interests[:, 0, 3] = 20.0  # every user puts (nearly) all its mass on item row 3
    policy = RowPolicy(rows=1, size=1, min_support=1)
    measures = row_measures(tiny_dataset, split, interests, items, None, policy)
    labels = item_labels(tiny_dataset)
    topic_of_3 = labels.values[labels.offsets[3]]
    for u, targets in enumerate(split.targets):
        history = split.histories[u][split.histories[u] > 0] - 1
        holds = topic_of_3 in labels.values[labels.offsets[history]]
        if holds:  # the one-item row inside item 3's topic is item 3 itself
            assert measures["rows_recall"][u] == np.isin(targets, [4]).mean()
        assert measures["rows_items"][u] == 1
    assert np.isnan(measures["rows_minority_recall"]).all()  # no clusters given
    assert planted_topics(tiny_dataset, split, labels) is not None
