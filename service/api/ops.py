"""Health, readiness, metrics and the served model."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Depends, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import ServedModel, State, require_api_key
from service.schemas import ERROR_RESPONSES

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str | int]:
    """Alive; `pid` tells which worker process answered (WORKERS > 1)."""
    return {"status": "ok", "pid": os.getpid()}


@router.get("/readyz", responses={503: {"description": "not ready: the body says which check "
                                                     "failed"}})
async def readyz(state: State) -> JSONResponse:
    model = state.models.current
    store_ok = await state.store.ping()
    checks = {"model": model is not None, "store": store_ok}
    body: dict[str, Any] = {"ready": all(checks.values()), "checks": checks,
                            "store": state.store.kind,
                            "model_version": model.version if model else None,
                            "pid": os.getpid()}
    code = status.HTTP_200_OK if body["ready"] else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse(body, status_code=code)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}},
                             "description": "Prometheus text format"}})
async def metrics(state: State) -> Response:
    stats = await state.store.stream_stats()
    if stats is not None:
        state.metrics.event_stream_length.set(stats.length)
        state.metrics.event_stream_lag.set(stats.lag)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/model", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
async def model_info(state: State, model: ServedModel) -> dict[str, Any]:
    return {"path": str(model.bundle.path), "manifest": model.bundle.manifest.model_dump(),
            "refused_versions": sorted(state.models.refused),
            "last_error": state.models.last_error}


@router.post("/model/reload", dependencies=[Depends(require_api_key)],
             responses=ERROR_RESPONSES)
async def reload(state: State) -> dict[str, Any]:
    """Check for a newer bundle now instead of waiting for the watcher."""
    changed = await state.models.refresh()
    current = state.models.current
    return {"changed": changed, "model_version": current.version if current else None,
            "last_error": state.models.last_error}
