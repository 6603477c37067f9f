"""POST /events and the per-user history routes."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from starlette.convertors import PathConvertor, register_url_convertor

from service.deps import State, require_api_key
from service.history import Event, new_event_id
from service.schemas import (
    ERROR_RESPONSES,
    DeleteResponse,
    EventBatch,
    EventIn,
    EventsResponse,
    HistoryResponse,
    UserIdPath,
    invalid,
)


class AnyIdConvertor(PathConvertor):
    """Like {x:path} ("/" allowed) but matching any character, so that an id holding a
    newline reaches validation (a 422 naming the rule) instead of matching no route (404)."""

    regex = r"[\s\S]*"


register_url_convertor("anyid", AnyIdConvertor())

router = APIRouter(tags=["events"], dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)


@router.post("/events", response_model=EventsResponse)
async def record_events(body: EventIn | EventBatch, state: State) -> EventsResponse:
    """One event, or {"events": [...]}; a batch is stored in timestamp order."""
    incoming = body.events if isinstance(body, EventBatch) else [body]
    if len(incoming) > state.settings.max_events_per_request:
        raise invalid(("events",), f"{len(incoming)} events; at most "
                                   f"{state.settings.max_events_per_request} per request",
                      None, "too_long")
    now = time.time()
    events = [Event(e.user_id, e.item_id, e.timestamp if e.timestamp is not None else now,
                    e.event_id or new_event_id()) for e in incoming]
    events.sort(key=lambda e: e.timestamp)  # stable: equal timestamps keep the body's order
    # StoreUnavailable and EventLogFull -> 503 (service/app.py); either way nothing is stored.
    accepted = await state.store.record(events)
    n = sum(accepted)
    state.metrics.events.labels("accepted").inc(n)
    state.metrics.events.labels("duplicate").inc(len(accepted) - n)
    return EventsResponse(accepted=n, duplicates=len(accepted) - n)


# An id may hold "/" (ids are validated by one rule, service/schemas.py).
@router.get("/users/{user_id:anyid}/history", response_model=HistoryResponse)
async def get_history(user_id: UserIdPath, state: State) -> HistoryResponse:
    return HistoryResponse(user_id=user_id, items=await state.store.history(user_id))


@router.delete("/users/{user_id:anyid}/history", response_model=DeleteResponse)
async def delete_history(user_id: UserIdPath, state: State) -> DeleteResponse:
    return DeleteResponse(user_id=user_id, deleted=await state.store.delete(user_id))
