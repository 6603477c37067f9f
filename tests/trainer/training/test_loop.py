import logging

import pytest
import torch

from trainer.config import TrainConfig
from trainer.data.dataset import build_dataset
from trainer.data.specs import load_spec
from trainer.data.synthetic import make_synthetic
from trainer.training.loop import (
    MIN_LR_FACTOR,
    SELECTION_METRIC,
    early_stop_step,
    evaluate_model,
    lr_factor,
    projected_total_steps,
    selection_cutoff,
    train,
)


@pytest.fixture(scope="module")
def small():
    return build_dataset(make_synthetic(n_users=300, n_items=200, n_topics=10, min_len=10,
                                        max_len=20, seed=0))


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_training_is_deterministic_for_a_seed(small, loss):
    cfg = dict(max_epochs=1, eval_every=10, dim=16, loss=loss, negatives_per_example=2)
    runs = [train(small, TrainConfig(seed=s, **cfg), progress=False) for s in (0, 0, 1)]
    first, again, other = (r.model.state_dict() for r in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert runs[0].loss_mode == loss


def test_early_stopping_restores_the_best_evaluation(small):
    cfg = TrainConfig(max_epochs=30, eval_every=5, patience=2, dim=16, lr=0.05, seed=0)
    result = train(small, cfg, progress=False)
    assert result.stopped_by == "early_stopping"
    assert result.steps < 30 * 2  # stopped well before the epoch budget ran out
    metric = result.selection_metric
    assert max(c[metric] for c in result.curve) == pytest.approx(result.best_valid[metric])
    # The returned model is the best one, not the last one.
    cutoffs = (20, 50, selection_cutoff(small.n_items))
    again = evaluate_model(result.model, small.eval_split("valid", cfg.maxlen), cutoffs)
    assert again[metric] == pytest.approx(result.best_valid[metric])


def test_cosine_schedule_decays_from_the_rate_to_its_floor_at_the_epoch_budget():
    assert lr_factor("constant", 100)(73) == 1.0
    cosine = lr_factor("cosine", 100)
    assert cosine(0) == 1.0
    assert cosine(50) == pytest.approx((1 + MIN_LR_FACTOR) / 2)
    assert cosine(100) == pytest.approx(MIN_LR_FACTOR) and cosine(150) == cosine(100)
    assert all(cosine(s) > cosine(s + 1) for s in range(100))


def test_cosine_schedule_reaches_the_optimisers(small):
    """A cosine run differs from a constant one with the same seed (the schedule is applied)."""
    cfg = dict(max_epochs=2, eval_every=50, patience=100, dim=16, seed=0)
    constant = train(small, TrainConfig(**cfg), progress=False).model.state_dict()
    cosine = train(small, TrainConfig(lr_schedule="cosine", **cfg), progress=False)
    assert cosine.stopped_by == "max_epochs"
    assert not all(torch.equal(constant[k], v) for k, v in cosine.model.state_dict().items())


def test_phase_seconds_account_for_the_training_time(small):
    """Every phase is timed, none twice: the phases add up to at most the run's wall time and
    to most of it (the rest is the bar, the best-state copies and the loop itself)."""
    cfg = TrainConfig(max_epochs=2, eval_every=5, dim=16, seed=0)
    result = train(small, cfg, progress=False)
    phases = result.phase_seconds
    assert set(phases) == {"data", "forward_loss", "backward", "optimiser", "evaluate",
                           "esim_setup"}
    assert phases["esim_setup"] == 0 and all(phases[p] > 0 for p in phases if p != "esim_setup")
    assert 0.5 * result.seconds < sum(phases.values()) <= result.seconds + 0.01
    assert set(result.load_average) == {"start", "end"}
    assert all(len(v) == 3 and min(v) >= 0 for v in result.load_average.values())


def test_time_cap_stop_warns_with_steps_epochs_and_the_option(small, caplog):
    cfg = TrainConfig(max_epochs=5, eval_every=5, dim=16, seed=0, max_minutes=1e-6)
    with caplog.at_level(logging.WARNING, logger="trainer.training.loop"):
        result = train(small, cfg, progress=False)
    assert result.stopped_by == "time_limit" and result.steps == 1
    [warning] = [r for r in caplog.records if "time cap" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert "after 1 steps" in message and f"{result.epochs:.2f} of 5 epochs" in message
    assert "--max-minutes" in message


def test_no_time_cap_warning_when_early_stopping_ends_training(small, caplog):
    cfg = TrainConfig(max_epochs=30, eval_every=5, patience=1, dim=16, lr=0.05, seed=0)
    with caplog.at_level(logging.WARNING, logger="trainer.training.loop"):
        assert train(small, cfg, progress=False).stopped_by == "early_stopping"
    assert not [r for r in caplog.records if "time cap" in r.getMessage()]


def test_projected_total_is_where_training_stops_without_improvement():
    kw = dict(max_steps=10_000, eval_every=100, patience=15)
    # Before any evaluation: the first one becomes the best, then `patience` more.
    assert projected_total_steps(0, None, **kw) == 1600
    assert projected_total_steps(250, None, **kw) == 300 + 1500
    # After a best evaluation: patience evaluations after it.
    assert projected_total_steps(700, 400, **kw) == 400 + 1500
    # The epoch budget when it comes first.
    assert projected_total_steps(700, 400, **{**kw, "max_steps": 1000}) == 1000
    # The time cap at the measured rate: 500 steps in 60 s, a 3-minute cap -> 1500 steps.
    assert projected_total_steps(500, 400, **kw, elapsed_s=60, max_minutes=3) == 1500
    assert projected_total_steps(500, 400, **kw, elapsed_s=60, max_minutes=30) == 1900
    # Never behind the steps already done (the time cap overrun by the last step).
    assert projected_total_steps(500, 400, **kw, elapsed_s=600, max_minutes=1) == 500
    # With ESIM, selection restarts at its start: a best before it does not count.
    esim = dict(**kw, esim_start=1000)
    assert projected_total_steps(700, 400, **esim) == 1100 + 1500
    assert projected_total_steps(1050, None, **esim) == 1100 + 1500
    assert projected_total_steps(1300, 1200, **esim) == 1200 + 1500
    assert early_stop_step(1050, None, 100, 0, esim_start=1000) == 1100


def test_selection_cutoff_is_at_most_a_tenth_of_the_catalogue():
    assert [selection_cutoff(n) for n in (5, 9, 50, 199, 200, 499, 500, 3496, 10**6)] == \
        [1, 1, 5, 19, 20, 20, 50, 50, 50]


def test_small_catalogue_selects_on_a_small_cutoff_and_warns(caplog):
    data = build_dataset(make_synthetic(n_users=200, n_items=50, n_topics=5, min_len=10,
                                        max_len=20, seed=0))
    assert data.n_items == 50
    cfg = TrainConfig(max_epochs=2, eval_every=5, dim=16, seed=0)
    with caplog.at_level(logging.WARNING, logger="trainer.training.loop"):
        result = train(data, cfg, progress=False)
    assert result.selection_metric == "recall@5"
    assert {"recall@5", "recall@20", "recall@50"} <= set(result.best_valid)
    assert all("recall@5" in point for point in result.curve)
    # Recall@50 of a 50-item catalogue cannot discriminate: every evaluation scores 1.0.
    assert {point["recall@50"] for point in result.curve} == {1.0}
    assert max(c["recall@5"] for c in result.curve) >= result.curve[0]["recall@5"]
    [warning] = [r for r in caplog.records if "catalogue" in r.getMessage()]
    assert "50 items" in warning.getMessage() and "recall@5 " in warning.getMessage()


def test_movielens_sized_catalogue_still_selects_on_recall_at_50(caplog):
    data = build_dataset(load_spec({"dataset": "movielens-small"}))
    cfg = TrainConfig(max_epochs=1, dim=16, seed=0, max_minutes=1e-6)  # one step is enough
    with caplog.at_level(logging.WARNING, logger="trainer.training.loop"):
        result = train(data, cfg, progress=False)
    assert result.selection_metric == SELECTION_METRIC == "recall@50"
    assert not [r for r in caplog.records if "catalogue" in r.getMessage()]


@pytest.mark.slow
def test_four_interests_beat_one_on_four_planted_interests():
    data = build_dataset(make_synthetic(n_users=1000, n_items=500, n_topics=25,
                                        interests_per_user=4, min_len=20, max_len=40, seed=0))
    recall = {}
    for k in (1, 4):
        cfg = TrainConfig(backbone="comirec-sa", interests=k, max_epochs=6, eval_every=50,
                          patience=100, dim=32, seed=0)
        result = train(data, cfg, progress=False)
        recall[k] = evaluate_model(result.model, data.eval_split("test", cfg.maxlen))["recall@50"]
    # Measured: 0.51 (K=1) vs 0.69 (K=4); a margin guards against a tie passing.
    assert recall[4] > recall[1] + 0.05, recall


def test_progress_bar_ends_where_early_stopping_ends_training(small, monkeypatch):
    from tqdm.auto import tqdm

    bars = []

    class Recorder(tqdm):
        def __init__(self, *args, **kwargs):
            self.totals = []
            super().__init__(*args, **kwargs)
            bars.append(self)

        def refresh(self, *args, **kwargs):
            self.totals.append(self.total)
            return super().refresh(*args, **kwargs)

    monkeypatch.setattr("trainer.training.loop.tqdm", Recorder)
    cfg = TrainConfig(max_epochs=30, eval_every=5, patience=2, dim=16, lr=0.05, seed=0)
    result = train(small, cfg, progress=True)
    assert result.stopped_by == "early_stopping"
    [bar] = bars
    assert bar.totals[0] == (1 + cfg.patience) * cfg.eval_every  # not 30 epochs of steps
    assert bar.totals[-1] == result.steps  # the projection was right
    assert "evals_left" in str(bar.postfix)
