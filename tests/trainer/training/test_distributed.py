"""Data-parallel training (trainer/training/distributed.py): two gloo processes on loopback really
exchange gradients, and `torchrun --nproc-per-node 2 -m trainer train` writes one run."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.config import TrainConfig
from trainer.data.dataset import build_dataset
from trainer.data.synthetic import make_synthetic
from trainer.encoders.registry import build_encoder
from trainer.training import distributed
from trainer.training.loop import LogUniformSampler, train

TINY = dict(n_users=200, n_items=150, n_topics=10, min_len=10, max_len=20, seed=0)
SYNTH = "users=200,items=150,topics=10,min_len=10,max_len=20"
GLOBAL_BATCH = 16
# comirec-sa with a full softmax: one loss term per example, so the average of the two
# ranks' mean losses is the mean loss of the union batch. transformer-sa with sampled
# negatives: the sparse embedding gradients and per-rank negatives.
STEP_CONFIGS = {
    # float32 products: the union-batch check below compares to 1e-6, finer than bfloat16.
    "comirec-sa-full": TrainConfig(backbone="comirec-sa", dim=16, loss="full",
                                   score_dtype="float32"),
    "transformer-sa-sampled": TrainConfig(backbone="transformer-sa", dim=16, loss="sampled",
                                          negatives_per_example=2),
}
TRAIN_CONFIG = TrainConfig(max_epochs=2, eval_every=3, dim=16, seed=0, batch_size=32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def sgd_step(objective: torch.nn.Module, model: torch.nn.Module, data, users, positions,
             batch: np.ndarray, cfg: TrainConfig) -> None:
    """One SGD step of the training loss on `batch` (plain SGD: the parameter change is the
    gradient itself, so equal parameters mean equal gradients)."""
    negatives = None
    if cfg.loss == "sampled":
        generator = torch.Generator().manual_seed(distributed.rank_seed(0))
        negatives = LogUniformSampler(data.popularity()).sample(
            cfg.negatives_per_example * GLOBAL_BATCH, generator)
    histories = torch.from_numpy(data.histories(users[batch], positions[batch], cfg.maxlen))
    targets = torch.from_numpy(data.flat[data.offsets[users[batch]] + positions[batch]])
    optimiser = torch.optim.SGD(model.parameters(), lr=1.0)
    optimiser.zero_grad()
    objective.train()
    objective(histories, targets, negatives).backward()
    optimiser.step()


def worker(rank: int, port: int, out: str) -> None:
    """One rank: one optimiser step per config (through DDP, on its own data alone, and on
    the union batch without DDP), then a short train(); results saved for the test."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        data = build_dataset(make_synthetic(**TINY))
        saved: dict[str, object] = {}
        for name, cfg in STEP_CONFIGS.items():
            torch.manual_seed(0)
            model = build_encoder(data.n_items, cfg)
            model.item_embedding.sparse = cfg.loss == "sampled"
            alone, union = copy.deepcopy(model), copy.deepcopy(model)
            if model.every_position:
                users, positions = data.train_windows(cfg.maxlen)
            else:
                users, positions = data.train_examples()
            batch = np.random.default_rng(0).permutation(len(users))[:GLOBAL_BATCH]
            mine = distributed.shard(batch)
            sgd_step(distributed.loss_module(model), model, data, users, positions, mine, cfg)
            sgd_step(distributed.LossForward(alone), alone, data, users, positions, mine, cfg)
            sgd_step(distributed.LossForward(union), union, data, users, positions, batch, cfg)
            saved[name] = {"ddp": flat(model), "alone": flat(alone), "union": flat(union),
                           "initial": flat(build_encoder_seeded(data.n_items, cfg)),
                           "examples": mine}
        result = train(data, TRAIN_CONFIG, progress=False)
        saved["train"] = {"state": result.model.state_dict(), "world_size": result.world_size,
                          "steps": result.steps, "curve": result.curve}
        torch.save(saved, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def build_encoder_seeded(n_items: int, cfg: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder(n_items, cfg)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", list(STEP_CONFIGS))
def test_two_processes_exchange_gradients(ranks, name):
    zero, one = ranks[0][name], ranks[1][name]
    # The ranks trained on different, disjoint examples ...
    assert set(zero["examples"].tolist()).isdisjoint(one["examples"].tolist())
    # ... from the same start, and each moved its parameters ...
    assert torch.equal(zero["initial"], one["initial"])
    assert not torch.equal(zero["ddp"], zero["initial"])
    # ... yet after the step they are identical: the gradients were all-reduced.
    assert torch.equal(zero["ddp"], one["ddp"])
    # Each rank's data alone would have given something else.
    assert not torch.allclose(zero["alone"], one["alone"])
    for rank in (zero, one):
        assert not torch.allclose(rank["ddp"], rank["alone"])


def test_ddp_step_equals_one_process_on_the_union_batch(ranks):
    # Averaged gradients of two halves = the gradient of the whole batch (one loss term per
    # example): the same step as one process with the global batch.
    zero = ranks[0]["comirec-sa-full"]
    assert torch.allclose(zero["ddp"], zero["union"], atol=1e-6)


def test_train_returns_the_same_model_on_every_rank(ranks):
    zero, one = ranks[0]["train"], ranks[1]["train"]
    assert zero["world_size"] == one["world_size"] == 2
    assert zero["steps"] == one["steps"] > 0
    assert zero["state"].keys() == one["state"].keys()
    assert all(torch.equal(zero["state"][k], one["state"][k]) for k in zero["state"])
    # The curve's loss is the mean over the ranks, so both record the same curve.
    assert [p["loss"] for p in zero["curve"]] == [p["loss"] for p in one["curve"]]


def test_shards_are_disjoint_equal_and_cover_the_epoch():
    order = distributed.trim(np.random.default_rng(0).permutation(103), world=2)
    assert len(order) == 102
    for lo in range(0, len(order), 32):
        batch = order[lo : lo + 32]
        shards = [distributed.shard(batch, rank_=r, world=2) for r in range(2)]
        assert len(shards[0]) == len(shards[1]) > 0
        assert sorted(np.concatenate(shards).tolist()) == sorted(batch.tolist())
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        distributed.check_batch_size(127, world=2)


def test_one_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and not distributed.init_from_env()
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.rank_seed(7) == 7  # rank 0 keeps a single process's seed


def test_torchrun_writes_one_run_dir_with_world_size_2(tmp_path):
    env = {**os.environ, "RUNS_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "trainer", "train", "--dataset", "synthetic", "--synthetic", SYNTH,
         "--epochs", "2", "--eval-every", "3", "--batch-size", "32", "--dim", "16",
         "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 prints the report (and logs).
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    report = json.loads(lines[0])
    assert report["train"]["world_size"] == 2
    assert proc.stderr.count("INFO trainer: wrote") == 1
    [run_dir] = (tmp_path / "runs").iterdir()
    assert Path(report["run_dir"]).resolve() == run_dir.resolve()
    assert json.loads((run_dir / "metrics.json").read_text()) == report
    assert (run_dir / "checkpoint.pt").is_file()
    assert json.loads((run_dir / "curve.json").read_text())  # the validation/loss curve
