"""ESIM's crowd level, after "LLM-Driven Dual-Level Multi-Interest Modeling"
(docs/architecture.md, "ESIM levels").

One sparse user tells an LLM little, and nothing about how fine its interest groups should be.
So the training users are clustered into crowds of similar behaviour (the same representation
as typical users: the mean of the warmed-up model's K interest vectors), and each crowd is
spoken for by one *synthesized user*:

* max-cover: its item list greedily takes the item covering the most not-yet-covered members
  (an item covers a member whose history holds it), up to a prompt budget; when every member is
  covered a new round starts, so the budget is filled with items that speak for many members
  instead of stopping after a handful;
* the labeller sees that list through the same prompt, schema, cache and backends as a typical
  user (so a rerun with the same crowds is answered from the cache), asked for 1..K interests;
* adaptive granularity: interests of one synthesized user whose MiniLM embeddings are
  near-duplicates (cosine >= esim_merge_threshold) are merged, so the number of interests per
  crowd is what the crowd has, not what the prompt allowed;
* propagation: a member inherits each crowd interest that holds at least one item of the
  member's history window (the items the encoder sees); the interest's items in that window
  are what the attention matching looks at. Members that inherit nothing are not supervised.

The result is a `Supervision` for trainer.semantics.esim.objective, whose L_align contrasts a crowd
interest against the other crowds' interests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from trainer.config import TrainConfig
from trainer.data.dataset import SequenceDataset
from trainer.encoders.base import MultiInterestEncoder
from trainer.semantics.esim.objective import Encode, Supervision
from trainer.semantics.esim.typical_users import behaviour_means, last_histories, prompt_items
from trainer.semantics.llm.labellers import Interest, Labeller, label_users

log = logging.getLogger(__name__)


# --- the pure steps -----------------------------------------------------------------------------


def max_cover(member_item_sets: Sequence[Iterable[int]], budget: int) -> list[int]:
    """A synthesized user's items: greedily the item that covers the most members not yet
    covered in this round (ties: more members overall, then the smaller id); when no item
    covers a new member, every member must be covered again (a new round). Stops at `budget`
    items or when every item is taken."""
    holders: dict[int, set[int]] = {}
    for member, items in enumerate(member_item_sets):
        for item in items:
            holders.setdefault(int(item), set()).add(member)
    chosen: list[int] = []
    covered: set[int] = set()
    while len(chosen) < budget and holders:
        best = max(holders, key=lambda item, covered=covered: (
            len(holders[item] - covered), len(holders[item]), -item))
        if not holders[best] - covered:  # every member is covered: the next round
            covered = set()
            continue
        chosen.append(best)
        covered |= holders.pop(best)
    return chosen


def merge_near_duplicates(interests: Sequence[Interest], embeddings: np.ndarray,
                          threshold: float) -> tuple[list[Interest], np.ndarray]:
    """Adaptive granularity: an interest whose embedding has cosine >= threshold with an
    earlier kept one joins it (the union of their items, in order); the merged interest keeps
    the name and description (and embedding) of the member with more items, the earlier on a
    tie. Returns the kept interests and their embeddings."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    kept: list[Interest] = []
    rows: list[int] = []  # the embedding row each kept interest is represented by
    for i, interest in enumerate(interests):
        sims = [float(vectors[r] @ vectors[i]) for r in rows]
        j = int(np.argmax(sims)) if sims else -1
        if j < 0 or sims[j] < threshold:
            kept.append(replace(interest, items=list(interest.items)))
            rows.append(i)
            continue
        items = list(dict.fromkeys([*kept[j].items, *interest.items]))
        if len(interest.items) > len(kept[j].items):
            kept[j], rows[j] = replace(interest, items=items), i
        else:
            kept[j] = replace(kept[j], items=items)
    return kept, np.asarray(embeddings, dtype=np.float32)[rows].reshape(len(rows), -1)


def propagate(histories: np.ndarray, interest_items: Sequence[Collection[int]]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The crowd interests each member inherits: member m gets interest j when its history
    (item ids, 0 = padding) holds at least one of j's items. Returns rows (member, interest,
    positions) sorted by member then interest; positions marks the slots of j's items."""
    maxlen = histories.shape[1]
    members = [np.zeros(0, dtype=np.int64)]
    which = [np.zeros(0, dtype=np.int64)]
    positions = [np.zeros((0, maxlen), dtype=np.float32)]
    for j, items in enumerate(interest_items):
        hit = np.isin(histories, np.fromiter(items, dtype=np.int64)) & (histories > 0)
        rows = np.flatnonzero(hit.any(axis=1))
        members.append(rows)
        which.append(np.full(len(rows), j, dtype=np.int64))
        positions.append(hit[rows].astype(np.float32))
    member, interest = np.concatenate(members), np.concatenate(which)
    order = np.lexsort((interest, member))
    return member[order], interest[order], np.concatenate(positions)[order]


def form_crowds(means: np.ndarray, crowds: int, seed: int) -> np.ndarray:
    """The crowd of each user: k-means over the behavioural means, nearest centroid."""
    crowds = min(crowds, len(means))
    if crowds == 1:
        return np.zeros(len(means), dtype=np.int64)
    kmeans = faiss.Kmeans(means.shape[1], crowds, niter=25, seed=seed, verbose=False)
    kmeans.train(means)
    _, nearest = kmeans.index.search(means, 1)
    return nearest[:, 0].astype(np.int64)


# --- the level ----------------------------------------------------------------------------------


def crowd_level(model: MultiInterestEncoder, dataset: SequenceDataset, cfg: TrainConfig,
                labeller: Labeller, encode: Encode, run_dir: Path | None,
                progress: bool = True) -> tuple[Supervision | None, dict[str, Any]]:
    """Crowds -> synthesized users -> labels -> merged interests -> the members' supervision
    (None when no crowd could be labelled), and the crowd part of the ESIM report."""
    users = dataset.train_users
    histories = last_histories(dataset, users, cfg.maxlen)
    assign = form_crowds(behaviour_means(model, histories), cfg.esim_crowds, cfg.seed + 2)
    crowds = [int(c) for c in np.unique(assign)]  # k-means may leave a centroid empty
    members = [np.flatnonzero(assign == c) for c in crowds]
    synthesized = [np.array(max_cover([set(h[h > 0].tolist()) for h in histories[m]],
                                      cfg.esim_crowd_items), dtype=np.int64) for m in members]
    lists = [prompt_items(dataset, items) for items in synthesized]
    answers, stats = label_users(labeller, lists, progress=progress)
    texts = [i.text() for answer in answers for i in answer or []]
    embedded = iter(encode(texts) if texts else [])

    parts: list[dict[str, Any]] = []
    sup_users: list[int] = []  # train-user row of each supervised member
    owners, protos, slots = [], [], []  # per crowd: its (member, interest) rows
    kept_texts, kept_semantic, kept_crowd = [], [], []
    for c, m, items, listed, answer in zip(crowds, members, synthesized, lists, answers,
                                           strict=True):
        part: dict[str, Any] = {"crowd": c, "members": len(m), "synthesized_items": len(items),
                                "interests_before_merge": len(answer or []),
                                "interests_after_merge": 0, "supervised_members": 0}
        parts.append(part)
        if not answer:
            continue
        vectors = np.stack([next(embedded) for _ in answer])
        merged, vectors = merge_near_duplicates(answer, vectors, cfg.esim_merge_threshold)
        part["interests_after_merge"] = len(merged)
        part["interests"] = [{"name": i.name, "description": i.description,
                              "items": [n + 1 for n in i.items]} for i in merged]
        part["items"] = [it.line() for it in listed]
        member, which, positions = propagate(histories[m], [set(items[i.items].tolist())
                                                            for i in merged])
        # Each interest's size in members, for `python -m trainer report`.
        for interest, count in zip(part["interests"], np.bincount(which, minlength=len(merged)),
                                   strict=True):
            interest["members"] = int(count)
        supervised = np.unique(member)
        owners.append(np.searchsorted(supervised, member) + len(sup_users))
        protos.append(which + len(kept_texts))
        slots.append(positions)
        sup_users += m[supervised].tolist()
        kept_texts += [i.text() for i in merged]
        kept_semantic.append(vectors)
        kept_crowd += [c] * len(merged)
        part["supervised_members"] = len(supervised)

    before = [p["interests_before_merge"] for p in parts]
    after = [p["interests_after_merge"] for p in parts]
    report = {
        "crowds": len(crowds), "training_users": len(users), "source": stats.source,
        "labelled_crowds": sum(1 for a in answers if a),
        "members": [p["members"] for p in parts],
        "synthesized_user_items": [p["synthesized_items"] for p in parts],
        "interests_before_merge": before, "interests_after_merge": after,
        "merged_away": sum(before) - sum(after),
        "supervised_users": len(sup_users),
    }
    log.info("crowd level (%s): %d crowds, %d/%d training users supervised, interests per "
             "synthesized user %s before merging, %s after", stats.source, len(crowds),
             len(sup_users), len(users), before, after)
    if run_dir is not None:
        out = Path(run_dir) / "esim"
        out.mkdir(parents=True, exist_ok=True)
        (out / "crowds.json").write_text(json.dumps(
            [{**p, "source": stats.source} for p in parts], indent=1))
    if not sup_users:
        return None, report
    return Supervision(
        users=users[sup_users], histories=histories[sup_users],
        owner=np.concatenate(owners).astype(np.int64), positions=np.concatenate(slots),
        proto=np.concatenate(protos).astype(np.int64), texts=kept_texts,
        semantic=np.concatenate(kept_semantic).astype(np.float32),
        crowd=np.array(kept_crowd, dtype=np.int64)), report
