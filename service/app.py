"""The FastAPI application: lifespan (load the model once, watch for new ones), middleware
(request id, structured access log, latency histogram, body size cap), error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from email.message import Message as MimeHeader
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.ab.attribution import AttributionStore, InMemoryAttributionStore, RedisAttributionStore
from service.api import events, items, ops, recommend, ui, users
from service.api.events import SHAPE_TAGS
from service.deps import AppState
from service.observability import Metrics, configure_logging, mark_worker_dead, request_id_var
from service.schemas import is_request_id
from service.serving.batching import Batcher
from service.serving.recommender import Shaping
from service.serving.row_policy import RowPolicy
from service.serving.variants import build_variants
from service.settings import Settings, get_settings
from service.store.availability import (
    Availability,
    InMemoryAvailabilityStore,
    RedisAvailabilityStore,
    Snapshot,
)
from service.store.history import (
    EventLogFull,
    HistoryStore,
    InMemoryHistoryStore,
    RedisHistoryStore,
    StoreUnavailable,
)

log = logging.getLogger("service.app")


def make_store(settings: Settings) -> HistoryStore:
    if settings.redis_url:
        return RedisHistoryStore(
            settings.redis_url, settings.history_max_len, settings.history_ttl_seconds,
            settings.event_stream, settings.event_stream_max_len,
            settings.event_dedup_ttl_seconds, settings.event_stream_shards)
    return InMemoryHistoryStore(settings.history_max_len, settings.history_ttl_seconds,
                                settings.event_stream_max_len, settings.event_dedup_ttl_seconds)


def make_availability(store: HistoryStore, metrics: Metrics) -> Availability:
    """Item availability on the history store's Redis client when there is one; each
    snapshot this worker adopts sets its gauges."""

    def on_change(snapshot: Snapshot) -> None:
        metrics.unavailable_items.set(len(snapshot.unavailable))
        metrics.availability_version.set(snapshot.version)

    backend = (RedisAvailabilityStore(store.client) if isinstance(store, RedisHistoryStore)
               else InMemoryAvailabilityStore())
    return Availability(backend, on_change)


def make_attribution(settings: Settings, store: HistoryStore) -> AttributionStore:
    """A/B attribution (service/ab/) on the history store's Redis client when there is one:
    no second connection pool; the history store closes it."""
    if isinstance(store, RedisHistoryStore):
        return RedisAttributionStore(store.client, settings.ab_experiment,
                                     settings.ab_attribution_ttl_seconds,
                                     cluster=store.cluster)
    return InMemoryAttributionStore(settings.ab_experiment, settings.ab_attribution_ttl_seconds)


class BodySizeLimit:
    """Refuses bodies over the limit with 413, whether or not Content-Length is sent.

    The body is read (up to the limit) before the app sees it and then replayed: FastAPI
    would turn an error raised mid-read into a generic 400.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over the limit of {self.max_bytes} bytes"}, 413)
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class AccessLog:
    """Request id (X-Request-ID in and out), latency histogram by route, one JSON log line,
    and the last resort for unhandled errors: a 500 that carries the request id (header, body
    and log line) and keeps the connection open.

    Plain ASGI rather than @app.middleware("http"), which costs a task per request.
    """

    QUIET = ("/metrics", "/healthz", "/readyz")

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = client_request_id(dict(scope["headers"]).get(b"x-request-id", b""))
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode("ascii"))]
            await send(message)

        try:
            if not url_is_utf8(scope):
                await JSONResponse({"detail": "the URL is not valid UTF-8 once percent-decoded "
                                              "(ids and query values are UTF-8 text)",
                                    "request_id": request_id}, 400)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            # Never a traceback to the client; the log has it, keyed by the request id.
            log.exception("unhandled error")
            if response_started:  # too late for an answer: the connection has to go
                raise
            await JSONResponse({"detail": "internal error", "request_id": request_id},
                               status_code=500)(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_seconds.labels(route, scope["method"], str(status)).observe(
                elapsed)
            if route not in self.QUIET or status >= 400:
                log.info("request", extra={"method": scope["method"], "path": route,
                                           "status": status, "ms": round(elapsed * 1000, 2)})
            request_id_var.reset(token)


def url_is_utf8(scope: Scope) -> bool:
    """Whether the path and query decode to UTF-8 text. The server and Starlette decode
    percent-escapes leniently (an invalid byte becomes U+FFFD), which would turn
    `/users/%FF%FE/history` into another, valid id; checked only when there is an escape."""
    for raw in (scope.get("raw_path") or b"", scope.get("query_string") or b""):
        if b"%" in raw:
            try:
                unquote_to_bytes(raw).decode("utf-8")
            except UnicodeDecodeError:
                return False
    return True


def client_request_id(raw: bytes) -> str:
    """The client's X-Request-ID if it is a short printable ASCII token, else a new one (a
    request id ends up in headers and logs, so it must be safe in both)."""
    given = raw.decode("latin-1")
    if is_request_id(given):  # the rule POST /events `request_id` accepts (service/schemas.py)
        return given
    return uuid.uuid4().hex


# A 503 (store or model not there yet) asks the client to come back after this many seconds.
RETRY_AFTER_SECONDS = 5
# Errors pydantic gives a body that is not an object (with any Content-Type but JSON, FastAPI
# hands the raw bytes to validation: "Input should be a valid dictionary").
NOT_AN_OBJECT = frozenset({"model_type", "model_attributes_type", "dict_type"})


def is_json(content_type: str | None) -> bool:
    """FastAPI's own rule for a body it parses as JSON: application/json or */*+json."""
    if not content_type:
        return False
    header = MimeHeader()
    header["content-type"] = content_type
    subtype = header.get_content_subtype()
    return header.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


def unparseable_body(cause: BaseException) -> str | None:
    """Why FastAPI could not parse a body (it answers "There was an error parsing the body")."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the body is nested too deeply to parse"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return (f"a number in the body is too long (over {sys.get_int_max_str_digits()} "
                f"digits)")
    return None


def _json_safe(value: Any) -> Any:
    """A short, JSON-encodable rendering of part of a validation error (or None to drop it)."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, str):
        return value if len(value) <= 64 and _encodable(value) else None
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validation_details(errors: Any) -> list[dict[str, Any]]:
    """Pydantic errors without what can break or bloat an answer: the input is echoed only
    when short and encodable (never a 1 MB body, a NaN or a lone surrogate), locations and
    messages are made encodable."""
    details = []
    for error in errors:
        item: dict[str, Any] = {
            "type": error.get("type"),
            "loc": [part if isinstance(part, int) or (isinstance(part, str) and _encodable(part))
                    else ascii(part) for n, part in enumerate(error.get("loc", ()))
                    if not (n == 1 and part in SHAPE_TAGS)],  # POST /events' shape tag
            "msg": str(error.get("msg", ""))[:300].encode("utf-8", "replace").decode(),
        }
        shown = _json_safe(error.get("input"))
        if shown is not None:
            item["input"] = shown
        if isinstance(error.get("ctx"), dict):  # e.g. {"max_length": 256}, {"error": "..."}
            item["ctx"] = {str(k): _json_safe(v) if _json_safe(v) is not None
                           else str(v)[:200].encode("utf-8", "replace").decode()
                           for k, v in error["ctx"].items()}
        details.append(item)
    return details


def _set_limit(prop: dict[str, Any], key: str, value: int) -> None:
    """Set a JSON-schema limit on a property (on its non-null branch when it is optional)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch[key] = value


def schema_with_limits(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI schema with the limits that come from the settings (MAX_K, ...), so that
    the schema states what the service enforces."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        models = schema["components"]["schemas"]
        request = models["RecommendRequest"]["properties"]
        _set_limit(request["k"], "maximum", settings.max_k)
        _set_limit(request["history"], "maxItems", settings.max_request_history)
        _set_limit(models["EventBatch"]["properties"]["events"], "maxItems",
                   settings.max_events_per_request)
        app.openapi_schema = schema
    return app.openapi_schema


def freeze_heap(collect: bool) -> None:
    """Move every object alive now (the app, the libraries, the loaded models) out of the
    garbage collector's reach: a full collection then scans only what requests create. Without
    it a full collection scanned the whole heap every few seconds under load, a 30 ms stall
    that set the p99 (docs/results.md, "Serving overhead"). Called at start (no collection
    first: nothing is garbage yet worth a pass over a heap that may hold torch, in tests) and
    after each model swap, with a collection that frees the replaced model's cycles."""
    if collect:
        gc.unfreeze()
        gc.collect()
    gc.freeze()


SHUTDOWN_STEP_SECONDS = 5.0


async def bounded_shutdown(what: str, step: Awaitable[Any]) -> None:
    """Await one shutdown step for at most SHUTDOWN_STEP_SECONDS; log and go on after that."""
    try:
        await asyncio.wait_for(step, SHUTDOWN_STEP_SECONDS)
    except TimeoutError:
        log.warning("shutdown step did not finish; going on",
                    extra={"step": what, "seconds": SHUTDOWN_STEP_SECONDS})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    metrics = Metrics()

    serving = False  # set once the lifespan has started: later loads are swaps

    def count_reload(result: str) -> None:
        metrics.reloads.labels(result).inc()
        for variant in state.variants.all:
            if variant.models.current is not None:
                metrics.model_version.labels(variant.name).set(variant.models.current.version)
        if result == "success" and serving:  # a swap: the new model's objects join the frozen
            freeze_heap(collect=True)  # heap, the old one's go

    store = make_store(settings)
    state = AppState(
        settings=settings, store=store, metrics=metrics,
        # One model manager per A/B variant (one `default` without AB_VARIANTS).
        variants=build_variants(settings, on_reload=count_reload),
        attribution=make_attribution(settings, store),
        availability=make_availability(store, metrics),
        batcher=Batcher(settings.batch_max_size, settings.batch_window_ms, metrics)
        if settings.batch_max_size > 1 else None,
        shaping=Shaping(
            merge_cosine=settings.interest_merge_cosine if settings.adaptive_interests else None,
            min_name_confidence=settings.min_name_confidence,
            copy_cosine=settings.interest_merge_cosine,
            rows=RowPolicy(size=settings.row_size, min_support=settings.row_min_support,
                           history_weight=settings.row_history_weight,
                           min_ratio=settings.row_min_ratio, min_size=settings.row_min_size),
            row_fields=tuple(f.strip() for f in settings.row_fields.split(",") if f.strip()),
            new_item_share=settings.new_item_share))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.store.stream_stats()  # creates the nightly job's consumer group if missing
        await state.variants.refresh()
        for variant in state.variants.all:
            if variant.models.current is None:
                log.warning("no bundle yet; not ready until one appears",
                            extra={"models_dir": str(variant.models.root),
                                   "variant": variant.name})
        try:  # before serving: a restart must not serve what was marked unavailable
            await state.availability.refresh()
        except StoreUnavailable as exc:
            log.warning("availability store unavailable at start; polling it",
                        extra={"error": str(exc)})
        freeze_heap(collect=False)
        nonlocal serving
        serving = True
        # One loop polls every variant's models; each swaps on its own.
        watcher = asyncio.create_task(state.variants.watch(settings.reload_interval_seconds))
        availability = asyncio.create_task(
            state.availability.watch(settings.availability_refresh_seconds))
        log.info("service started", extra={"store": state.store.kind,
                                           "models": str(state.models.root),
                                           "variants": {v.name: v.spec.label
                                                        for v in state.variants.all},
                                           "pid": os.getpid()})
        try:
            yield
        finally:
            # Each step bounded: a stop must not hang on a poller or a store connection.
            for task in (watcher, availability):
                task.cancel()
            await bounded_shutdown("pollers", asyncio.wait({watcher, availability}))
            if state.batcher is not None:
                await bounded_shutdown("batcher", state.batcher.close())
            await bounded_shutdown("history store", state.store.close())
            mark_worker_dead()  # multiprocess metrics: this worker's live gauges go

    # /docs and /redoc with their assets served from the package, so they work offline.
    # FastAPI's native OpenTelemetry is off: the service has its own Prometheus metrics and
    # logs, and the per-request check for a configured provider cost ~10 us (issue 24).
    app = FastAPIOffline(title="EIMF multi-interest recommender", version="1",
                         lifespan=lifespan,
                         telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.recsys = state
    app.openapi = lambda: schema_with_limits(app, settings)  # type: ignore[method-assign]
    app.include_router(recommend.router)
    app.include_router(events.router)
    app.include_router(ops.router)
    app.include_router(users.router)
    app.include_router(items.router)
    app.include_router(ui.router)  # the web page, GET / and /ui

    # Every error body carries the request id (the X-Request-ID header has it too); every 503
    # says when to try again.
    def error(detail: Any, status_code: int, headers: dict[str, str] | None = None
              ) -> JSONResponse:
        if status_code == 503 and "Retry-After" not in (headers or {}):
            headers = {**(headers or {}), "Retry-After": str(RETRY_AFTER_SECONDS)}
        return JSONResponse({"detail": detail, "request_id": request_id_var.get()},
                            status_code=status_code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI's body parsing
            detail = unparseable_body(exc.__cause__) or detail
        return error(detail, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(exc.errors())
        whole_body = [d for d in details if d["loc"] == ["body"] and d["type"] in NOT_AN_OBJECT]
        if whole_body:  # the body as a whole is not an object: a wrong content type, or not one
            content_type = request.headers.get("content-type")
            if not is_json(content_type):
                return error(f"send the body as JSON with Content-Type: application/json "
                             f"(got {'none' if content_type is None else repr(content_type)})",
                             415)
            for d in whole_body:
                d["msg"] = "the body must be a JSON object"
                d.pop("input", None)
        return error(details, 422)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # One place for every route that needs the store; /recommend degrades instead. The
        # cause names Redis's address: logged (with the request id), not answered.
        metrics.redis_errors.inc()
        log.warning("history store unavailable", extra={"error": str(exc),
                                                        "path": request.url.path})
        return error("history store unavailable; retry later", 503)

    @app.exception_handler(EventLogFull)
    async def event_log_full(request: Request, exc: EventLogFull) -> JSONResponse:
        metrics.events.labels("refused_log_full").inc()
        return error(str(exc), 503, {"Retry-After": "60"})

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLog, metrics=metrics)  # outermost: sees every response
    return app
