"""ESIM's crowd level: max-cover, adaptive granularity, propagation, the cache on a rerun, the
crowd-level contrast, and crowd / dual training end to end on small synthetic data."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from trainer.cli import main as cli_main
from trainer.config import TrainConfig
from trainer.semantics.esim.crowd import crowd_level, max_cover, merge_near_duplicates, propagate
from trainer.semantics.esim.objective import EsimObjective
from trainer.semantics.esim.setup import prepare_esim
from trainer.semantics.esim.typical_users import last_histories
from trainer.semantics.llm.cache import ResponseCache
from trainer.semantics.llm.labellers import (
    ORACLE_SOURCE,
    ORACLE_WORDS,
    ChatLabeller,
    Interest,
    OracleLabeller,
)
from trainer.training.loop import train

# --- max-cover ----------------------------------------------------------------------------------

# Members A..E and the items of their histories.
MEMBERS = [{1, 2}, {2, 3}, {3}, {4}, {1, 5}]


def test_max_cover_takes_the_item_covering_most_uncovered_members():
    # 1, 2, 3 each cover two members (tie: the smaller id, 1); then 3 covers B and C where 2
    # covers only B; then 4 (D), although the more popular 2 is left: it covers nobody new.
    assert max_cover(MEMBERS, budget=3) == [1, 3, 4]


def test_max_cover_stops_at_the_budget_and_starts_a_new_round_when_all_are_covered():
    assert max_cover(MEMBERS, budget=1) == [1]
    assert max_cover(MEMBERS, budget=0) == []
    # After 1, 3, 4 everyone is covered: a new round covers A and B again with 2, then E with 5.
    assert max_cover(MEMBERS, budget=10) == [1, 3, 4, 2, 5]  # every item, then it stops


def test_max_cover_breaks_ties_by_popularity_in_the_crowd():
    # 7 and 9 both cover the one uncovered member after 8; 9 is held by more members.
    members = [{8, 9}, {8, 9}, {8}, {7, 9}]
    assert max_cover(members, budget=2) == [8, 9]


# --- adaptive granularity -----------------------------------------------------------------------


def test_merge_near_duplicates_merges_close_interests_and_keeps_distinct_ones():
    interests = [Interest("Comedy", "funny films", [0, 2]),
                 Interest("War", "battles", [1]),
                 Interest("Humour", "jokes", [3, 4, 5]),
                 Interest("Jazz", "music", [6])]
    angle = math.acos(0.9)  # Humour is at cosine 0.9 from Comedy
    vectors = np.array([[1, 0, 0, 0], [0, 1, 0, 0],
                        [math.cos(angle), 0, math.sin(angle), 0], [0, 0, 0, 1]], np.float32)
    merged, kept = merge_near_duplicates(interests, vectors, threshold=0.85)
    # Humour joins Comedy and, holding more items, names the merged interest.
    assert [i.name for i in merged] == ["Humour", "War", "Jazz"]
    assert merged[0].items == [0, 2, 3, 4, 5] and merged[0].description == "jokes"
    assert np.allclose(kept, vectors[[2, 1, 3]])
    assert interests[0].items == [0, 2]  # the inputs are not modified
    # Above their cosine they stay apart.
    assert len(merge_near_duplicates(interests, vectors, threshold=0.95)[0]) == 4


def test_merge_with_real_embeddings_joins_synonyms_only(sentence_encoder):
    interests = [Interest("Comedy", "funny films that make you laugh", [0]),
                 Interest("War", "films about battles and soldiers", [1]),
                 Interest("Humour", "comedic movies full of jokes", [2])]
    vectors = sentence_encoder.encode([i.text() for i in interests])
    merged, _ = merge_near_duplicates(interests, vectors, threshold=0.85)
    assert [(i.name, i.items) for i in merged] == [("Comedy", [0, 2]), ("War", [1])]


def test_oracle_topics_are_never_near_duplicates(sentence_encoder):
    """The oracle's distinct true topics must not be merged by adaptive granularity."""
    texts = [f"topic-{t}: {OracleLabeller.describe(t)}" for t in range(len(ORACLE_WORDS))]
    vectors = sentence_encoder.encode(texts)
    cosine = vectors @ vectors.T
    np.fill_diagonal(cosine, 0)
    assert cosine.max() < TrainConfig().esim_merge_threshold


# --- propagation --------------------------------------------------------------------------------


def test_members_inherit_the_crowd_interests_their_items_fall_in():
    histories = np.array([[0, 0, 1, 2],    # items of interests 0 (1) and 1 (2)
                          [0, 5, 6, 7],    # interest 2 only (7)
                          [0, 0, 0, 9],    # none: not supervised
                          [3, 1, 3, 4]])   # interest 0, twice (1 and 3)
    member, which, positions = propagate(histories, [{1, 3}, {2}, {7, 8}])
    assert list(zip(member.tolist(), which.tolist(), strict=True)) == [
        (0, 0), (0, 1), (1, 2), (3, 0)]
    assert positions.tolist() == [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 0]]


# --- the level on real (synthetic) users --------------------------------------------------------


class CountingChat:
    """A chat backend that groups the listed items by category (an honest fake LLM) and
    counts how often it is asked."""

    model_id = "fake:categories"
    concurrency = 1

    def __init__(self) -> None:
        self.calls = 0

    def chat(self, messages, schema) -> str:
        self.calls += 1
        groups: dict[str, list[int]] = {}
        for n, item in enumerate(schema.items, start=1):
            groups.setdefault(item.categories[0], []).append(n)
        names = sorted(groups, key=lambda c: -len(groups[c]))[: schema.max_interests]
        return json.dumps({"interests": [{"name": c, "description": f"Items about {c}.",
                                          "items": groups[c]} for c in names]})


def test_crowd_labelling_is_served_from_the_cache_on_a_second_run(tiny_dataset, tiny_trained,
                                                                  sentence_encoder, tmp_path):
    cfg, result = tiny_trained
    cfg = replace(cfg, esim=True, esim_level="crowd", esim_crowds=5)
    reports, supervision = [], []
    for _ in range(2):  # two runs, a new labeller each, one cache directory
        backend = CountingChat()
        labeller = ChatLabeller(backend, ResponseCache(tmp_path / "cache"), cfg.interests)
        sup, report = crowd_level(result.model, tiny_dataset, cfg, labeller,
                                  sentence_encoder.encode, None, progress=False)
        reports.append((backend.calls, labeller.stats.calls, labeller.stats.cached, report))
        supervision.append(sup)
    assert reports[0][:3] == (5, 5, 0)
    assert reports[1][:3] == (0, 0, 5)  # every synthesized user's answer came from the cache
    assert reports[0][3] == reports[1][3]
    assert supervision[0].texts == supervision[1].texts


def test_crowd_level_supervises_most_users_with_the_interests_their_items_fall_in(
        tiny_dataset, tiny_trained, sentence_encoder, tmp_path):
    cfg, result = tiny_trained
    cfg = replace(cfg, esim=True, llm="oracle", esim_level="crowd", esim_crowds=4,
                  esim_crowd_items=12)
    sup, report = crowd_level(result.model, tiny_dataset, cfg, OracleLabeller(cfg.interests),
                              sentence_encoder.encode, tmp_path, progress=False)
    train_users = tiny_dataset.train_users
    assert report["crowds"] == 4 and sum(report["members"]) == len(train_users)
    assert report["synthesized_user_items"] == [12] * 4
    assert report["source"] == ORACLE_SOURCE
    assert all(1 <= a <= b <= cfg.interests for a, b in zip(
        report["interests_after_merge"], report["interests_before_merge"], strict=True))
    assert report["supervised_users"] == len(sup.users) > 0.8 * len(train_users)
    topic = np.array([c.split("|")[0] for c in tiny_dataset.categories])
    for row in range(len(sup.owner)):
        history = sup.histories[sup.owner[row]]
        name = sup.texts[sup.proto[row]].split(":")[0]  # "topic-<t>", the oracle's name
        marked = history[sup.positions[row] > 0]
        # The member holds items of that crowd interest; the marked slots are its items.
        assert len(marked) and set(topic[marked]) == {name}
    # The members' histories are their own.
    expected = last_histories(tiny_dataset, sup.users, cfg.maxlen)
    assert np.array_equal(sup.histories, expected)
    written = json.loads((tmp_path / "esim" / "crowds.json").read_text())
    assert len(written) == 4 and all(c["source"] == ORACLE_SOURCE for c in written)


# --- the objective ------------------------------------------------------------------------------


def test_crowd_contrast_uses_other_crowds_as_negatives():
    cfg = TrainConfig(interests=2, dim=8, maxlen=4)
    semantic = np.eye(4, 384, dtype=np.float32)
    crowd = np.array([0, 0, 1, 1])  # interests 0, 1 of crowd 0; 2, 3 of crowd 1
    objective = EsimObjective(cfg, np.ones((1, 4), dtype=np.int64), np.array([0]),
                              np.ones((1, 4), np.float32), semantic, np.array([0, 1, 2, 3]),
                              proto=np.array([0]), crowd=crowd)
    z = torch.from_numpy(semantic[[1]])  # exactly the crowd's own other interest
    # That one is no negative: the softmax runs over {0 (target), 2, 3} at equal logits.
    assert objective.crowd_align(z, torch.tensor([0])).item() == pytest.approx(math.log(3))
    z = torch.from_numpy(semantic[[2]])  # another crowd's interest: a strong negative
    assert objective.crowd_align(z, torch.tensor([0])).item() > 5


def test_objective_samples_a_batch_of_supervised_users(tiny_dataset, tiny_trained):
    cfg, result = tiny_trained
    cfg = replace(cfg, esim_batch_users=8)
    users = tiny_dataset.train_users[:30]
    histories = last_histories(tiny_dataset, users, cfg.maxlen)
    positions = (histories > 0).astype(np.float32)
    objective = EsimObjective(cfg, histories, np.arange(30), positions,
                              np.eye(3, 384, dtype=np.float32), np.array([0, 1, 2]),
                              proto=np.arange(30) % 3, crowd=np.array([0, 1, 2]))
    seen = []
    encode = result.model.encode

    def spy(batch):
        seen.append(batch.shape[0])
        return encode(batch)

    result.model.encode = spy
    try:
        loss, parts = objective.loss(result.model)
        objective.loss(result.model)
    finally:
        del result.model.encode
    assert seen == [8, 8] and torch.isfinite(loss) and parts["align"] > 0
    drawn = [objective.sample_users().tolist() for _ in range(2)]
    assert drawn[0] != drawn[1] and len(set(drawn[0])) == 8


# --- end to end ---------------------------------------------------------------------------------


def test_crowd_level_trains_end_to_end(tiny_dataset, sentence_encoder, tmp_path):
    # ComiRec-SA: one example per target gives enough steps in one epoch of the tiny data
    cfg = TrainConfig(backbone="comirec-sa", max_epochs=1, eval_every=5, dim=16, seed=0,
                      esim=True, llm="oracle", esim_level="crowd", esim_crowds=4,
                      esim_warmup_epochs=0.5, esim_batch_users=32)

    def setup(model):
        return prepare_esim(model, tiny_dataset, cfg, OracleLabeller(cfg.interests), tmp_path,
                            progress=False, encoder=sentence_encoder)

    result = train(tiny_dataset, cfg, progress=False, esim_setup=setup)
    report = result.esim
    assert report["level"] == "crowd" and report["source"] == ORACLE_SOURCE
    assert "typical_users" not in report  # no individual level
    assert report["supervised_users"] == report["crowd"]["supervised_users"] > 150
    assert report["crowd"]["crowds"] == 4 and report["start_step"] == 10
    after = [p for p in result.curve if p["step"] > report["start_step"]]
    assert after and all(p["esim_align"] > 0 and p["esim_pred"] > 0 for p in after)


def test_cli_trains_the_dual_level_with_the_oracle(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli_main(["train", "--dataset", "synthetic", "--synthetic",
                     "users=300,items=200,topics=10,min_len=10,max_len=20", "--epochs", "1",
                     "--eval-every", "5", "--dim", "16", "--no-progress", "--run-dir", str(run),
                     "--esim", "--llm", "oracle", "--esim-level", "dual",
                     "--esim-warmup-epochs", "0.5", "--esim-clusters", "2",
                     "--esim-users-per-cluster", "2", "--esim-crowds", "3",
                     "--esim-crowd-items", "15", "--esim-merge-threshold", "0.9",
                     "--esim-batch-users", "16"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    esim = report["esim"]
    assert esim["level"] == "dual" and esim["source"] == ORACLE_SOURCE
    assert esim["settings"]["esim_level"] == "dual" and esim["settings"]["esim_crowds"] == 3
    assert esim["settings"]["esim_merge_threshold"] == 0.9
    assert esim["typical_users"] == 4 and esim["labelled_users"] == 4
    crowd = esim["crowd"]
    assert crowd["crowds"] == 3 and crowd["synthesized_user_items"] == [15] * 3
    assert len(crowd["interests_before_merge"]) == len(crowd["interests_after_merge"]) == 3
    # Typical users are training users too: the union is at least the crowd level's.
    assert esim["supervised_users"] >= crowd["supervised_users"] > 4
    assert esim["llm"]["users"] == 4 + 3 and esim["llm"]["source"] == ORACLE_SOURCE
    assert (run / "esim" / "crowds.json").exists() and (run / "esim" / "interests.json").exists()


def test_esim_level_is_validated():
    with pytest.raises(ValueError, match="ESIM level"):
        TrainConfig(esim_level="family")
    with pytest.raises(ValueError, match="esim_merge_threshold"):
        TrainConfig(esim_merge_threshold=0.0)
    with pytest.raises(ValueError, match="esim_crowds"):
        TrainConfig(esim_crowds=0)
