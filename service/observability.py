"""Prometheus metrics (one registry per app) and JSON logs carrying the request id.

With several worker processes (`WORKERS` > 1) prometheus_client runs in multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by `python -m service`): every process writes its values to
files there and /metrics, answered by any one worker, adds them up: counters and histograms
are summed over workers (dead ones included, so totals never go back), gauges are combined as
their `multiprocess_mode` says.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("service")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "recsys_request_seconds", "HTTP request latency", ["route", "method", "status"],
            registry=r,
            buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        # By A/B variant (`default` without AB_VARIANTS): sum over `variant` for the total.
        self.recommendations = Counter(
            "recsys_recommendations_total", "recommendation lists served", ["variant"],
            registry=r)
        self.recommend_seconds = Histogram(
            "recsys_recommend_seconds", "/recommend handler time (history read, encoder, "
            "search) by A/B variant", ["variant"], registry=r,
            buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.attributed_events = Counter(
            "recsys_attributed_events_total", "events credited to the A/B variant that served "
            "their request_id", ["variant"], registry=r)
        self.unattributed_events = Counter(
            "recsys_unattributed_events_total", "events whose request_id is unknown, expired or "
            "another user's", registry=r)
        self.ab_errors = Counter(
            "recsys_ab_errors_total", "A/B attribution store errors (answers and events went on "
            "without it)", registry=r)
        self.fallbacks = Counter(
            "recsys_fallbacks_total", "popularity fallbacks (no usable history)", registry=r)
        self.degraded = Counter(
            "recsys_degraded_total", "answers without the store (request history only)",
            registry=r)
        self.unknown_items = Counter(
            "recsys_unknown_items_total", "history ids not in the catalogue", registry=r)
        self.events = Counter("recsys_events_total", "events recorded", ["result"], registry=r)
        self.reloads = Counter("recsys_reloads_total", "bundle loads", ["result"], registry=r)
        self.redis_errors = Counter(
            "recsys_redis_errors_total", "history store errors", registry=r)
        self.batch_size = Histogram(
            "recsys_batch_size", "requests per batched ONNX run", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
        self.batch_queue_wait = Histogram(
            "recsys_batch_queue_wait_seconds", "time a request waited for its batch to start",
            registry=r, buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01,
                                 0.02, 0.05, 0.1, 0.25, 1))
        self.batch_fallbacks = Counter(
            "recsys_batch_fallbacks_total", "batched runs that raised and were redone request "
                                            "by request", registry=r)
        # Each worker reloads on its own: one series per live worker (label `pid`) shows
        # whether all have swapped; max()/min() over them aggregates.
        self.model_version = Gauge("recsys_model_version", "served bundle version, by A/B "
                                   "variant", ["variant"], registry=r,
                                   multiprocess_mode="liveall")
        # Each worker's view of item availability (service/store/availability.py), set when
        # it adopts a change: one series per live worker shows whether all have it.
        self.unavailable_items = Gauge(
            "recsys_unavailable_items", "items marked unavailable (never served), as this "
            "worker sees them", registry=r, multiprocess_mode="liveall")
        self.availability_version = Gauge(
            "recsys_availability_version", "version of the availability set this worker "
            "serves with", registry=r, multiprocess_mode="liveall")
        # Set when /metrics is scraped (Redis store only), by whichever worker answers: the
        # stream is shared, so the latest reading is the value.
        self.event_stream_length = Gauge(
            "recsys_event_stream_length", "entries in the event stream", registry=r,
            multiprocess_mode="livemostrecent")
        self.event_stream_lag = Gauge(
            "recsys_event_stream_lag", "event stream entries the nightly job has not read yet",
            registry=r, multiprocess_mode="livemostrecent")

    def render(self) -> bytes:
        """The Prometheus text exposition: this process's registry, or in multiprocess mode
        the sum over every worker's files."""
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=directory)
        return generate_latest(combined)


def multiprocess_dir() -> str | None:
    """PROMETHEUS_MULTIPROC_DIR when metrics are shared between worker processes."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def mark_worker_dead(pid: int | None = None) -> None:
    """On a worker's exit: drop its live gauges (its counters stay in the totals)."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid if pid is not None else os.getpid())
