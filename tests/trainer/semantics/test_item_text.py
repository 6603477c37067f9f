"""Item-text features (--item-text): the sentences, the cached MiniLM table, the model's
text component, and export folding it into a plain item table."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from service.bundle.format import SEMANTIC_DIM
from trainer.config import TrainConfig
from trainer.encoders.registry import build_encoder
from trainer.export import check_parity, export_onnx, parity_inputs
from trainer.semantics.item_text import (
    item_sentence,
    item_sentences,
    item_text_features,
    shuffled_rows,
)


class CountingEncoder:
    """Stands in for MiniLM: a distinct unit vector per text, and a count of the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        rng = np.random.default_rng(abs(hash(tuple(texts))) % 2**32)
        vectors = rng.standard_normal((len(texts), SEMANTIC_DIM)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_item_sentence_leaves_out_missing_parts():
    assert item_sentence("Toy Story", 1995.0, "Animation|Comedy") == \
        "Toy Story (1995). Animation, Comedy"
    assert item_sentence("Heat", float("nan"), "") == "Heat"
    assert item_sentence("", float("nan"), "Drama") == ". Drama"


def test_features_are_cached_by_text_and_items_without_text_get_zeros(tiny_dataset, tmp_path):
    dataset = dataclasses.replace(tiny_dataset, titles=tiny_dataset.titles.copy(),
                                  categories=tiny_dataset.categories.copy())  # not the fixture's
    dataset.titles[2] = ""
    dataset.categories[2] = ""  # item 2: no text at all
    encoder = CountingEncoder()
    table = item_text_features(dataset, encoder, cache_dir=tmp_path)
    assert table.shape == (dataset.n_items + 1, SEMANTIC_DIM) and encoder.calls == 1
    assert not table[0].any() and not table[2].any()  # padding and the text-less item
    assert np.allclose(np.linalg.norm(table[[1, 3]], axis=1), 1.0, atol=1e-5)
    again = item_text_features(dataset, encoder, cache_dir=tmp_path)
    assert encoder.calls == 1 and np.array_equal(again, table)  # served from the cache
    dataset.titles[1] = "a different title"  # another text is another cache entry
    item_text_features(dataset, encoder, cache_dir=tmp_path)
    assert encoder.calls == 2 and len(list(tmp_path.glob("*.npy"))) == 2
    assert len(item_sentences(dataset)) == dataset.n_items


def test_the_cache_folder_comes_from_the_environment_and_an_unwritable_one_only_warns(
        tiny_dataset, tmp_path, monkeypatch, caplog):
    from trainer.semantics.item_text import CACHE_DIR_ENV

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    table = item_text_features(tiny_dataset, CountingEncoder())
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # mkdir fails here even for root
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocked / "cache"))
    encoder = CountingEncoder()
    assert np.array_equal(item_text_features(tiny_dataset, encoder), table)
    assert encoder.calls == 1 and CACHE_DIR_ENV in caplog.text


def text_model(n_items: int, backbone: str = "transformer-sa"):
    torch.manual_seed(0)
    model = build_encoder(n_items, TrainConfig(backbone=backbone, dim=16, item_text=True))
    with torch.no_grad():
        model.item_text[1:] = torch.randn(n_items, SEMANTIC_DIM)
    return model.eval()


def test_similar_texts_give_similar_item_vectors_and_padding_stays_zero():
    model = text_model(40)
    with torch.no_grad():
        model.item_embedding.weight.zero_()  # text alone decides
        model.item_text[5] = model.item_text[4]
        vectors = model.embed_items(torch.tensor([0, 4, 5, 6]))
    assert not vectors[0].any()
    assert torch.allclose(vectors[1], vectors[2]) and not torch.allclose(vectors[1], vectors[3])
    assert torch.allclose(model.item_vectors()[3], vectors[1])  # row i - 1 = internal id i


def test_text_gets_gradients_through_the_projection():
    model = text_model(40).train()
    items = torch.randint(1, 41, (4, model.maxlen))
    model.loss(items, torch.randint(1, 41, (4,))).backward()
    assert model.text_projection.weight.grad.abs().sum() > 0
    assert model.item_text.grad is None  # the features themselves stay fixed


@pytest.mark.parametrize("backbone", ["transformer-sa", "mind"])
def test_folding_keeps_every_output_and_exports_a_plain_table(backbone, tiny_dataset, tmp_path):
    model = text_model(tiny_dataset.n_items, backbone)
    histories = torch.from_numpy(tiny_dataset.eval_split("test", model.maxlen).histories)
    with torch.no_grad():
        before_items, before_interests = model.item_vectors().clone(), model(histories)
        model.fold_item_text()
        assert model.text_projection is None and "item_text" not in model.state_dict()
        assert torch.allclose(model.item_vectors(), before_items, atol=1e-6)
        assert torch.allclose(model(histories), before_interests, atol=1e-5)
    path = tmp_path / "encoder.onnx"
    export_onnx(model, path)
    assert check_parity(model, path, parity_inputs(model, histories.numpy())) <= 1e-4
    # The graph holds the [N + 1, d] item table and nothing of the 384-wide text.
    shapes = [tuple(t.dims) for t in onnx.load(str(path)).graph.initializer]
    assert (tiny_dataset.n_items + 1, 16) in shapes
    assert not any(SEMANTIC_DIM in shape for shape in shapes)


def test_a_text_model_round_trips_through_its_state_dict(tiny_dataset):
    model = text_model(tiny_dataset.n_items)
    again = build_encoder(tiny_dataset.n_items, TrainConfig(dim=16, item_text=True))
    again.load_state_dict(model.state_dict())  # what load_checkpoint does
    assert torch.equal(again.item_text, model.item_text)
    assert torch.allclose(again.eval().item_vectors(), model.item_vectors())


def test_shuffled_control_permutes_texts_among_items():
    rng = np.random.default_rng(1)
    table = np.concatenate([np.zeros((1, 8)), rng.normal(size=(50, 8))]).astype(np.float32)
    shuffled = shuffled_rows(table, seed=0)
    assert shuffled.shape == table.shape and not shuffled[0].any()  # padding stays zero
    # the same texts (rows), each once: a permutation
    assert sorted(map(tuple, shuffled[1:].tolist())) == sorted(map(tuple, table[1:].tolist()))
    moved = ~np.all(shuffled[1:] == table[1:], axis=1)
    assert moved.mean() > 0.9  # items mostly carry another item's text
    assert np.array_equal(shuffled_rows(table, seed=0), shuffled)  # seeded
    assert not np.array_equal(shuffled_rows(table, seed=1), shuffled)


def test_minilm_encodes_in_length_order_and_answers_in_the_callers_order(sentence_encoder):
    # Batches are formed by token length (less padding); the rows still follow the input.
    texts = ["Heat (1995). Action, Crime, Thriller", "Up", "a much longer title " * 6, "Up",
             "Toy Story (1995). Adventure, Animation, Children, Comedy, Fantasy"]
    together = sentence_encoder.encode(texts, batch_size=2)
    alone = np.concatenate([sentence_encoder.encode([t]) for t in texts])
    cosine = together @ alone.T  # bfloat16 on CPUs that have it: equal up to rounding
    assert (np.diag(cosine) > 0.9999).all()
    assert cosine[0, 0] > cosine[0, 1:].max() + 0.01  # row 0 is the first text's, not another's
    assert cosine[1, 3] > 0.9999 and cosine[0, 1] < 0.9
    assert sentence_encoder.encode([]).shape == (0, SEMANTIC_DIM)
