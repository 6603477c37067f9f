"""POST /recommend."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends

from service.deps import ServedModel, State, require_api_key
from service.history import StoreUnavailable
from service.schemas import (
    ERROR_RESPONSES,
    InterestSummary,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    invalid,
)

router = APIRouter(tags=["recommend"], dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)
log = logging.getLogger("service.recommend")


@router.post("/recommend", response_model=RecommendResponse)
async def recommend(body: RecommendRequest, state: State, model: ServedModel) -> RecommendResponse:
    settings, metrics = state.settings, state.metrics
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
    history = stored + (body.history or [])
    exclude = body.exclude + (history if body.exclude_seen else [])
    if state.batcher is None:  # BATCH_MAX_SIZE=1: computed alone, on the event loop
        result = model.recommend(history, k, exclude, settings.per_interest_fanout)
    else:  # shares one encoder run and one search with concurrent requests, off the loop
        result = await state.batcher.recommend(model, history, k, exclude,
                                               settings.per_interest_fanout)

    metrics.recommendations.inc()
    metrics.unknown_items.inc(result.unknown_items)
    if result.fallback:
        metrics.fallbacks.inc()
    sources = [name for name, used in (("stored", stored), ("request", body.history)) if used]
    return RecommendResponse(
        user_id=body.user_id, model_name=model.name, model_version=model.version,
        items=[RecommendedItem(item_id=i, score=s, interest=w, title=t or None)
               for i, t, s, w in zip(result.item_ids, result.titles, result.scores,
                                     result.interests, strict=True)],
        interests=[InterestSummary(interest=i, items=c)
                   for i, c in enumerate(result.interest_counts)],
        fallback=result.fallback, history_source="+".join(sources) or "none",
        history_length=result.used_history, unknown_items=result.unknown_items,
        degraded=degraded)
