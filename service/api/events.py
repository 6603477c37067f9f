"""POST /events and the per-user history routes."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, HTTPException

from service.deps import State, require_api_key
from service.history import Event, new_event_id
from service.schemas import DeleteResponse, EventBatch, EventIn, EventsResponse, HistoryResponse

router = APIRouter(tags=["events"], dependencies=[Depends(require_api_key)])


@router.post("/events", response_model=EventsResponse)
async def record_events(body: EventIn | EventBatch, state: State) -> EventsResponse:
    """One event, or {"events": [...]}; a batch is stored in timestamp order."""
    incoming = body.events if isinstance(body, EventBatch) else [body]
    if len(incoming) > state.settings.max_events_per_request:
        raise HTTPException(422,
                            f"{len(incoming)} events; at most "
                            f"{state.settings.max_events_per_request} per request")
    now = time.time()
    events = [Event(e.user_id, e.item_id, e.timestamp if e.timestamp is not None else now,
                    e.event_id or new_event_id()) for e in incoming]
    events.sort(key=lambda e: e.timestamp)  # stable: equal timestamps keep the body's order
    accepted = await state.store.record(events)  # StoreUnavailable -> 503 (service/app.py)
    n = sum(accepted)
    state.metrics.events.labels("accepted").inc(n)
    state.metrics.events.labels("duplicate").inc(len(accepted) - n)
    return EventsResponse(accepted=n, duplicates=len(accepted) - n)


@router.get("/users/{user_id}/history", response_model=HistoryResponse)
async def get_history(user_id: str, state: State) -> HistoryResponse:
    return HistoryResponse(user_id=user_id, items=await state.store.history(user_id))


@router.delete("/users/{user_id}/history", response_model=DeleteResponse)
async def delete_history(user_id: str, state: State) -> DeleteResponse:
    return DeleteResponse(user_id=user_id, deleted=await state.store.delete(user_id))
