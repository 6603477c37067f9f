"""Health, readiness, metrics, the served models and the A/B report."""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.ab.attribution import AttributionUnavailable, wilson_interval
from service.deps import ServedModel, State, require_admin_key
from service.schemas import ADMIN_RESPONSES, ABReport, VariantReport
from service.serving.variants import Variant

log = logging.getLogger("service.ops")
router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str | int]:
    """Alive; `pid` tells which worker process answered (WORKERS > 1)."""
    return {"status": "ok", "pid": os.getpid()}


@router.get("/readyz", responses={503: {"description": "not ready: the body says which check "
                                                     "failed"}})
async def readyz(state: State) -> JSONResponse:
    """Ready when every A/B variant has a model and the store answers; `model_version` is the
    control's (the only variant's without A/B), `variants` each variant's."""
    model = state.models.current
    store_ok = await state.store.ping()
    checks = {"model": state.variants.ready, "store": store_ok}
    body: dict[str, Any] = {"ready": all(checks.values()), "checks": checks,
                            "store": state.store.kind,
                            "model_version": model.version if model else None,
                            "variants": {v.name: served_version(v) for v in state.variants.all},
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


@router.get("/model", dependencies=[Depends(require_admin_key)], responses=ADMIN_RESPONSES)
async def model_info(state: State, model: ServedModel) -> dict[str, Any]:
    """The control's model at top level (the only one without A/B); `variants`: each
    variant's model, version and refusals."""
    return {"path": str(model.bundle.path), "manifest": model.bundle.manifest.model_dump(),
            "refused_versions": sorted(state.models.refused),
            "last_error": state.models.last_error,
            "experiment": state.variants.experiment,
            "variants": [{"variant": v.name, "share": v.spec.share, "model_name": v.spec.model,
                          "pinned_version": v.spec.version, "model_version": served_version(v),
                          "path": str(v.models.current.bundle.path)
                          if v.models.current is not None else None,
                          "refused_versions": sorted(v.models.refused),
                          "last_error": v.models.last_error}
                         for v in state.variants.all]}


@router.post("/model/reload", dependencies=[Depends(require_admin_key)],
             responses=ADMIN_RESPONSES)
async def reload(state: State) -> dict[str, Any]:
    """Check for a newer bundle now instead of waiting for the watcher (every variant)."""
    changed = await state.variants.refresh()
    current = state.models.current
    return {"changed": changed[state.variants.primary.name],
            "model_version": current.version if current else None,
            "last_error": state.models.last_error,
            "variants": {v.name: {"changed": changed[v.name], "model_version": served_version(v),
                                  "last_error": v.models.last_error}
                         for v in state.variants.all}}


@router.get("/ab/report", response_model=ABReport,
            dependencies=[Depends(require_admin_key)], responses=ADMIN_RESPONSES)
async def ab_report(state: State) -> ABReport:
    """Per variant: requests served, events attributed, requests clicked and click-through,
    counted since AB_EXPERIMENT started (shared by workers and replicas with Redis)."""
    names = [v.name for v in state.variants.all]
    try:
        counts = await state.attribution.counts(names)
    except AttributionUnavailable as exc:
        state.metrics.ab_errors.inc()  # the log has the cause (it names Redis's address)
        log.warning("A/B attribution store unavailable", extra={"error": str(exc)})
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "A/B attribution store unavailable; retry later") from exc
    variants = []
    for variant in state.variants.all:
        c = counts.variants[variant.name]
        interval = wilson_interval(c.clicked, c.requests)
        variants.append(VariantReport(
            variant=variant.name, share=variant.spec.share, model_name=variant.spec.model,
            pinned_version=variant.spec.version, model_version=served_version(variant),
            requests=c.requests, attributed_events=c.events, clicked_requests=c.clicked,
            ctr=c.clicked / c.requests if c.requests else None,
            ctr_ci95=list(interval) if interval is not None else None))
    return ABReport(experiment=state.variants.experiment, tracking=state.variants.tracking,
                    store=state.attribution.kind,  # type: ignore[arg-type]
                    attribution_ttl_seconds=state.settings.ab_attribution_ttl_seconds,
                    variants=variants, unattributed_events=counts.unattributed)


def served_version(variant: Variant) -> int | None:
    return variant.models.current.version if variant.models.current is not None else None
