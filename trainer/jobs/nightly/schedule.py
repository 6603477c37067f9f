"""The scheduler: `run_every` repeats the nightly job on an interval as a long-running process
(a container's PID 1). SIGTERM or SIGINT stops it at once while it sleeps, and abandons a cycle
in progress (every step of a cycle is safe to interrupt and redo).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from trainer.jobs.nightly.lock import NightlyError
from trainer.jobs.nightly.options import NightlyOptions
from trainer.jobs.nightly.run import run_nightly

log = logging.getLogger(__name__)

class Interrupted(BaseException):
    """Raised by `run_every`'s signal handler. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` on the way (cleanup code, libraries) swallows the stop."""

    def __init__(self, signum: int) -> None:
        self.signame = signal.Signals(signum).name
        super().__init__(self.signame)


def run_cycle(opts: NightlyOptions) -> dict[str, Any]:
    """One nightly run for the scheduler: a failure is logged and reported, not raised."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        return run_nightly(opts)
    except Exception as exc:  # the loop must outlive any one bad night
        expected = isinstance(exc, NightlyError | ValueError | OSError)
        log.error("nightly cycle failed: %s", exc, exc_info=not expected)
        return {"started": started, "decision": "failed", "error": f"{exc}"}


def run_every(opts: NightlyOptions, every: float,
              emit: Callable[[dict[str, Any]], None]) -> None:
    """Sleep `every` seconds, run a cycle, emit its report, repeat; return on SIGTERM/SIGINT.

    The handlers raise Interrupted wherever the main thread is: a sleep ends at once, and a
    cycle is abandoned where it stands. That is safe because every step of a cycle is: the
    lock is a context manager (and the OS releases it with the process anyway), an event
    batch is persisted before it is acknowledged (an unacknowledged one is read again), and a
    bundle appears by one atomic rename or not at all."""
    phase = "starting"
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:  # a second signal must not break the cleanup of the first
            log.info("nightly: %s again; already stopping", signal.Signals(signum).name)
            return
        stopping = True
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("nightly: a cycle every %gs until SIGTERM or SIGINT; the first in %gs",
                 every, every)
        while True:
            phase = "sleeping"
            deadline = time.monotonic() + every
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 3600.0))  # time.sleep overflows past ~292 years
            phase = "cycle"
            report = run_cycle(opts)
            phase = "reporting"
            emit(report)
            log.info("nightly cycle: %s; the next in %gs", report.get("decision"), every)
    except Interrupted as exc:
        if phase == "cycle":
            log.warning("nightly: cycle interrupted by %s; it will be redone at the next run "
                        "(events it ingested are kept, no bundle is half-published)", exc.signame)
        else:
            log.info("nightly: stopped by %s", exc.signame)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
