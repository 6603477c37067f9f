"""One training loop for every backbone: sampled (or full) softmax, early stopping on
validation Recall@50, deterministic for a seed."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.config import FULL_SOFTMAX_MAX_ITEMS, TrainConfig
from trainer.dataset import EvalSplit, SequenceDataset
from trainer.evaluate import evaluate_encoder, exact_search
from trainer.nets import MultiInterestEncoder, Negatives, build_encoder

if TYPE_CHECKING:  # ESIM's imports (transformers, LLM clients) stay out of plain training
    from trainer.esim import EsimObjective

# Called once at the end of the warm-up with the warmed-up model: returns the ESIM objective
# and a report (trainer.esim.prepare_esim with its labeller bound).
EsimSetup = Callable[[MultiInterestEncoder], "tuple[EsimObjective, dict[str, Any]]"]

log = logging.getLogger(__name__)

SELECTION_METRIC = "recall@50"


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

    def sample(self, count: int, targets: torch.Tensor, generator: torch.Generator) -> Negatives:
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        ranks = (torch.exp(u * self.log_range).floor().long() - 1).clamp_(0, self.n - 1)
        ids = self.rank_to_item[ranks]
        return Negatives(ids=ids, log_q=self.log_q[ids], target_log_q=self.log_q[targets])


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


def encode_numpy(model: MultiInterestEncoder):
    """The model as a numpy -> numpy encoder for evaluation."""

    def encode(histories: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(histories)).numpy()

    return encode


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def evaluate_model(model: MultiInterestEncoder, split: EvalSplit) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        items = model.item_vectors().numpy()
    return evaluate_encoder(encode_numpy(model), exact_search(items), split)


def train(dataset: SequenceDataset, cfg: TrainConfig, progress: bool = True,
          esim_setup: EsimSetup | None = None) -> TrainResult:
    """IBIM training; with `esim_setup` (needs cfg.esim) the ESIM losses join after the
    warm-up, and only evaluations from then on can be selected as the best model."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    model = build_encoder(dataset.n_items, cfg)
    users, positions = dataset.train_examples()
    if len(users) == 0:
        raise ValueError("no training examples: every training user has fewer than 5 items")
    targets_all = dataset.flat[dataset.offsets[users] + positions]
    full = cfg.loss == "full" or (cfg.loss == "auto" and dataset.n_items <= FULL_SOFTMAX_MAX_ITEMS)
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

    if cfg.esim and esim_setup is None:
        raise ValueError("cfg.esim is set but no esim_setup was given")
    esim_objective, esim_report = None, None
    steps_per_epoch = math.ceil(len(users) / cfg.batch_size)
    esim_start = max(1, round(cfg.esim_warmup_epochs * steps_per_epoch)) if cfg.esim else None
    if esim_start is not None and esim_start > steps_per_epoch * cfg.max_epochs:
        raise ValueError(f"the ESIM warm-up ({cfg.esim_warmup_epochs} epochs) is longer than "
                         f"training ({cfg.max_epochs} epochs)")
    esim_parts: dict[str, float] = {}
    total_steps = steps_per_epoch * cfg.max_epochs
    best_metric, best_state, best_valid, best_step = -1.0, None, {}, 0
    bad_evals, step, stopped_by = 0, 0, "max_epochs"
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    bar = tqdm(total=total_steps, disable=not progress, desc=f"train {cfg.backbone}",
               unit="step", dynamic_ncols=True)
    running = None
    for _epoch in range(cfg.max_epochs):
        order = rng.permutation(len(users))
        for lo in range(0, len(order), cfg.batch_size):
            batch = order[lo : lo + cfg.batch_size]
            histories = torch.from_numpy(
                dataset.histories(users[batch], positions[batch], cfg.maxlen))
            targets = torch.from_numpy(targets_all[batch])
            negatives = None
            if sampler is not None:
                count = cfg.negatives_per_example * cfg.batch_size
                negatives = sampler.sample(count, targets, generator)
            if step == esim_start:
                esim_objective, esim_report = esim_setup(model)
                optimisers.append(torch.optim.Adam(esim_objective.parameters(), lr=cfg.lr))
                esim_report["start_step"] = step
                esim_report["warmup_valid"] = evaluate_model(model, valid)
                # The model must be chosen among ESIM-trained states, or ESIM could be a no-op.
                best_metric, best_state, bad_evals = -1.0, None, 0
            model.train()
            loss = model.loss(histories, targets, negatives)
            if esim_objective is not None:
                aux, esim_parts = esim_objective.loss(model)
                loss = loss + aux
            for optimiser in optimisers:
                optimiser.zero_grad(set_to_none=True)
            loss.backward()
            for optimiser in optimisers:
                optimiser.step()
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)

            if step % cfg.eval_every == 0:
                metrics = evaluate_model(model, valid)
                curve.append({"step": step, "loss": running, **metrics,
                              **{f"esim_{k}": v for k, v in esim_parts.items()}})
                if metrics[SELECTION_METRIC] > best_metric:
                    best_metric, best_valid, best_step = metrics[SELECTION_METRIC], metrics, step
                    best_state = copy.deepcopy(model.state_dict())
                    bad_evals = 0
                else:
                    bad_evals += 1
                bar.set_postfix(loss=f"{running:.3f}", val_r50=f"{metrics[SELECTION_METRIC]:.4f}",
                                best=f"{best_metric:.4f}")
                if bad_evals >= cfg.patience and (esim_start is None or step > esim_start):
                    stopped_by = "early_stopping"
            elif step % 20 == 0:
                bar.set_postfix(loss=f"{running:.3f}", best=f"{max(best_metric, 0):.4f}")
            if (time.perf_counter() - started) / 60 > cfg.max_minutes:
                stopped_by = "time_limit"
            if stopped_by != "max_epochs":
                break
        if stopped_by != "max_epochs":
            break
    bar.close()

    # A final evaluation so the last steps count too.
    metrics = evaluate_model(model, valid)
    if metrics[SELECTION_METRIC] > best_metric:
        best_valid, best_step, best_state = metrics, step, None
    if best_state is not None:
        model.load_state_dict(best_state)
    model.item_embedding.sparse = False
    model.eval()
    seconds = time.perf_counter() - started
    log.info("trained %s: %d steps in %.1fs, best valid %s=%.4f at step %d (%s)",
             cfg.backbone, step, seconds, SELECTION_METRIC, best_valid[SELECTION_METRIC],
             best_step, stopped_by)
    return TrainResult(
        model=model, best_valid=best_valid, best_step=best_step, steps=step,
        epochs=step / steps_per_epoch, seconds=seconds, stopped_by=stopped_by,
        loss_mode="full" if full else "sampled", curve=curve, esim=esim_report,
    )
