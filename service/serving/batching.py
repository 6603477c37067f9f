"""Micro-batching of /recommend across requests, as Triton's dynamic batcher does
(docs/architecture.md, "Serving performance and scale-out").

A request is prepared alone on the event loop (ids mapped, exclusions, k: its own errors stay
its own). Requests queued together then share one ONNX run (rows stacked into [B, maxlen]) and
one FAISS search (all B*K interest vectors); each request's K lists are merged and
post-processed alone, by the same code as an unbatched request.

The batch computes on the event loop itself, between two turns. It used to go to a worker
thread so that the loop kept serving meanwhile, but the two threads then took turns on the
GIL and paid a hand-off per batch: on two cores the loop thread version served 1.15x (one
worker) to 1.5x (two workers) the requests per second (docs/results.md, "Serving overhead").
Requests that arrive during a compute wait in the socket and form the next batch.

When a batch goes:
* a request alone in the worker (no other /recommend request since it arrived: `admit`) is
  computed at once, without the queue (a lone request waits for nothing, not even a loop turn);
* one request queued and no batch computing: at once;
* several queued: held open for more until BATCH_MAX_SIZE, or until BATCH_WINDOW_MS after the
  oldest was queued, whichever comes first;
* requests that arrive while a batch computes queue up and go together as soon as it is
  free (their window has usually passed by then).

Each request keeps the model it captured on arrival (the one its answer reports): a batch is
split by model, so a hot swap mid-batch changes no answer. If a batched run raises, its
requests are computed one by one, so only a faulty request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from service.observability import Metrics
from service.serving.recommender import DEFAULT_SHAPING, Query, Recommendation, Recommender, Shaping

log = logging.getLogger("service.batching")

Outcome = Recommendation | Exception
K = TypeVar("K")
T = TypeVar("T")


@dataclass(eq=False)
class Job:
    model: Recommender
    query: Query
    future: asyncio.Future[Recommendation]
    queued: float  # time.perf_counter() when queued


class Batcher:
    def __init__(self, max_size: int, window_ms: float, metrics: Metrics) -> None:
        self.max_size, self.window = max_size, window_ms / 1000
        self.metrics = metrics
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._admitted = 0  # /recommend requests in this worker, from arrival to answer

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Counts a request from its arrival (before its history is read) to its answer."""
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def recommend(self, model: Recommender, history: list[str], k: int,
                        exclude: list[str], fanout: int, shaping: Shaping = DEFAULT_SHAPING,
                        allowed: np.ndarray | None = None,
                        unavailable: np.ndarray | None = None) -> Recommendation:
        """Model.recommend, with the encoder run and the search shared with batch-mates."""
        prepared = model.prepare(history, k, exclude, fanout, shaping, allowed, unavailable)
        if isinstance(prepared, Recommendation):  # popularity fallback: nothing to compute
            return prepared
        if self._admitted == 1:
            # One turn for requests that arrived in the same turn to be admitted (a store
            # without I/O would otherwise let each run through alone, never batched).
            await asyncio.sleep(0)
        if self._admitted == 1:  # alone: nothing is queued or computing, none can join
            self.metrics.batch_size.observe(1)
            self.metrics.batch_queue_wait.observe(0.0)
            return model.compute(prepared)
        return await self.submit(model, prepared)

    async def submit(self, model: Recommender, query: Query) -> Recommendation:
        if self._task is None or self._task.done():  # started on first use, in the serving loop
            self._queue = asyncio.Queue()
            # A fresh context: not the first caller's (its request id would tag batch logs).
            self._task = asyncio.create_task(self._run(), name="batcher",
                                             context=contextvars.Context())
        assert self._queue is not None
        future: asyncio.Future[Recommendation] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Job(model, query, future, time.perf_counter()))
        return await future

    async def close(self) -> None:
        """Stop the batch loop (at shutdown; anything still queued is cancelled)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = self._queue = None

    async def _collect(self, queue: asyncio.Queue[Job], batch: list[Job]) -> None:
        """Fill `batch` (owned by the caller, so a shutdown midway loses no job)."""
        batch.append(await queue.get())
        await asyncio.sleep(0)  # requests that became ready in the same loop turn join
        self._drain(queue, batch)
        deadline = batch[0].queued + self.window
        while 1 < len(batch) < self.max_size and (left := deadline - time.perf_counter()) > 0:
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
            self._drain(queue, batch)
        batch[:] = [job for job in batch if not job.future.done()]  # drop cancelled callers

    def _drain(self, queue: asyncio.Queue[Job], batch: list[Job]) -> None:
        while len(batch) < self.max_size and not queue.empty():
            batch.append(queue.get_nowait())

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        batch: list[Job] = []
        try:
            while True:
                await self._collect(queue, batch)
                if not batch:
                    continue
                started = time.perf_counter()
                self.metrics.batch_size.observe(len(batch))
                for job in batch:
                    self.metrics.batch_queue_wait.observe(started - job.queued)
                try:
                    outcomes = self._compute(batch)
                except Exception as exc:  # a bug here must not leave callers waiting forever
                    log.exception("batch failed")
                    outcomes = [exc] * len(batch)
                for job, outcome in zip(batch, outcomes, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(outcome, Exception):
                        job.future.set_exception(outcome)
                    else:
                        job.future.set_result(outcome)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("batch", extra={
                        "size": len(batch), "queue_wait_ms": round(
                            (started - batch[0].queued) * 1000, 3),
                        "compute_ms": round((time.perf_counter() - started) * 1000, 3)})
                batch = []
        finally:  # shut down: nobody is left waiting on a batch that will not run
            while not queue.empty():
                batch.append(queue.get_nowait())
            for job in batch:
                job.future.cancel()

    def _compute(self, batch: list[Job]) -> list[Outcome]:
        """One encoder run per model, one search per (model, n)."""
        outcomes: dict[Job, Outcome] = {}
        for model, jobs in groups(batch, lambda job: job.model).items():
            try:
                outcomes.update(compute_together(model, jobs))
            except Exception:
                self.metrics.batch_fallbacks.inc()
                log.warning("batched compute failed; computing its %d requests one by one",
                            len(jobs), exc_info=True)
                outcomes.update({job: compute_alone(model, job.query) for job in jobs})
        return [outcomes[job] for job in batch]


def groups(items: Iterable[T], key: Callable[[T], K]) -> dict[K, list[T]]:
    """Items by key, in first-seen order."""
    out: dict[K, list[T]] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


def compute_together(model: Recommender, jobs: list[Job]) -> dict[Job, Outcome]:
    """One ONNX run for all rows; one FAISS search per candidate count n (usually the fan-out
    for all; a larger n is not cut down to a smaller one, which could change ties or an ANN
    search, so every request gets exactly the candidates it would get alone)."""
    interests = model.encode(np.stack([job.query.row for job in jobs]))  # [B, K, d]
    outcomes: dict[Job, Outcome] = {}
    filtered = [i for i, job in enumerate(jobs) if job.query.allowed is not None]
    for i in filtered:  # a filter restricts the whole search: one search each
        query = jobs[i].query
        assert query.allowed is not None
        scores, rows = model.search_rows(interests[i], query.n, query.allowed)
        outcomes[jobs[i]] = finish(model, query, scores, rows, interests[i])
    plain = [i for i, job in enumerate(jobs) if job.query.allowed is None]
    for n, members in groups(plain, lambda i: jobs[i].query.n).items():
        scores, rows = model.search(interests[members], n)
        for j, i in enumerate(members):
            outcomes[jobs[i]] = finish(model, jobs[i].query, scores[j], rows[j], interests[i])
    return outcomes


def compute_alone(model: Recommender, query: Query) -> Outcome:
    try:
        return model.compute(query)
    except Exception as exc:
        return exc


def finish(model: Recommender, query: Query, scores: np.ndarray, rows: np.ndarray,
           interests: np.ndarray) -> Outcome:
    """Per-request merge and post-processing; an error here is that request's alone."""
    try:
        return model.finish(query, scores, rows, interests)
    except Exception as exc:
        return exc
