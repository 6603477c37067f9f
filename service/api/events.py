"""POST /events and the per-user history routes."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import Discriminator, Tag
from starlette.convertors import PathConvertor, register_url_convertor

from service.ab.attribution import AttributionUnavailable, Claim
from service.deps import AppState, State, require_admin_key, require_api_key
from service.schemas import (
    ADMIN_RESPONSES,
    ERROR_RESPONSES,
    DeleteResponse,
    EventBatch,
    EventIn,
    EventsResponse,
    HistoryResponse,
    UserIdPath,
    invalid,
)
from service.store.events import Event, new_event_id


class AnyIdConvertor(PathConvertor):
    """Like {x:path} ("/" allowed) but matching any character, so that an id holding a
    newline reaches validation (a 422 naming the rule) instead of matching no route (404)."""

    regex = r"[\s\S]*"


register_url_convertor("anyid", AnyIdConvertor())

# POST /events takes either shape; the body's own shape is validated (an object with "events"
# is a batch), so a 422 lists what is wrong with that shape only. The tags are dropped from
# the error locations (service/app.py): ["body", "events", 1, "item_id"].
SHAPE_TAGS = frozenset({"one-event", "event-batch"})


def event_shape(value: Any) -> str:
    return "event-batch" if isinstance(value, dict) and "events" in value else "one-event"


EventsBody = Annotated[Annotated[EventIn, Tag("one-event")] | Annotated[EventBatch,
                                                                         Tag("event-batch")],
                       Discriminator(event_shape)]

log = logging.getLogger("service.events")
router = APIRouter(tags=["events"], dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)


@router.post("/events", response_model=EventsResponse)
async def record_events(body: EventsBody, state: State) -> EventsResponse:
    """One event, or {"events": [...]}; a batch is stored in timestamp order."""
    incoming = body.events if isinstance(body, EventBatch) else [body]
    if len(incoming) > state.settings.max_events_per_request:
        raise invalid(("events",), f"{len(incoming)} events; at most "
                                   f"{state.settings.max_events_per_request} per request",
                      None, "too_long")
    now = time.time()
    # Each event with the request id it names (A/B attribution), sorted together; stable:
    # equal timestamps keep the body's order.
    pairs = sorted(((Event(e.user_id, e.item_id, e.timestamp if e.timestamp is not None else now,
                           e.event_id or new_event_id()), e.request_id) for e in incoming),
                   key=lambda pair: pair[0].timestamp)
    events = [event for event, _ in pairs]
    # StoreUnavailable and EventLogFull -> 503 (service/app.py); either way nothing is stored.
    accepted = await state.store.record(events)
    n = sum(accepted)
    state.metrics.events.labels("accepted").inc(n)
    state.metrics.events.labels("duplicate").inc(len(accepted) - n)
    # Only stored events earn credit: a repeated event id is not attributed twice.
    claims = [Claim(request_id, event.user_id)
              for (event, request_id), ok in zip(pairs, accepted, strict=True)
              if ok and request_id is not None]
    if claims and state.variants.tracking:
        await attribute(state, claims)
    return EventsResponse(accepted=n, duplicates=len(accepted) - n)


async def attribute(state: AppState, claims: list[Claim]) -> None:
    """Credit events to the variants that served their request ids. The events are stored
    already, so a failing attribution store does not fail the request (a retry would be a
    duplicate, never attributed): those events go uncounted (`recsys_ab_errors_total`)."""
    try:
        variants = await state.attribution.attribute(claims)
    except AttributionUnavailable as exc:
        state.metrics.ab_errors.inc()
        log.warning("A/B attribution store unavailable; events stored but not attributed",
                    extra={"error": str(exc), "events": len(claims)})
        return
    for variant in variants:
        if variant is None:
            state.metrics.unattributed_events.inc()
        else:
            state.metrics.attributed_events.labels(variant).inc()


# An id may hold "/" (ids are validated by one rule, service/schemas.py).
@router.get("/users/{user_id:anyid}/history", response_model=HistoryResponse)
async def get_history(user_id: UserIdPath, state: State) -> HistoryResponse:
    return HistoryResponse(user_id=user_id, items=await state.store.history(user_id))


# Deleting any user's history is an admin route (ADMIN_API_KEY when set).
@router.delete("/users/{user_id:anyid}/history", response_model=DeleteResponse,
               dependencies=[Depends(require_admin_key)], responses=ADMIN_RESPONSES)
async def delete_history(user_id: UserIdPath, state: State) -> DeleteResponse:
    return DeleteResponse(user_id=user_id, deleted=await state.store.delete(user_id))
