"""Synthetic interactions with planted multi-interest structure, at any scale.

Items are split into topic clusters with a Zipf popularity inside each topic. Every user has
`interests_per_user` topics; the sequence stays on its current topic with probability
`stickiness` and otherwise jumps to one of the user's topics. Everything is vectorised, so
1M items / 10M interactions take seconds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from trainer.data.loaders import RawData, _finish


def make_synthetic(
    n_users: int = 2000,
    n_items: int = 2000,
    n_topics: int = 40,
    interests_per_user: int = 4,
    min_len: int = 20,
    max_len: int = 60,
    stickiness: float = 0.5,
    zipf: float = 1.0,
    seed: int = 0,
) -> RawData:
    if not 1 <= interests_per_user <= n_topics:
        raise ValueError("interests_per_user must be in 1..n_topics")
    if n_items < n_topics:
        raise ValueError("need at least one item per topic")
    rng = np.random.default_rng(seed)
    per_topic = n_items // n_topics
    # topic_items[t, r] = the r-th most popular item of topic t; item ids shuffled so that an
    # item's id says nothing about its topic.
    topic_items = rng.permutation(n_topics * per_topic).reshape(n_topics, per_topic)
    popularity = 1.0 / np.arange(1, per_topic + 1) ** zipf
    rank_cdf = np.cumsum(popularity / popularity.sum())

    user_topics = np.argsort(rng.random((n_users, n_topics)), axis=1)[:, :interests_per_user]
    lengths = rng.integers(min_len, max_len + 1, size=n_users)
    total = int(lengths.sum())
    user_of = np.repeat(np.arange(n_users), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])

    # Topic slot per position: a Markov chain that keeps its slot with prob. `stickiness`.
    jump = rng.random(total) >= stickiness
    jump[starts] = True
    slot_at_jump = rng.integers(0, interests_per_user, size=total)
    last_jump = np.maximum.accumulate(np.where(jump, np.arange(total), 0))
    slot = slot_at_jump[last_jump]
    topic = user_topics[user_of, slot]

    rank = np.searchsorted(rank_cdf, rng.random(total), side="right")
    rank = np.minimum(rank, per_topic - 1)
    item = topic_items[topic, rank]
    timestamp = 1_600_000_000 + (np.arange(total) - starts[user_of]) * 60 + user_of

    inter = pd.DataFrame(
        {
            "user_id": pd.Series(user_of).astype(str).radd("u"),
            "item_id": pd.Series(item).astype(str),
            "timestamp": timestamp.astype(np.int64),
        }
    )
    item_ids = topic_items.ravel()
    topic_of_item = np.repeat(np.arange(n_topics), per_topic)
    items = pd.DataFrame(
        {
            "item_id": pd.Series(item_ids).astype(str),
            "title": pd.Series(item_ids).astype(str).radd("item "),
            "categories": pd.Series(topic_of_item).astype(str).radd("topic-"),
        }
    )
    name = f"synthetic-u{n_users}-i{n_items}-t{n_topics}-k{interests_per_user}-s{seed}"
    return _finish(name, "synthetic", inter, items)
