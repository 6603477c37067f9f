"""Data-parallel training across processes: `torchrun --nproc-per-node N -m trainer train`.

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env`
joins the gloo process group (CPU). The training loop stays one loop: every helper here is
the identity for one process, so a plain run computes exactly what it computed before.

* Batches: every rank builds the same epoch order from the same seed and takes every
  world_size-th example of each global batch (`shard`), so the ranks' shards are disjoint
  and their union is the epoch; the global batch stays `batch_size` (per-rank batch =
  batch_size / world_size), so a run is comparable to one process at the same settings.
* Gradients: the loss is computed through DistributedDataParallel's forward (`loss_module`),
  so that backward all-reduces (averages) them; `model.loss` called directly would not.
* Randomness: model initialisation uses the same seed on every rank; negatives and dropout
  use per-rank seeds (`rank_seed`, `seed_rank`), or all ranks would draw the same negatives.
* Decisions: every rank evaluates the same weights, but rank 0's stop decision is broadcast
  every step (`agree`; the time cap is measured per rank), and rank 0's final weights are
  broadcast at the end (`broadcast_state`), so the ranks always stop together.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

BACKEND = "gloo"  # CPU; this trainer has no GPU path
# A rank waits this long in a collective for the others (rank 0 evaluating, say) before
# failing; longer than any validation pass, shorter than gloo's 30-minute default.
TIMEOUT = timedelta(minutes=10)
# How long a finished rank waits for the others to finish writing before leaving the group.
EXIT_TIMEOUT = timedelta(minutes=5)
# Distinct, reproducible seeds per rank; rank 0 keeps the run's seed.
RANK_SEED_STRIDE = 1_000_003


def launched() -> bool:
    """True inside a torchrun worker of a group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; False when not
    launched by torchrun (or with one process), so a plain run never touches
    torch.distributed."""
    if not launched() or active():
        return active()
    dist.init_process_group(BACKEND, timeout=TIMEOUT)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Only rank 0 writes files, prints the report and shows progress."""
    return rank() == 0


def cleanup() -> None:
    """Leave the group together: a rank that tore gloo down while its peer was still writing
    the run (rank 0) aborted at exit now and then ("terminate called without an active
    exception"). monitored_barrier gives up after a while if a peer died, instead of hanging."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a peer is gone (it failed): leave anyway
            dist.monitored_barrier(timeout=EXIT_TIMEOUT)
        dist.destroy_process_group()


def check_batch_size(batch_size: int, world: int | None = None) -> None:
    world = world_size() if world is None else world
    if batch_size % world:
        raise ValueError(f"the batch size ({batch_size}) must be a multiple of the number of "
                         f"processes ({world}): every rank takes an equal share of a batch")


def rank_seed(seed: int, rank_: int | None = None) -> int:
    rank_ = rank() if rank_ is None else rank_
    return seed + RANK_SEED_STRIDE * rank_


def seed_rank(seed: int) -> None:
    """Reseed torch's global generator (dropout, MIND's routing logits) per rank after the
    model is built; rank 0 keeps its stream, so one process is unchanged."""
    if rank() != 0:
        torch.manual_seed(rank_seed(seed))


def trim(order: np.ndarray, world: int | None = None) -> np.ndarray:
    """Drop the last len % world examples of a shuffled epoch (fewer than world_size, a
    different few each epoch), so that no rank gets an empty share of the last batch."""
    world = world_size() if world is None else world
    return order[: len(order) - len(order) % world]


def shard(batch: np.ndarray, rank_: int | None = None, world: int | None = None) -> np.ndarray:
    """This rank's share of a global batch: every world-th example from its rank on."""
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    return batch[rank_::world]


class LossForward(nn.Module):
    """model.loss as a forward, so that DistributedDataParallel sees the call and all-reduces
    the gradients of the backward that follows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: object) -> Tensor:
        return self.model.loss(*args)


def loss_module(model: nn.Module) -> nn.Module:
    """The module to call for the training loss: DDP around model.loss when distributed.

    Build it after the embedding's `sparse` flag is final: DDP reads it at construction.
    DDP also broadcasts rank 0's initial weights."""
    forward = LossForward(model)
    if not active():
        return forward
    # Buffers (MIND's routing logits, item text features) are never trained: synced once at
    # construction, not re-broadcast before every step.
    return DistributedDataParallel(forward, forward_sync_buffers=False)


def agree(choice: str, choices: Sequence[str]) -> str:
    """Rank 0's choice on every rank (a stop reason, say)."""
    if not active():
        return choice
    code = torch.tensor([choices.index(choice)], dtype=torch.int64)
    dist.broadcast(code, src=0)
    return choices[int(code.item())]


def mean(value: float) -> float:
    """The mean of a number over the ranks (the training loss of the global batch)."""
    if not active():
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item()) / world_size()


def broadcast_state(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if not active():
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)
