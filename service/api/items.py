"""GET /items/{item_id}/similar: "more like this" (a product page's other call); POST and GET
/items/availability: items never to serve until made available again.

The nearest items by the served bundle's item vectors, through the same index and the same
filters as POST /recommend (service/serving/filters.py), the item itself left out. Served by
the primary model (no user, so no A/B variant).
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi import Path as PathParam
from pydantic import BeforeValidator, StringConstraints

from service.api import events  # noqa: F401 (registers the {x:anyid} path convertor)
from service.deps import State, require_admin_key, require_api_key
from service.schemas import (
    ADMIN_RESPONSES,
    ERROR_RESPONSES,
    AvailabilityChange,
    AvailabilityResponse,
    Id,
    SimilarItem,
    SimilarResponse,
    invalid,
)
from service.serving.filters import FilterError, ItemFilter

log = logging.getLogger("service.items")
router = APIRouter(tags=["items"], dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)


def whole_number(value: Any) -> Any:
    """k in the query follows the body's rule (a JSON integer: 3, not 3.0): digits only."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,9}", value):
        raise ValueError("must be a whole number written in digits, e.g. 3 (not 3.0)")
    return value


QueryCount = Annotated[int, BeforeValidator(whole_number)]
FieldPair = Annotated[str, StringConstraints(pattern=r"^[^:]+:.+$", max_length=512)]
FieldFilters = Annotated[list[FieldPair] | None, Query(
    description="field:value, repeatable (e.g. category:Comedy); include: an item must hold "
                "one of the listed values of every field named; exclude: items holding any "
                "are left out")]


def parse_pairs(pairs: list[str] | None) -> dict[str, list[str]]:
    """['category:Comedy', 'category:Drama'] -> {'category': ['Comedy', 'Drama']} (the
    FieldPair pattern has checked the form)."""
    out: dict[str, list[str]] = {}
    for pair in pairs or []:
        name, _, value = pair.partition(":")
        out.setdefault(name, []).append(value)
    return out


@router.get("/items/{item_id:anyid}/similar", response_model=SimilarResponse,
            responses={404: {"description": "the item is not in the served catalogue"}})
async def similar_items(
    item_id: Annotated[Id, PathParam(description="the item id (may contain '/')")],
    state: State,
    k: Annotated[QueryCount | None, Query(ge=1, description="items to return (default: "
                                                     "DEFAULT_K)")] = None,
    include: FieldFilters = None,
    exclude: FieldFilters = None,
    item_ids: Annotated[list[Id] | None, Query(
        description="an allow-list, repeatable: only these items")] = None,
) -> SimilarResponse:
    settings = state.settings
    k = k or settings.default_k
    if k > settings.max_k:
        raise invalid(("k",), f"k={k} is above the maximum {settings.max_k}", k,
                      "less_than_equal", where="query")
    model = state.models.current
    if model is None:  # Retry-After and the request id: service/app.py
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no model loaded yet; retry later")
    if item_id not in model.internal:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"item {item_id!r} is not in the served catalogue (model "
                            f"{model.name} v{model.version})")
    item_filter = ItemFilter(include=parse_pairs(include), exclude=parse_pairs(exclude),
                             item_ids=item_ids)
    try:
        allowed, gone = model.restrict(item_filter, state.availability.current)
    except FilterError as exc:  # loc ("filter", part, field) -> the query parameter
        raise invalid(exc.loc[1:], exc.message, exc.value, where="query") from exc
    found = model.similar(item_id, k, allowed, gone)
    return SimilarResponse(
        item_id=item_id, model_name=model.name, model_version=model.version,
        items=[SimilarItem(item_id=i, score=s, title=t or None)
               for i, s, t in zip(found.item_ids, found.scores, found.titles, strict=True)])


@router.post("/items/availability", response_model=AvailabilityResponse,
             dependencies=[Depends(require_admin_key)], responses=ADMIN_RESPONSES)
async def change_availability(body: AvailabilityChange, state: State) -> AvailabilityResponse:
    """Mark items unavailable (recalled, sold out) or available again, in one change: every
    worker and replica stops serving them within AVAILABILITY_REFRESH_SECONDS (this one at
    once), the popularity fallback and similar items included. Ids are external, so the set
    outlives bundle swaps and restarts; ids no model knows are kept for the next one."""
    both = sorted(set(body.unavailable) & set(body.available))
    if both:
        raise invalid(("available",), f"ids both unavailable and available: {both[:5]}",
                      None)
    snapshot = await state.availability.change(body.unavailable, body.available)
    log.info("availability changed", extra={"unavailable": len(body.unavailable),
                                            "available": len(body.available),
                                            "version": snapshot.version,
                                            "unavailable_items": len(snapshot.unavailable)})
    return AvailabilityResponse(version=snapshot.version,
                                unavailable_items=len(snapshot.unavailable))


@router.get("/items/availability", response_model=AvailabilityResponse)
async def availability(state: State) -> AvailabilityResponse:
    """The unavailable ids as this worker serves with them (refreshed from the store)."""
    await state.availability.refresh()
    current = state.availability.current
    return AvailabilityResponse(version=current.version,
                                unavailable_items=len(current.unavailable),
                                unavailable=sorted(current.unavailable))
