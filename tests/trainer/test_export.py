import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.bundle.format import ENCODER_INPUT, ENCODER_OUTPUT
from trainer.config import BACKBONES, TrainConfig
from trainer.encoders.registry import build_encoder
from trainer.export import ExportError, build_index, check_parity, export_onnx, parity_inputs


@pytest.mark.parametrize("backbone", BACKBONES)
def test_onnx_matches_pytorch_for_every_backbone(backbone, tiny_dataset, tmp_path):
    torch.manual_seed(0)
    model = build_encoder(tiny_dataset.n_items, TrainConfig(backbone=backbone, dim=16)).eval()
    path = tmp_path / "encoder.onnx"
    export_onnx(model, path)
    real = tiny_dataset.eval_split("test", model.maxlen).histories
    assert check_parity(model, path, parity_inputs(model, real)) <= 1e-4
    # The names the service reads, and a dynamic batch dimension.
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == [ENCODER_INPUT]
    out = session.run([ENCODER_OUTPUT], {ENCODER_INPUT: real[:5]})[0]
    assert out.shape == (5, 1 if backbone == "sasrec" else 4, 16)


def test_parity_check_refuses_a_graph_that_differs(tiny_dataset, tmp_path):
    model = build_encoder(tiny_dataset.n_items, TrainConfig(dim=16)).eval()
    path = tmp_path / "encoder.onnx"
    export_onnx(model, path)
    with torch.no_grad():
        model.heads.weight.add_(0.01)  # the graph on disk no longer matches the model
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_parity(model, path, parity_inputs(model, np.zeros((0, 20), np.int64)))


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_index_reports_measured_recall(kind):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20_000, 16)).astype(np.float32)
    queries = rng.standard_normal((200, 16)).astype(np.float32)
    index, info = build_index(vectors, queries, kind, progress=False)
    assert info["kind"] == kind and index.ntotal == 20_000
    # Recompute the recall the manifest will carry and compare.
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :50]
    _, got = index.search(queries, 50)
    measured = np.mean([len(set(g) & set(e)) / 50 for g, e in zip(got, exact, strict=True)])
    assert info["recall_at_50"] == pytest.approx(measured, abs=1e-6)
    assert measured >= 0.95 or list(info["search_params"].values())[0] in (1024, 256)


def test_auto_index_is_exact_for_small_catalogues():
    vectors = np.eye(8, dtype=np.float32)
    _, info = build_index(vectors, vectors, "auto", progress=False)
    assert info["kind"] == "flat" and info["recall_at_50"] == 1.0
