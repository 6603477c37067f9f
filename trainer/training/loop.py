"""One training loop for every backbone: sampled (or full) softmax, early stopping on
validation Recall@N (N = 50 unless the catalogue is too small for it), deterministic for a
seed."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.config import FULL_SOFTMAX_MAX_ITEMS, TrainConfig
from trainer.data.dataset import EvalSplit, SequenceDataset
from trainer.encoders.base import MultiInterestEncoder, Negatives
from trainer.encoders.registry import build_encoder
from trainer.training import distributed
from trainer.training.evaluate import Encoder, Search, evaluate_encoder, exact_search
from trainer.training.metrics import CUTOFFS
from trainer.training.timing import Phases, load_average

if TYPE_CHECKING:  # ESIM's imports (transformers, LLM clients) stay out of plain training
    from service.bundle.naming_files import NamingTables
    from trainer.semantics.esim.objective import EsimObjective

# Called once at the end of the warm-up with the warmed-up model: returns the ESIM objective
# and a report (trainer.semantics.esim.setup.prepare_esim with its labeller bound).
EsimSetup = Callable[[MultiInterestEncoder], "tuple[EsimObjective, dict[str, Any]]"]

log = logging.getLogger(__name__)

# The selection metric on a catalogue large enough for it (see selection_cutoff).
SELECTION_METRIC = "recall@50"
# Validations per epoch when cfg.eval_every is 0 (auto).
EVALS_PER_EPOCH = 3
# How often (steps) the progress bar's total and postfix are refreshed between evaluations.
PROGRESS_EVERY = 20
STOP_REASONS = ("max_epochs", "early_stopping", "time_limit")
# Where the cosine learning-rate schedule ends, as a share of --lr.
MIN_LR_FACTOR = 0.01


def selection_cutoff(n_items: int) -> int:
    """N of the Recall@N that selects the model: the largest standard cut-off that is at most
    10% of the catalogue, else a tenth of it. Recall@50 over 50 items is 1.0 for any model, so
    selecting on it would silently keep the first evaluated weights."""
    fitting = [n for n in CUTOFFS if 10 * n <= n_items]
    return max(fitting) if fitting else max(1, n_items // 10)


def selection_metric(n_items: int) -> str:
    return f"recall@{selection_cutoff(n_items)}"


def early_stop_step(step: int, best_step: int | None, eval_every: int, patience: int,
                    esim_start: int | None = None) -> int:
    """The step at which early stopping ends training if validation never improves again.

    `best_step` is the step of the best evaluation so far (None before the first). The next
    evaluation becomes the best when there is none yet; with ESIM only evaluations after its
    start count (selection restarts there)."""
    if best_step is None or (esim_start is not None and best_step <= esim_start):
        after = step if esim_start is None else max(step, esim_start)
        best_step = (after // eval_every + 1) * eval_every
    return best_step + patience * eval_every


def projected_total_steps(step: int, best_step: int | None, *, max_steps: int, eval_every: int,
                          patience: int, esim_start: int | None = None, elapsed_s: float = 0.0,
                          max_minutes: float = math.inf) -> int:
    """Where training will stop if validation does not improve any more: the first of the
    epoch budget, early stopping, and the time cap at the rate measured so far."""
    total = min(max_steps, early_stop_step(step, best_step, eval_every, patience, esim_start))
    if step > 0 and elapsed_s > 0 and math.isfinite(max_minutes):
        total = min(total, math.ceil(max_minutes * 60 * step / elapsed_s))
    return max(total, step)


def uses_full_softmax(model: MultiInterestEncoder, n_items: int) -> bool:
    """loss == "auto": a full softmax on a small catalogue (docs/architecture.md, "Encoders
    and losses"), except where every position scores the catalogue with K interests (K x
    maxlen times a ComiRec step: 2.7x slower per step than 1,280 shared negatives on the
    embedded data, for no measurable gain on validation)."""
    if model.every_position and model.num_interests > 1:
        return False
    return n_items <= FULL_SOFTMAX_MAX_ITEMS


def lr_factor(schedule: str, max_steps: int) -> Callable[[int], float]:
    """The learning rate's multiplier after `step` optimiser steps: 1, or a cosine from 1 down
    to MIN_LR_FACTOR at `max_steps` (the epoch budget)."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (
        1 + math.cos(math.pi * min(step, max_steps) / max_steps))


class LogUniformSampler:
    """Negatives drawn log-uniformly over popularity ranks (TF's log_uniform_candidate_sampler,
    as ComiRec), with log Q(item) for the logQ correction."""

    def __init__(self, popularity: np.ndarray) -> None:
        n = len(popularity) - 1
        self.rank_to_item = torch.from_numpy(np.argsort(-popularity[1:], kind="stable") + 1)
        ranks = torch.arange(n, dtype=torch.float64)
        log_q_by_rank = torch.log((torch.log(ranks + 2) - torch.log(ranks + 1)) / math.log(n + 1))
        self.log_q = torch.zeros(n + 1, dtype=torch.float32)
        self.log_q[self.rank_to_item] = log_q_by_rank.to(torch.float32)
        self.log_range = math.log(n + 1)
        self.n = n

    def sample(self, count: int, generator: torch.Generator) -> Negatives:
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        ranks = (torch.exp(u * self.log_range).floor().long() - 1).clamp_(0, self.n - 1)
        ids = self.rank_to_item[ranks]
        return Negatives(ids=ids, log_q=self.log_q[ids], log_q_table=self.log_q)


@dataclass
class TrainResult:
    model: MultiInterestEncoder
    best_valid: dict[str, float]
    best_step: int
    steps: int
    epochs: float
    seconds: float
    stopped_by: str
    loss_mode: str
    curve: list[dict[str, float]] = field(default_factory=list)
    esim: dict[str, Any] | None = None  # ESIM report (typical users, labels, LLM statistics)
    naming: NamingTables | None = None  # with ESIM: what the bundle needs to name interests
    selection_metric: str = SELECTION_METRIC  # the validation metric that chose the model
    world_size: int = 1  # training processes (torchrun; trainer/training/distributed.py)
    # Wall seconds per loop phase (trainer/training/timing.py) and the load around the run.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    load_average: dict[str, list[float]] = field(default_factory=dict)


def encode_numpy(model: MultiInterestEncoder):
    """The model as a numpy -> numpy encoder for evaluation."""

    def encode(histories: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(histories)).numpy()

    return encode


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def model_search(model: MultiInterestEncoder) -> tuple[Encoder, Search]:
    """The model as (encoder, exact search over its item vectors), numpy in and out."""
    model.eval()
    with torch.no_grad():
        items = model.item_vectors().numpy()
    return encode_numpy(model), exact_search(items)


def evaluate_model(model: MultiInterestEncoder, split: EvalSplit,
                   cutoffs: Sequence[int] = CUTOFFS) -> dict[str, float]:
    return evaluate_encoder(*model_search(model), split, cutoffs)


def train(dataset: SequenceDataset, cfg: TrainConfig, progress: bool = True,
          esim_setup: EsimSetup | None = None) -> TrainResult:
    """IBIM training; with `esim_setup` (needs cfg.esim) the ESIM losses join after the
    warm-up, and only evaluations from then on can be selected as the best model."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    # Per-rank negatives (rank 0's are a single process's); the epoch order below (rng) is
    # the same on every rank, which then takes its own share of each batch.
    generator = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed))
    rng = np.random.default_rng(cfg.seed)

    model = build_encoder(dataset.n_items, cfg)
    if cfg.item_text:
        from trainer.semantics.item_text import item_text_features, shuffled_rows

        table = item_text_features(dataset)
        if cfg.shuffle_item_text:
            table = shuffled_rows(table, cfg.seed)
        model.item_text.copy_(torch.from_numpy(table))
    if model.every_position:  # whole windows, borders moved every epoch
        users, positions = dataset.train_windows(cfg.maxlen)
    else:  # one example per (user, target position)
        users, positions = dataset.train_examples()
    if len(users) == 0:
        raise ValueError("no training examples: every training user has fewer than 5 items")
    full = cfg.loss == "full" or (cfg.loss == "auto" and uses_full_softmax(model, dataset.n_items))
    sampler = None if full else LogUniformSampler(dataset.popularity())
    if full:
        optimisers = [torch.optim.Adam(model.parameters(), lr=cfg.lr)]
    else:
        # With sampled softmax a step touches only the batch's and the negatives' rows: sparse
        # gradients and a lazy Adam on the table (a dense Adam step over a 1M x 64 table costs
        # most of a second on 2 cores).
        model.item_embedding.sparse = True
        table = model.item_embedding.weight
        optimisers = [torch.optim.SparseAdam([table], lr=cfg.lr),
                      torch.optim.Adam([p for p in model.parameters() if p is not table],
                                       lr=cfg.lr)]
    valid = dataset.eval_split("valid", cfg.maxlen)
    world = distributed.world_size()
    steps_per_epoch = math.ceil(len(users) / cfg.batch_size)
    max_steps = steps_per_epoch * cfg.max_epochs
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor(cfg.lr_schedule, max_steps))
                 for o in optimisers]
    distributed.check_batch_size(cfg.batch_size)
    if cfg.esim and world > 1:
        raise ValueError("ESIM is not supported with more than one training process")
    objective = distributed.loss_module(model)  # DDP around model.loss when distributed
    distributed.seed_rank(cfg.seed)  # per-rank dropout, once every rank has the same init
    progress = progress and distributed.is_main()

    if cfg.esim and esim_setup is None:
        raise ValueError("cfg.esim is set but no esim_setup was given")
    esim_objective, esim_report = None, None
    eval_every = cfg.eval_every or max(1, math.ceil(steps_per_epoch / EVALS_PER_EPOCH))
    esim_start = max(1, round(cfg.esim_warmup_epochs * steps_per_epoch)) if cfg.esim else None
    if esim_start is not None and esim_start > steps_per_epoch * cfg.max_epochs:
        raise ValueError(f"the ESIM warm-up ({cfg.esim_warmup_epochs} epochs) is longer than "
                         f"training ({cfg.max_epochs} epochs)")
    esim_parts: dict[str, float] = {}
    cutoff = selection_cutoff(dataset.n_items)
    metric = selection_metric(dataset.n_items)
    cutoffs = tuple(sorted({*CUTOFFS, cutoff}))  # the selection cut-off is evaluated too
    if metric != SELECTION_METRIC:
        log.warning("the catalogue has %d items: %s cannot tell models apart on it; the model is "
                    "selected on validation %s instead", dataset.n_items, SELECTION_METRIC, metric)
    best_metric, best_state, best_valid, best_step = -1.0, None, {}, 0
    # The best evaluation since selection (re)started, for the progress projection.
    selected_step: int | None = None
    bad_evals, step, stopped_by = 0, 0, "max_epochs"
    curve: list[dict[str, float]] = []
    phases = Phases()
    load_at_start = load_average()
    started = time.perf_counter()
    log.info("training %s: %d examples, %d steps per epoch, at most %d steps or %g minutes%s",
             cfg.backbone, len(users), steps_per_epoch, max_steps, cfg.max_minutes,
             f", {world} processes" if world > 1 else "")

    def show_progress(**postfix: str) -> None:
        # The bar ends where training will stop if validation does not improve any more,
        # not at the epoch budget (which early stopping or the time cap usually cut short).
        stop = early_stop_step(step, selected_step, eval_every, cfg.patience, esim_start)
        total = projected_total_steps(
            step, selected_step, max_steps=max_steps, eval_every=eval_every,
            patience=cfg.patience, esim_start=esim_start,
            elapsed_s=time.perf_counter() - started, max_minutes=cfg.max_minutes)
        evals_left = max(0, math.ceil((stop - step) / eval_every))
        bar.set_postfix(**postfix, evals_left=evals_left, refresh=False)
        if total != bar.total:
            bar.total = total
        bar.refresh()

    bar = tqdm(total=projected_total_steps(0, None, max_steps=max_steps,
                                           eval_every=eval_every, patience=cfg.patience,
                                           esim_start=esim_start),
               disable=not progress, desc=f"train {cfg.backbone}", unit="step",
               dynamic_ncols=True)
    running = None
    try:  # the bar is closed even when training is interrupted (the nightly scheduler's stop)
        for epoch in range(cfg.max_epochs):
            if model.every_position and epoch:
                users, positions = dataset.train_windows(cfg.maxlen, rng)
            targets_all = dataset.flat[dataset.offsets[users] + positions]
            order = distributed.trim(rng.permutation(len(users)))
            for lo in range(0, len(order), cfg.batch_size):
                with phases("data"):
                    batch = distributed.shard(order[lo : lo + cfg.batch_size])
                    histories = torch.from_numpy(
                        dataset.histories(users[batch], positions[batch], cfg.maxlen))
                    if model.every_position and cfg.target_horizon > 1:  # [B, L]
                        targets = torch.from_numpy(dataset.future_targets(
                            users[batch], positions[batch], cfg.maxlen, cfg.target_horizon,
                            rng))
                    else:
                        targets = torch.from_numpy(targets_all[batch])
                    negatives = None
                    if sampler is not None:
                        count = cfg.negatives_per_example * cfg.batch_size
                        negatives = sampler.sample(count, generator)
                if step == esim_start:
                    # ESIM's set-up (k-means, the sentence encoder's construction) draws from
                    # its own stream: the loop's draws (dropout, negatives) are left as they were.
                    with phases("esim_setup"), torch.random.fork_rng(devices=[]):
                        esim_objective, esim_report = esim_setup(model)
                        optimisers.append(
                            torch.optim.Adam(esim_objective.parameters(), lr=cfg.lr))
                        esim_report["start_step"] = step
                        esim_report["warmup_valid"] = evaluate_model(model, valid, cutoffs)
                    # The model must be chosen among ESIM-trained states, or ESIM could be a
                    # no-op.
                    best_metric, best_state, bad_evals, selected_step = -1.0, None, 0, None
                with phases("forward_loss"):
                    objective.train()
                    loss = objective(histories, targets, negatives)  # through DDP's forward
                    if esim_objective is not None:
                        aux, esim_parts = esim_objective.loss(model)
                        # At zero weights the terms are logged, not trained: even a zero
                        # gradient would mark embedding rows for SparseAdam's lazy update.
                        if cfg.esim_alpha or cfg.esim_beta or cfg.esim_item_weight:
                            loss = loss + aux
                with phases("backward"):
                    for optimiser in optimisers:
                        optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                with phases("optimiser"):
                    for optimiser in optimisers:
                        optimiser.step()
                    for schedule in schedules:
                        schedule.step()
                step += 1
                running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
                bar.update(1)

                if step % eval_every == 0:
                    running = distributed.mean(running)  # the global batch's loss
                    with phases("evaluate"):
                        metrics = evaluate_model(model, valid, cutoffs)
                    curve.append({"step": step, "loss": running, **metrics,
                                  **{f"esim_{k}": v for k, v in esim_parts.items()}})
                    if metrics[metric] > best_metric:
                        best_metric, best_valid, best_step = metrics[metric], metrics, step
                        best_state = copy.deepcopy(model.state_dict())
                        bad_evals, selected_step = 0, step
                    else:
                        bad_evals += 1
                    if progress:
                        show_progress(loss=f"{running:.3f}",
                                      **{f"val_r{cutoff}": f"{metrics[metric]:.4f}"},
                                      best=f"{best_metric:.4f}")
                    if bad_evals >= cfg.patience and (esim_start is None or step > esim_start):
                        stopped_by = "early_stopping"
                elif progress and step % PROGRESS_EVERY == 0:
                    show_progress(loss=f"{running:.3f}", best=f"{max(best_metric, 0):.4f}")
                if (time.perf_counter() - started) / 60 > cfg.max_minutes:
                    stopped_by = "time_limit"
                # Rank 0 decides for all (the clocks differ): a rank that stopped alone
                # would leave the others waiting in the next all-reduce.
                stopped_by = distributed.agree(stopped_by, STOP_REASONS)
                if stopped_by != "max_epochs":
                    break
            if stopped_by != "max_epochs":
                break
    finally:
        bar.close()

    # A final evaluation so the last steps count too.
    with phases("evaluate"):
        metrics = evaluate_model(model, valid, cutoffs)
    if metrics[metric] > best_metric:
        best_valid, best_step, best_state = metrics, step, None
    if best_state is not None:
        model.load_state_dict(best_state)
    distributed.broadcast_state(model)  # every rank returns rank 0's choice
    model.item_embedding.sparse = False
    model.eval()
    seconds = time.perf_counter() - started
    naming = None
    if esim_objective is not None:
        from trainer.semantics.esim.naming import build_naming

        naming = build_naming(esim_objective, model, esim_objective.texts)
        esim_report["naming"] = {"labels": len(naming.names),
                                 "min_confidence": naming.min_confidence,
                                 **naming.calibration}
    epochs = step / steps_per_epoch
    log.info("trained %s: %d steps in %.1fs, best valid %s=%.4f at step %d (%s)",
             cfg.backbone, step, seconds, metric, best_valid[metric], best_step, stopped_by)
    if stopped_by == "time_limit":
        log.warning("training stopped at the time cap of %g minutes after %d steps (%.2f of %d "
                    "epochs), before early stopping: the model may be under-trained; raise the "
                    "cap with --max-minutes", cfg.max_minutes, step, epochs, cfg.max_epochs)
    return TrainResult(
        model=model, best_valid=best_valid, best_step=best_step, steps=step,
        epochs=epochs, seconds=seconds, stopped_by=stopped_by,
        loss_mode="full" if full else "sampled", curve=curve, esim=esim_report, naming=naming,
        selection_metric=metric, world_size=world, phase_seconds=phases.rounded(),
        load_average={"start": load_at_start, "end": load_average()},
    )
