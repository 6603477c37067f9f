"""The FastAPI application: lifespan (load the model once, watch for new ones), middleware
(request id, structured access log, latency histogram, body size cap), error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import events, ops, recommend
from service.deps import AppState
from service.history import (
    HistoryStore,
    InMemoryHistoryStore,
    RedisHistoryStore,
    StoreUnavailable,
)
from service.models import ModelManager
from service.observability import Metrics, configure_logging, request_id_var
from service.settings import Settings, get_settings

log = logging.getLogger("service.app")


def make_store(settings: Settings) -> HistoryStore:
    if settings.redis_url:
        return RedisHistoryStore(
            settings.redis_url, settings.history_max_len, settings.history_ttl_seconds,
            settings.event_stream, settings.event_stream_max_len,
            settings.event_dedup_ttl_seconds)
    return InMemoryHistoryStore(settings.history_max_len, settings.history_ttl_seconds,
                                settings.event_stream_max_len, settings.event_dedup_ttl_seconds)


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
    """Request id (X-Request-ID in and out), latency histogram by route, one JSON log line.

    Plain ASGI rather than @app.middleware("http"), which costs a task per request.
    """

    QUIET = ("/metrics", "/healthz", "/readyz")

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] \
            or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_seconds.labels(route, scope["method"], str(status)).observe(
                elapsed)
            if route not in self.QUIET or status >= 400:
                log.info("request", extra={"method": scope["method"], "path": route,
                                           "status": status, "ms": round(elapsed * 1000, 2)})
            request_id_var.reset(token)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    metrics = Metrics()

    def count_reload(result: str) -> None:
        metrics.reloads.labels(result).inc()
        if state.models.current is not None:
            metrics.model_version.set(state.models.current.version)

    state = AppState(
        settings=settings, store=make_store(settings), metrics=metrics,
        models=ModelManager(settings.models_dir, settings.model_name, settings.onnx_threads,
                            settings.faiss_threads, on_reload=count_reload))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.models.refresh()
        if state.models.current is None:
            log.warning("no bundle yet; not ready until one appears",
                        extra={"models_dir": str(state.models.root)})
        watcher = asyncio.create_task(state.models.watch(settings.reload_interval_seconds))
        log.info("service started", extra={"store": state.store.kind,
                                           "models": str(state.models.root)})
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await state.store.close()

    app = FastAPI(title="EIMF multi-interest recommender", version="1", lifespan=lifespan)
    app.state.recsys = state
    app.include_router(recommend.router)
    app.include_router(events.router)
    app.include_router(ops.router)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # One place for every route that needs the store; /recommend degrades instead.
        metrics.redis_errors.inc()
        return JSONResponse({"detail": f"history store unavailable: {exc}"}, status_code=503)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Never a traceback to the client; the log has it, keyed by the request id.
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error", "request_id": request_id_var.get()},
                            status_code=500)

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLog, metrics=metrics)  # outermost: sees every response
    return app
