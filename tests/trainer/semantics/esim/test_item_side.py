"""ESIM on the item side (L_item) and the shuffled-label control: which items are labelled,
what the loss rewards, that it moves the item table, and that the control really permutes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trainer.cli import main as cli_main
from trainer.config import TrainConfig
from trainer.encoders.registry import build_encoder
from trainer.semantics.esim.objective import (
    EsimObjective,
    Supervision,
    labelled_items,
    shuffle_semantics,
)
from trainer.semantics.llm.labellers import ORACLE_SOURCE


def test_labelled_items_are_the_items_at_each_interests_slots_once_each():
    histories = np.array([[0, 7, 8, 9],
                          [5, 7, 6, 0]])
    owner = np.array([0, 0, 1])
    positions = np.array([[0, 1, 1, 0],    # user 0, interest 3: items 7, 8
                          [0, 0, 0, 1],    # user 0, interest 4: item 9
                          [1, 1, 0, 1]],   # user 1, interest 3: items 5, 7 (slot 3 is padding)
                         dtype=np.float32)
    items, protos = labelled_items(histories, owner, positions, np.array([3, 4, 3]))
    assert sorted(zip(items.tolist(), protos.tolist(), strict=True)) == [
        (5, 3), (7, 3), (8, 3), (9, 4)]


def item_objective(labels: list[int], proto_of_items: dict[int, int], dim: int = 8
                   ) -> tuple[EsimObjective, torch.nn.Module]:
    """An objective whose items `proto_of_items` (id -> semantic interest) are labelled, with
    one-hot semantics and g = the identity on the first `dim` coordinates."""
    cfg = TrainConfig(interests=2, dim=dim, maxlen=len(proto_of_items), esim_tau=0.1)
    items = list(proto_of_items)
    histories = np.array([items], dtype=np.int64)
    positions = np.eye(len(items), dtype=np.float32)
    objective = EsimObjective(cfg, histories, np.zeros(len(items), dtype=np.int64), positions,
                              np.eye(len(labels), 384, dtype=np.float32), np.array(labels),
                              proto=np.array([proto_of_items[i] for i in items]))
    with torch.no_grad():
        objective.heads.projection.weight.copy_(torch.eye(384, dim))
        objective.heads.projection.bias.zero_()
    model = build_encoder(max(items), cfg)
    return objective, model


def test_item_loss_rewards_an_item_at_its_interests_semantics():
    objective, model = item_objective([0, 1, 2], {1: 0})
    with torch.no_grad():
        model.item_embedding.weight[1] = torch.eye(8)[0]  # g(item) = semantic interest 0
    at_own = objective.item_align(model).item()
    with torch.no_grad():
        model.item_embedding.weight[1] = torch.eye(8)[2]  # g(item) = another interest's
    assert at_own < 0.01 and objective.item_align(model).item() > 5


def test_item_loss_does_not_push_an_item_from_interests_of_its_own_label():
    objective, model = item_objective([0, 0, 1], {1: 0})  # interests 0 and 1 share a label
    with torch.no_grad():
        model.item_embedding.weight[1] = torch.eye(8)[1]
    # Interest 1 is no negative: the softmax runs over {0 (target), 2} at equal logits.
    assert objective.item_align(model).item() == pytest.approx(math.log(2), abs=1e-5)


def test_item_loss_pulls_items_of_one_interest_together():
    torch.manual_seed(0)
    objective, model = item_objective([0, 1], {1: 0, 2: 0, 3: 1, 4: 1})

    def cosines() -> tuple[float, float]:
        v = torch.nn.functional.normalize(model.item_embedding.weight[1:5].detach(), dim=-1)
        same = (float(v[0] @ v[1]) + float(v[2] @ v[3])) / 2
        other = float((v[[0, 1]] @ v[[2, 3]].T).mean())
        return same, other

    same_before, other_before = cosines()
    optimiser = torch.optim.Adam([*model.parameters(), *objective.parameters()], lr=0.05)
    for _ in range(60):
        optimiser.zero_grad()
        objective.item_align(model).backward()
        optimiser.step()
    same_after, other_after = cosines()
    assert same_after > same_before + 0.2 and other_after < other_before - 0.2


def test_shuffled_labels_move_every_name_and_keep_the_counts():
    n = 12
    sup = Supervision(users=np.arange(n), histories=np.ones((n, 4), np.int64),
                      owner=np.arange(n), positions=np.ones((n, 4), np.float32),
                      proto=np.arange(n), texts=[f"interest {i}" for i in range(n)],
                      semantic=np.eye(n, 384, dtype=np.float32), crowd=np.full(n, -1))
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])
    shuffled, shuffled_labels = shuffle_semantics(sup, labels, seed=0)
    # Every group carries another group's name, embedding and label...
    assert all(a != b for a, b in zip(shuffled.texts, sup.texts, strict=True))
    moved = [shuffled.texts.index(t) for t in sup.texts]
    assert np.array_equal(shuffled.semantic[moved], sup.semantic)
    assert np.array_equal(shuffled_labels[moved], labels)
    assert not np.array_equal(shuffled_labels, labels)
    # ...from the same multiset, and the groups themselves are untouched.
    assert np.array_equal(np.bincount(shuffled_labels), np.bincount(labels))
    assert sorted(shuffled.texts) == sorted(sup.texts)
    assert shuffled.owner is sup.owner and shuffled.positions is sup.positions
    again, _ = shuffle_semantics(sup, labels, seed=0)
    other, _ = shuffle_semantics(sup, labels, seed=1)
    assert again.texts == shuffled.texts and other.texts != shuffled.texts


SYNTH = "users=300,items=200,topics=10,min_len=10,max_len=20"


def run_oracle(tmp_path, capsys, *extra: str) -> dict:
    code = cli_main(["train", "--dataset", "synthetic", "--synthetic", SYNTH, "--epochs", "3",
                     "--eval-every", "2", "--dim", "16", "--no-progress",
                     "--run-dir", str(tmp_path / "-".join(extra or ("plain",))),
                     "--esim", "--llm", "oracle", "--esim-level", "crowd",
                     "--esim-warmup-epochs", "0.5", "--esim-crowds", "4",
                     "--esim-crowd-items", "30", "--esim-item-weight", "1", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_trains_the_item_side_and_its_shuffled_control(tmp_path, capsys):
    real = run_oracle(tmp_path, capsys)
    shuffled = run_oracle(tmp_path, capsys, "--esim-shuffle-labels")
    for report, name, flag in ((real, "plain", False),
                               (shuffled, "--esim-shuffle-labels", True)):
        esim = report["esim"]
        assert esim["source"] == ORACLE_SOURCE and esim["shuffled_labels"] is flag
        assert esim["settings"]["esim_item_weight"] == 1.0
        assert 30 <= esim["labelled_items"] <= 4 * 30
        curve = json.loads((tmp_path / name / "curve.json").read_text())
        assert any(point.get("esim_item", 0) > 0 for point in curve)
    # The same groups are labelled either way: only their names differ.
    assert real["esim"]["labelled_items"] == shuffled["esim"]["labelled_items"]
    vocab = [json.loads((tmp_path / name / "esim" / "vocabulary.json").read_text())
             for name in ("plain", "--esim-shuffle-labels")]
    assert sorted(map(len, vocab[0].values())) == sorted(map(len, vocab[1].values()))


def test_item_weight_is_validated():
    with pytest.raises(ValueError, match="esim_item_weight"):
        TrainConfig(esim_item_weight=-1.0)


def test_shuffled_items_keep_each_interests_item_count_and_break_the_grouping():
    n = 40
    histories = np.arange(1, n + 1, dtype=np.int64)[None]
    protos = np.repeat(np.arange(4), 10)  # items 1-10: interest 0, 11-20: interest 1, ...
    args = (histories, np.zeros(n, dtype=np.int64), np.eye(n, dtype=np.float32),
            np.eye(4, 384, dtype=np.float32), np.arange(4))
    real = EsimObjective(TrainConfig(maxlen=n), *args, proto=protos)
    shuffled = EsimObjective(TrainConfig(maxlen=n, esim_shuffle_items=True), *args,
                             proto=protos)
    assert torch.equal(real.items, shuffled.items)
    assert torch.equal(real.item_proto.bincount(), shuffled.item_proto.bincount())
    assert (real.item_proto != shuffled.item_proto).float().mean() > 0.5
