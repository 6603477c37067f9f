"""Prometheus metrics (one registry per app) and JSON logs carrying the request id."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.recommendations = Counter(
            "recsys_recommendations_total", "recommendation lists served", registry=r)
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
        self.model_version = Gauge("recsys_model_version", "served bundle version", registry=r)
        # Set when /metrics is scraped (Redis store only).
        self.event_stream_length = Gauge(
            "recsys_event_stream_length", "entries in the event stream", registry=r)
        self.event_stream_lag = Gauge(
            "recsys_event_stream_lag", "event stream entries the nightly job has not read yet",
            registry=r)
