"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import Path
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr

from service.serving.filters import ItemFilter
from service.store.events import ID_PATTERN, MAX_ID_LENGTH, MAX_TIMESTAMP, check_id

if TYPE_CHECKING:
    from service.serving.recommender import Recommendation
    from service.serving.rows import Row

# Ids are JSON strings (strict: 42 is refused, "42" is the id), 1..256 characters.
Id = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_LENGTH,
                                json_schema_extra={"pattern": ID_PATTERN}),
               AfterValidator(check_id)]
# A user id in a URL path ({user_id:anyid}, so that ids holding "/" can be read back).
UserIdPath = Annotated[Id, Path(description="the user id (may contain '/')")]

# A request id: what X-Request-ID carries (service/app.py client_request_id keeps a client's
# only if it follows this rule, else makes one), so any answer's id can be posted back: 1..128
# printable ASCII characters.
MAX_REQUEST_ID_LENGTH = 128
REQUEST_ID_PATTERN = rf"^[ -~]{{1,{MAX_REQUEST_ID_LENGTH}}}$"
_REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)


def is_request_id(value: str) -> bool:
    return _REQUEST_ID_RE.fullmatch(value) is not None  # match: `$` passes a final \n


def check_request_id(value: str) -> str:
    if not is_request_id(value):
        raise ValueError(f"a request id is 1..{MAX_REQUEST_ID_LENGTH} printable ASCII "
                         f"characters (the request_id of a /recommend answer)")
    return value


RequestId = Annotated[StrictStr, Field(json_schema_extra={"pattern": REQUEST_ID_PATTERN}),
                      AfterValidator(check_request_id)]


MAX_ROWS = 10  # interest rows one answer may ask for
MAX_ROW_SIZE = 100  # items per row at most


class Body(BaseModel):
    # strict: the types the OpenAPI schema states, no coercion ("5" is not an integer).
    model_config = ConfigDict(extra="forbid", strict=True)


# Filters (service/serving/filters.py): field names and values as the bundle's items.json
# "fields" has them (category, year).
MAX_FILTER_IDS = 100_000  # an allow-list's ids at most
MAX_EXCLUDE_IDS = 1000  # ids one /recommend may exclude (each widens the search)
FieldName = Annotated[StrictStr, Field(min_length=1, max_length=64)]
FieldValue = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_LENGTH)]
FieldValues = Annotated[dict[FieldName, Annotated[list[FieldValue], Field(min_length=1)]],
                        Field(max_length=16)]


class FilterBody(Body):
    include: FieldValues = Field(default_factory=dict, description=(
        "field -> values: only items holding one of the values, for every field listed "
        "(e.g. {\"category\": [\"Comedy\"]})"))
    exclude: FieldValues = Field(default_factory=dict, description=(
        "field -> values: items holding any of them are left out"))
    item_ids: list[Id] | None = Field(None, max_length=MAX_FILTER_IDS, description=(
        "an allow-list: only these items (ids the model does not know are ignored)"))

    def to_filter(self) -> ItemFilter:
        return ItemFilter(include=self.include, exclude=self.exclude, item_ids=self.item_ids)


class RecommendRequest(Body):
    user_id: Id
    k: int | None = Field(None, ge=1, description="items to return (default: DEFAULT_K)")
    history: list[Id] | None = Field(
        None, description="recent item ids, oldest first; appended after the stored history")
    use_stored_history: bool = Field(True, description="read the user's history from the store")
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_EXCLUDE_IDS,
                              description="item ids not to recommend")
    exclude_seen: bool = Field(False, description="drop items in the history from the results")
    filter: FilterBody | None = Field(None, description=(
        "answer with the best k among the items it allows (applied inside retrieval); an "
        "unknown field or value is a 422, a filter that allows nothing an empty list"))
    diversity: float = Field(0.0, ge=0.0, le=1.0, description=(
        "0: the K interests' items merged by score; up to 1: places go to interests not yet "
        "represented in the list at the cost of score (ignored with ADAPTIVE_INTERESTS)"))
    rows: int = Field(0, ge=0, le=MAX_ROWS, description=(
        "interest rows to return beside the list (0: none, the list alone): up to this many "
        "explicit interests of the user (item categories, ESIM labels), each with the best "
        "items inside it; a user with one taste gets one row; no item is in two rows; "
        "filters, exclusions and availability apply as to the list"))
    row_size: int | None = Field(None, ge=1, le=MAX_ROW_SIZE, description=(
        "items per row (default: ROW_SIZE)"))


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    interest: int | None = Field(description="index of the interest it came from; "
                                             "null for the popularity fallback")
    title: str | None = None
    new: bool = Field(False, description="an item without any event yet, placed by its text "
                                         "(NEW_ITEM_SHARE gives such items the list's last "
                                         "places)")


class InterestSummary(BaseModel):
    interest: int
    items: int = Field(description="how many returned items this interest contributed")
    weight: float = Field(description="share of the user's recent history this interest "
                                      "explains best (with ADAPTIVE_INTERESTS: its share of "
                                      "the list); 0 for a dropped or merged interest")
    name: str | None = Field(None, description="what the interest is about, from the "
                             "bundle's interest vocabulary (models trained with ESIM); null "
                             "when not confident enough or the bundle has no vocabulary")
    confidence: float | None = Field(None, description="cosine of the interest and its "
                                     "nearest vocabulary label; null without a vocabulary")
    merged_into: int | None = Field(None, description="the interest this near-copy (within "
                                    "INTEREST_MERGE_COSINE) is reported as: its items and weight "
                                    "count there (with ADAPTIVE_INTERESTS it is also merged in "
                                    "the list)")
    dropped: bool = Field(False, description="ADAPTIVE_INTERESTS: no history item supports "
                                             "this interest, so it retrieved nothing")


class InterestRow(BaseModel):
    interest: str = Field(description="the explicit interest, as `source:name` (e.g. "
                                      "`category:Comedy`): usable as a filter on that field")
    name: str = Field(description="what to call the row (the field's value)")
    source: str = Field(description="the item field the interest comes from: `category`, "
                                    "`esim_label` (ESIM's item labels), or a declared field")
    confidence: float = Field(description="the model's predicted share of the user's next "
                                          "item that falls inside this interest (0..1), blended "
                                          "with the history's share as ROW_HISTORY_WEIGHT says")
    because: list[str] = Field(description="the history items it stands for, most recent first")
    because_titles: list[str | None] = Field(description="their titles")
    items: list[RecommendedItem] = Field(description="the best items inside the interest by "
                                                     "the list's score, best first")


class RecommendResponse(BaseModel):
    user_id: str
    variant: str = Field(description="the A/B variant that served this answer (`default` "
                                     "without AB_VARIANTS)")
    request_id: str = Field(description="this answer's X-Request-ID; send it with the events "
                                        "it leads to (POST /events `request_id`)")
    model_name: str
    model_version: int
    items: list[RecommendedItem]
    interests: list[InterestSummary]
    fallback: bool = Field(description="popularity fallback: no usable history")
    history_source: Literal["stored", "request", "stored+request", "none"]
    history_length: int = Field(description="known history items fed to the encoder")
    unknown_items: int = Field(description="history ids not in the catalogue (ignored)")
    degraded: bool = Field(False, description="the history store was unreachable: only the "
                                              "request's own history was used (none: the "
                                              "popularity fallback)")
    rows: list[InterestRow] = Field(default_factory=list, description=(
        "interest rows (`rows` in the request; empty when not asked for, or for the "
        "popularity fallback, which has no history to stand for)"))


class FastJSONResponse(Response):
    """A body already shaped as its response model (e.g. `recommend_body`), serialised by
    orjson: FastAPI's own path builds the model objects and validates them again on the way
    out, about a tenth of a request's CPU (docs/results.md, "Serving overhead"). The route
    keeps its response_model, so the OpenAPI schema is unchanged; the tests check the bodies
    against it."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def recommend_body(result: Recommendation, *, user_id: str, variant: str, request_id: str,
                   model_name: str, model_version: int, history_source: str, degraded: bool,
                   ids: np.ndarray, titles: np.ndarray, is_new: np.ndarray) -> dict[str, Any]:
    """A RecommendResponse as plain JSON types (keys and order as the model's); `ids`,
    `titles`, `is_new`: the bundle's, by row."""
    return {
        "user_id": user_id, "variant": variant, "request_id": request_id,
        "model_name": model_name, "model_version": model_version,
        "items": [{"item_id": i, "score": s, "interest": w, "title": t or None, "new": n}
                  for i, s, w, t, n in zip(result.item_ids, result.scores, result.interests,
                                           result.titles,
                                           result.new or [False] * len(result.item_ids),
                                           strict=True)],
        "interests": [{"interest": i, "items": c, "weight": float(d.weight), "name": d.name,
                       "confidence": None if d.confidence is None else float(d.confidence),
                       "merged_into": d.merged_into, "dropped": d.dropped}
                      for i, (c, d) in enumerate(zip(result.interest_counts,
                                                     result.interest_details, strict=True))],
        "fallback": result.fallback, "history_source": history_source,
        "history_length": result.used_history, "unknown_items": result.unknown_items,
        "degraded": degraded,
        "rows": [row_body(row, ids, titles, is_new) for row in result.rows],
    }


def row_body(row: Row, ids: np.ndarray, titles: np.ndarray, is_new: np.ndarray
             ) -> dict[str, Any]:
    """An InterestRow as plain JSON types; `ids`, `titles`, `is_new`: the bundle's, by row."""
    interest = row.interest
    because = np.asarray(interest.because, dtype=np.int64)
    return {
        "interest": f"{interest.field}:{interest.name}", "name": interest.name,
        "source": interest.field, "confidence": interest.score,
        "because": ids[because].tolist(),
        "because_titles": [t or None for t in titles[because].tolist()],
        "items": [{"item_id": i, "score": s, "interest": h, "title": t or None, "new": n}
                  for i, s, h, t, n in zip(ids[list(row.rows)].tolist(), row.scores, row.heads,
                                           titles[list(row.rows)].tolist(),
                                           is_new[list(row.rows)].tolist(), strict=True)],
    }


class SimilarItem(BaseModel):
    item_id: str
    score: float = Field(description="inner product of the two items' vectors")
    title: str | None = None


class SimilarResponse(BaseModel):
    item_id: str
    model_name: str
    model_version: int
    items: list[SimilarItem]


class AvailabilityChange(Body):
    unavailable: list[Id] = Field(default_factory=list, max_length=MAX_FILTER_IDS,
                                  description="item ids never to serve from now on")
    available: list[Id] = Field(default_factory=list, max_length=MAX_FILTER_IDS,
                                description="item ids to serve again")


class AvailabilityResponse(BaseModel):
    version: int = Field(description="the availability set's version (0: never changed)")
    unavailable_items: int = Field(description="ids marked unavailable (any catalogue's)")
    unavailable: list[str] | None = Field(None, description="the ids (GET only), sorted")


class EventIn(Body):
    user_id: Id
    item_id: Id
    timestamp: float | None = Field(
        None, ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False,
        description="epoch seconds, 0..4102444800 (until 2100; default: now)")
    event_id: Annotated[Id, Field(max_length=128)] | None = Field(
        None, description="repeating an event id records it once")
    request_id: RequestId | None = Field(
        None, description="the request_id of the /recommend answer this event came from: "
                          "credits the A/B variant that served it")


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


class VariantReport(BaseModel):
    variant: str
    share: float = Field(description="configured fraction of users")
    model_name: str
    pinned_version: int | None = Field(description="the version pinned in AB_VARIANTS; null: "
                                                   "the newest, hot-reloaded")
    model_version: int | None = Field(description="version this worker serves now (null: none "
                                                  "loaded yet)")
    requests: int = Field(description="answers served (request ids recorded)")
    attributed_events: int = Field(description="events that carried one of its request ids")
    clicked_requests: int = Field(description="its answers with at least one attributed event")
    ctr: float | None = Field(description="click-through: clicked_requests / requests (null "
                                          "before any request)")
    ctr_ci95: list[float] | None = Field(description="95% Wilson interval of ctr, [low, high]")


class ABReport(BaseModel):
    experiment: str = Field(description="AB_EXPERIMENT: the salt and the counters' name")
    tracking: bool = Field(description="request ids and counters are recorded (AB_VARIANTS "
                                       "is set)")
    store: Literal["redis", "memory"]
    attribution_ttl_seconds: int
    variants: list[VariantReport]
    unattributed_events: int = Field(description="events with a request_id unknown, expired "
                                                 "or another user's")


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, Any]] = Field(
        description="what was wrong; for 422 a list of {loc, msg, type} per field")
    request_id: str | None = Field(description="the answer's X-Request-ID")


# Answers every data route may give besides its own (documented in the OpenAPI schema).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the body is not valid UTF-8 JSON, or the "
                                                 "URL is not UTF-8 once percent-decoded"},
    401: {"model": ErrorResponse, "description": "API_KEY is set and the key is missing or wrong"},
    413: {"model": ErrorResponse, "description": "the body is over MAX_BODY_BYTES"},
    415: {"model": ErrorResponse, "description": "a body sent without Content-Type: "
                                                 "application/json"},
    503: {"model": ErrorResponse,
          "description": "no model loaded yet, the history store is unreachable, or the event "
                         "log is full; retry later"},
}


# The admin routes' (service/deps.py require_admin_key).
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    401: {"model": ErrorResponse, "description": "the admin key (ADMIN_API_KEY; API_KEY when "
                                                 "it is unset) is missing or wrong"},
    403: {"model": ErrorResponse, "description": "the data routes' API key on an admin route"},
}


def invalid(field: tuple[str | int, ...], message: str, value: Any,
            kind: str = "value_error", where: str = "body") -> RequestValidationError:
    """A 422 for a limit that lives in the settings (so not in the schema), shaped like every
    other 422: detail is a list of {loc, msg, type}."""
    return RequestValidationError([{"type": kind, "loc": (where, *field), "msg": message,
                                    "input": value}])
