"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Ids are strings; JSON numbers are accepted and turned into strings ("42").
Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class RecommendRequest(Body):
    user_id: Id
    k: int | None = Field(None, ge=1, description="items to return (default: DEFAULT_K)")
    history: list[Id] | None = Field(
        None, description="recent item ids, oldest first; appended after the stored history")
    use_stored_history: bool = Field(True, description="read the user's history from the store")
    exclude: list[Id] = Field(default_factory=list)
    exclude_seen: bool = Field(False, description="drop items in the history from the results")


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    interest: int | None = Field(description="index of the interest it came from; "
                                             "null for the popularity fallback")
    title: str | None = None


class InterestSummary(BaseModel):
    interest: int
    items: int = Field(description="how many returned items this interest contributed")


class RecommendResponse(BaseModel):
    user_id: str
    model_name: str
    model_version: int
    items: list[RecommendedItem]
    interests: list[InterestSummary]
    fallback: bool = Field(description="popularity fallback: no usable history")
    history_source: Literal["stored", "request", "stored+request", "none"]
    history_length: int = Field(description="known history items fed to the encoder")
    unknown_items: int = Field(description="history ids not in the catalogue (ignored)")
    degraded: bool = Field(False, description="the history store was unreachable; the "
                                              "request's own history was used")


class EventIn(Body):
    user_id: Id
    item_id: Id
    timestamp: float | None = Field(None, ge=0, description="epoch seconds (default: now)")
    event_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = Field(
        None, description="repeating an event id records it once")


class EventBatch(Body):
    events: list[EventIn] = Field(min_length=1)


class EventsResponse(BaseModel):
    accepted: int
    duplicates: int


class HistoryResponse(BaseModel):
    user_id: str
    items: list[str]


class DeleteResponse(BaseModel):
    user_id: str
    deleted: bool
