"""Where a training run's time goes: wall seconds per phase of a step, and the machine's load.

`Phases` times the loop's phases (data, forward and loss, backward, optimiser, evaluation,
ESIM setup) with two clock reads each, cheap beside a step, so every run reports them. Each
phase is also a `torch.profiler.record_function` range, so a profile of a run
(benchmarks/profile_train.py) shows the same names. Timings on a shared machine mean little
without its load, hence `load_average`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from torch.profiler import record_function

PHASES = ("data", "forward_loss", "backward", "optimiser", "evaluate", "esim_setup")


class Phases:
    """Accumulated wall seconds per phase of the training loop."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        with record_function(f"train.{name}"):
            yield
        self.seconds[name] += time.perf_counter() - started

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in self.seconds.items()}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (what else ran beside a timing)."""
    return [round(value, 2) for value in os.getloadavg()]
