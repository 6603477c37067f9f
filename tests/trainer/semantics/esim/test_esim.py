"""ESIM: typical users, semantic encoding, vocabulary, matching and losses, and what an ESIM
run changes (the encoder) and does not change (the exported graph's interface)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from service.bundle.format import ESIM_LABEL_FIELD
from service.bundle.load import load_bundle
from service.serving.recommender import Recommender, Shaping
from service.serving.row_policy import RowPolicy
from trainer.cli import main as cli_main
from trainer.config import TrainConfig
from trainer.encoders.registry import build_encoder
from trainer.export import export_onnx, publish_bundle
from trainer.semantics.esim.objective import EsimObjective
from trainer.semantics.esim.setup import prepare_esim
from trainer.semantics.esim.typical_users import select_typical_users
from trainer.semantics.esim.vocabulary import interest_vocabulary
from trainer.semantics.llm.labellers import METADATA_SOURCE, MetadataLabeller
from trainer.training.loop import evaluate_model, train


def test_typical_users_are_distinct_training_users_nearest_their_centroids(tiny_dataset,
                                                                           tiny_trained):
    cfg, result = tiny_trained
    cfg = replace(cfg, esim_clusters=5, esim_users_per_cluster=3)
    typical = select_typical_users(result.model, tiny_dataset, cfg)
    assert len(typical.users) == 15 and len(set(typical.users.tolist())) == 15
    assert set(typical.users.tolist()) <= set(tiny_dataset.train_users.tolist())
    assert sorted(np.bincount(typical.clusters).tolist()) == [3, 3, 3, 3, 3]
    # The histories are those users' most recent items, right-aligned.
    user = typical.users[0]
    seq = tiny_dataset.sequence(user)[-cfg.maxlen:]
    assert typical.histories[0][-len(seq):].tolist() == seq.tolist()


def test_sentence_encoder_puts_related_interests_together(sentence_encoder):
    vectors = sentence_encoder.encode([
        "Comedy: funny films that make you laugh",
        "Humour: comedic movies full of jokes",
        "War: films about battles and soldiers",
    ])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_vocabulary_groups_identical_interests(sentence_encoder):
    texts = ["Comedy: funny", "Comedy: funny", "War: battles", "War: battles", "Jazz: music"]
    labels = interest_vocabulary(sentence_encoder.encode(texts), size=3, seed=0)
    assert labels[0] == labels[1] and labels[2] == labels[3]
    assert len({labels[0], labels[2], labels[4]}) == 3


def test_attention_matching_picks_the_interest_covering_the_items():
    cfg = TrainConfig(interests=3, dim=8, maxlen=4)
    positions = np.array([[0, 0, 1, 1], [1, 1, 0, 0]], dtype=np.float32)
    objective = EsimObjective(cfg, np.ones((1, 4), dtype=np.int64), np.array([0, 0]), positions,
                              np.eye(2, 384, dtype=np.float32), np.array([0, 1]))
    weights = torch.tensor([[[0.9, 0.9, 0.0, 0.1],    # interest 0 covers slots 0-1
                             [0.1, 0.1, 0.1, 0.1],
                             [0.0, 0.0, 0.9, 0.8]]])  # interest 2 covers slots 2-3
    assert objective.match(torch.zeros(1, 3, 8), weights).tolist() == [2, 0]


@pytest.mark.parametrize("matching", ["attention", "similarity"])
def test_esim_losses_reach_the_encoder(tiny_dataset, tiny_trained, sentence_encoder, matching):
    cfg, result = tiny_trained
    cfg = replace(cfg, esim=True, llm="metadata", esim_clusters=4, esim_users_per_cluster=2,
                  esim_matching=matching, esim_alpha=1.0, esim_beta=1.0)
    model = build_encoder(tiny_dataset.n_items, cfg)
    model.load_state_dict(result.model.state_dict())
    objective, report = prepare_esim(model, tiny_dataset, cfg, MetadataLabeller(4), None,
                                     progress=False, encoder=sentence_encoder)
    assert report["source"] == METADATA_SOURCE and report["labelled_users"] == 8
    model.train()
    loss, parts = objective.loss(model)
    assert loss.item() > 0 and parts["align"] > 0 and parts["pred"] > 0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert objective.heads.projection.weight.grad.abs().sum() > 0


def test_esim_at_zero_weights_reproduces_the_plain_run_exactly(tiny_dataset, tmp_path):
    """ESIM draws from its own random streams: switched on with zero loss weights, every
    evaluation and every training loss of the plain run come out bit for bit."""
    base = TrainConfig(max_epochs=4, eval_every=2, patience=100, dim=16, seed=0)
    plain = train(tiny_dataset, base, progress=False)
    zero_cfg = replace(base, esim=True, llm="metadata", esim_clusters=4,
                       esim_users_per_cluster=2, esim_warmup_epochs=1.0, esim_alpha=0.0,
                       esim_beta=0.0)

    def setup(model):
        return prepare_esim(model, tiny_dataset, zero_cfg, MetadataLabeller(4), tmp_path,
                            progress=False)

    zero = train(tiny_dataset, zero_cfg, progress=False, esim_setup=setup)
    assert 0 < zero.esim["start_step"] < zero.steps == plain.steps
    assert len(plain.curve) >= 4 and plain.curve[-1]["step"] > zero.esim["start_step"]
    keys = [k for k in plain.curve[0] if not k.startswith("esim_")]
    assert [[p[k] for k in keys] for p in zero.curve] == [[p[k] for k in keys]
                                                          for p in plain.curve]
    # the last weights are the plain run's too (selection restarts at ESIM's start, so the
    # chosen step may differ; the trajectory may not)
    if zero.best_step == plain.best_step:
        assert all(torch.equal(v, plain.model.state_dict()[k])
                   for k, v in zero.model.state_dict().items())


def test_esim_run_changes_the_encoder_but_not_its_exported_interface(tiny_dataset, tmp_path):
    base = TrainConfig(max_epochs=3, eval_every=10, dim=16, seed=0)
    plain = train(tiny_dataset, base, progress=False)
    again = train(tiny_dataset, base, progress=False)
    esim_cfg = replace(base, esim=True, llm="metadata", esim_clusters=4,
                       esim_users_per_cluster=2, esim_warmup_epochs=1.0, esim_beta=1.0)

    def setup(model):
        return prepare_esim(model, tiny_dataset, esim_cfg, MetadataLabeller(4), tmp_path,
                            progress=False)

    esim = train(tiny_dataset, esim_cfg, progress=False, esim_setup=setup)
    same = [torch.equal(plain.model.state_dict()[k], again.model.state_dict()[k])
            for k in plain.model.state_dict()]
    assert all(same)  # deterministic: any difference below comes from ESIM
    changed = [k for k, v in esim.model.state_dict().items()
               if not torch.equal(v, plain.model.state_dict()[k])]
    assert "item_embedding.weight" in changed and len(changed) >= 2
    assert set(esim.model.state_dict()) == set(plain.model.state_dict())  # no heads inside
    assert esim.esim["start_step"] > 0 and esim.esim["labelled_users"] == 8
    assert (tmp_path / "esim" / "typical_users.json").exists()

    def interface(path):
        graph = onnx.load(str(path)).graph
        return ([(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                  v.type.tensor_type.elem_type) for v in graph.input],
                [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                  v.type.tensor_type.elem_type) for v in graph.output])

    export_onnx(plain.model, tmp_path / "plain.onnx")
    export_onnx(esim.model, tmp_path / "esim.onnx")
    assert interface(tmp_path / "plain.onnx") == interface(tmp_path / "esim.onnx")

    # What naming ships: the vocabulary's labels (named after the labeller's interests), the
    # projection g, a threshold calibrated on the supervised users; none without ESIM.
    naming = esim.naming
    assert plain.naming is None and naming is not None
    vocabulary = json.loads((tmp_path / "esim" / "vocabulary.json").read_text())
    assert len(naming.names) == len(vocabulary) and sum(naming.sizes) == sum(
        len(texts) for texts in vocabulary.values())
    assert all(name.startswith("topic-") for name in naming.names)  # the metadata labeller's
    assert naming.projection.shape == (384, 16) and naming.vocabulary.shape[1] == 384
    assert np.allclose(np.linalg.norm(naming.vocabulary, axis=1), 1.0, atol=1e-5)
    assert naming.calibration["rows"] == esim.esim["semantic_interests"]
    assert -1.0 <= naming.min_confidence <= 1.0
    assert esim.esim["naming"]["labels"] == len(naming.names)

    # Published and served: every interest carries a vocabulary name (or none) and the
    # cosine it was judged by; the names match what the trainer computes from g.
    test = evaluate_model(esim.model, tiny_dataset.eval_split("test", 20))
    bundle = publish_bundle(esim.model, tiny_dataset, esim_cfg, {"synthetic": {}},
                            {"test": test}, tmp_path / "models", "named", progress=False,
                            naming=naming)
    served = Recommender(load_bundle(bundle))
    history = tiny_dataset.sequence(int(tiny_dataset.test_users[0]))[-20:]
    answer = served.recommend(tiny_dataset.item_ids[history].tolist(), 10,
                              shaping=Shaping(min_name_confidence=-1.0))  # name them all
    with torch.no_grad():
        interests = esim.model(torch.from_numpy(history[None]))[0].numpy()
    z = interests @ naming.projection.T + naming.bias
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    expected = [naming.names[i] for i in (z @ naming.vocabulary.T).argmax(axis=1)]
    assert [d.name for d in answer.interest_details] == expected
    assert all(d.confidence is not None for d in answer.interest_details)

    # ESIM's item labels ship as an item field: every labelled item (a supervised user's
    # item at one of its interests' slots) holds its labels' names; rows can come from them.
    assert naming.item_labels and all(rows for rows in naming.item_labels.values())
    labels = served.bundle.fields[ESIM_LABEL_FIELD]
    shipped = {int(row) + 1 for rows in labels.values() for row in rows}
    assert shipped == set(naming.item_labels)
    for item, rows in naming.item_labels.items():
        held = {name for name, posting in labels.items() if item - 1 in posting.tolist()}
        assert held == {naming.names[r] for r in rows}
    labelled = [int(i) for i in history if int(i) in naming.item_labels]
    with_rows = served.recommend(
        tiny_dataset.item_ids[history].tolist(), 10,
        shaping=Shaping(rows=RowPolicy(rows=3, min_support=1), row_fields=(ESIM_LABEL_FIELD,)))
    assert with_rows.item_ids == answer.item_ids  # the list does not change with rows
    if labelled:
        assert with_rows.rows and all(r.interest.field == ESIM_LABEL_FIELD
                                      for r in with_rows.rows)
        assert all(set(r.rows) <= set(labels[r.interest.name].tolist())
                   for r in with_rows.rows)


def test_warmup_longer_than_training_is_refused(tiny_dataset):
    cfg = TrainConfig(max_epochs=1, dim=16, esim=True, llm="metadata", esim_warmup_epochs=2.0)
    with pytest.raises(ValueError, match="warm-up"):
        train(tiny_dataset, cfg, progress=False, esim_setup=lambda m: None)


def test_cli_records_esim_settings_and_llm_statistics(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli_main(["train", "--dataset", "synthetic", "--synthetic",
                     "users=300,items=200,topics=10,min_len=10,max_len=20", "--epochs", "3",
                     "--eval-every", "10", "--dim", "16", "--no-progress", "--run-dir", str(run),
                     "--esim", "--llm", "metadata", "--esim-clusters", "3",
                     "--esim-users-per-cluster", "2", "--llm-budget", "5", "--esim-beta", "0.5"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == json.loads((run / "metrics.json").read_text())
    esim = report["esim"]
    assert esim["settings"]["llm"] == "metadata" and esim["settings"]["esim_beta"] == 0.5
    assert esim["settings"]["esim_llm_budget"] == 5
    assert esim["typical_users"] == 5  # 3 x 2 capped by the budget
    assert esim["llm"]["source"] == METADATA_SOURCE and esim["llm"]["users"] == 5
    assert report["config"]["esim"] is True
    labelled = json.loads((run / "esim" / "interests.json").read_text())
    assert labelled and all(u["source"] == METADATA_SOURCE for u in labelled)
    assert all(i["name"].startswith("topic-") for u in labelled for i in u["interests"])


def test_cli_without_esim_records_null(tmp_path, capsys):
    code = cli_main(["train", "--dataset", "synthetic", "--synthetic",
                     "users=300,items=200,topics=10,min_len=10,max_len=20", "--epochs", "1",
                     "--eval-every", "10", "--dim", "16", "--no-progress", "--run-dir",
                     str(tmp_path / "run")])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["esim"] is None


SYNTHETIC_ARGS = ["train", "--dataset", "synthetic", "--synthetic",
                  "users=300,items=200,topics=10,min_len=10,max_len=20", "--epochs", "2",
                  "--eval-every", "10", "--dim", "16", "--no-progress", "--esim",
                  "--esim-clusters", "2", "--esim-users-per-cluster", "2"]


def test_cli_trains_with_an_openai_compatible_endpoint(tmp_path, capsys):
    from tests.trainer.semantics.llm.test_llm import ChatServer

    server = ChatServer()  # answers every prompt with two valid interests
    try:
        code = cli_main([*SYNTHETIC_ARGS, "--llm", "openai", "--llm-base-url", server.url,
                         "--llm-model", "served-model", "--llm-cache", str(tmp_path / "cache"),
                         "--run-dir", str(tmp_path / "run")])
        assert code == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert len(server.requests) == 4 and server.requests[0]["model"] == "served-model"
        llm = report["esim"]["llm"]
        assert llm["source"] == "llm" and llm["backend"].startswith("openai:served-model@")
        assert (llm["users"], llm["labelled"], llm["calls"], llm["cached"]) == (4, 4, 4, 0)
        assert report["esim"]["semantic_interests"] == 8
    finally:
        server.close()


def test_cli_fails_clearly_when_no_user_can_be_labelled(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLM_MAX_RETRIES", "0")
    code = cli_main([*SYNTHETIC_ARGS, "--llm", "openai", "--llm-base-url",
                     "http://127.0.0.1:9/v1", "--llm-cache", str(tmp_path / "cache"),
                     "--run-dir", str(tmp_path / "run")])
    assert code == 1
    err = capsys.readouterr().err
    assert "no typical user could be labelled" in err and "connection failed" in err
