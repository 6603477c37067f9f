"""POST /recommend."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace

from fastapi import APIRouter, Depends

from service.ab.attribution import AttributionUnavailable
from service.deps import AppState, State, require_api_key, variant_model
from service.observability import request_id_var
from service.schemas import (
    ERROR_RESPONSES,
    FastJSONResponse,
    RecommendRequest,
    RecommendResponse,
    invalid,
    recommend_body,
)
from service.serving.filters import FilterError
from service.store.history import StoreUnavailable

router = APIRouter(tags=["recommend"], dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)
log = logging.getLogger("service.recommend")


@router.post("/recommend", response_model=RecommendResponse)
async def recommend(body: RecommendRequest, state: State) -> FastJSONResponse:
    """The variant is the user's (service/ab/: a stable hash of the user id); the answer
    says which, and its request_id lets events be credited to it."""
    if state.batcher is None:
        return await answer(body, state)
    with state.batcher.admit():  # a request alone in the worker skips the batch queue
        return await answer(body, state)


async def answer(body: RecommendRequest, state: State) -> FastJSONResponse:
    started = time.perf_counter()
    settings, metrics = state.settings, state.metrics
    variant = state.variants.for_user(body.user_id)
    model = variant_model(variant)  # captured now: the answer reports the model it used
    k = body.k or settings.default_k
    if k > settings.max_k:
        raise invalid(("k",), f"k={k} is above the maximum {settings.max_k}", k,
                      "less_than_equal")
    if body.history is not None and len(body.history) > settings.max_request_history:
        raise invalid(("history",), f"history has {len(body.history)} items; at most "
                                    f"{settings.max_request_history} are accepted", None,
                      "too_long")
    stored: list[str] = []
    degraded = False
    if body.use_stored_history:
        try:
            stored = await state.store.history(body.user_id)
        except StoreUnavailable as exc:
            # A recommendation is still better than an error: the request's own history, or
            # (without one) the popularity fallback, flagged as degraded.
            metrics.redis_errors.inc()
            degraded = True
            metrics.degraded.inc()
            log.warning("history store unavailable; answering without the stored history",
                        extra={"error": str(exc)})
    try:
        allowed, gone = model.restrict(body.filter.to_filter() if body.filter else None,
                                       state.availability.current)
    except FilterError as exc:
        raise invalid(exc.loc, exc.message, exc.value) from exc
    history = stored + (body.history or [])
    exclude = body.exclude + (history if body.exclude_seen else [])
    shaping = state.shaping
    if body.diversity:
        shaping = replace(shaping, diversity=body.diversity)
    if body.rows:
        shaping = replace(shaping, rows=replace(
            shaping.rows, rows=body.rows, size=body.row_size or shaping.rows.size))
    if state.batcher is None:  # BATCH_MAX_SIZE=1: computed alone, on the event loop
        result = model.recommend(history, k, exclude, settings.per_interest_fanout, shaping,
                                 allowed, gone)
    else:  # shares one encoder run and one search with concurrent requests
        result = await state.batcher.recommend(model, history, k, exclude,
                                               settings.per_interest_fanout, shaping, allowed,
                                               gone)

    # The middleware's X-Request-ID, so that the body and the header agree.
    request_id = request_id_var.get() or uuid.uuid4().hex
    if state.variants.tracking:
        await remember(state, request_id, body.user_id, variant.name,
                       skip=degraded and state.attribution.kind == "redis")
    metrics.recommendations.labels(variant.name).inc()
    metrics.recommend_seconds.labels(variant.name).observe(time.perf_counter() - started)
    metrics.unknown_items.inc(result.unknown_items)
    if result.fallback:
        metrics.fallbacks.inc()
    sources = [name for name, used in (("stored", stored), ("request", body.history)) if used]
    return FastJSONResponse(recommend_body(
        result, user_id=body.user_id, variant=variant.name, request_id=request_id,
        model_name=model.name, model_version=model.version,
        history_source="+".join(sources) or "none", degraded=degraded,
        ids=model.bundle.item_ids, titles=model.bundle.titles, is_new=model.bundle.is_new))


async def remember(state: AppState, request_id: str, user_id: str, variant: str,
                   skip: bool) -> None:
    """Record which variant served this request (A/B attribution). Never fails the answer:
    without the store the request is just not counted (`recsys_ab_errors_total`). `skip`: Redis
    already failed this request (degraded), so do not wait on it a second time."""
    try:
        if skip:
            raise AttributionUnavailable("the history store (same Redis) is unavailable")
        await state.attribution.served(request_id, user_id, variant)
    except AttributionUnavailable as exc:
        state.metrics.ab_errors.inc()
        log.warning("A/B attribution store unavailable; this answer cannot earn events",
                    extra={"error": str(exc), "variant": variant})
