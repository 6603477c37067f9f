"""The event contract: what the service writes to the event stream and the nightly job reads.

One module on both sides (the service's history store writes, `trainer.jobs.nightly.ingest`
reads), so the two cannot drift: the id rule (shared with the HTTP API), the timestamp range,
the consumer group, how an accepted event becomes a stream entry (`Event.fields`, sent as one
JSON field `event`), and how a stream entry is parsed back (`parse_entry`, which names what is
wrong with a malformed one instead of raising anything else).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

# --- ids -----------------------------------------------------------------------------------------

MAX_ID_LENGTH = 256
# One rule for every id, in bodies and in paths, stated in the OpenAPI schema as a pattern and
# checked with it: kept as given (never stripped), no whitespace at either end, no control
# characters (C0, DEL, C1). U+FEFF is listed because ECMA's \s (the schema's) has it and
# Python's does not; otherwise the two agree. Python checks it with fullmatch: re.match's `$`
# also matches before a final "\n", so "a\n" passed (issue 33); ECMA's `$` does not.
_CONTROL = r"\x00-\x1f\x7f-\x9f"
ID_PATTERN = rf"^[^\s\ufeff{_CONTROL}](?:[^{_CONTROL}]*[^\s\ufeff{_CONTROL}])?$"
_ID_RE = re.compile(ID_PATTERN)
_CONTROL_RE = re.compile(f"[{_CONTROL}]")


def check_id(value: str) -> str:
    """The id rule, with a message that says which part failed."""
    if not _ID_RE.fullmatch(value):
        if _CONTROL_RE.search(value):
            raise ValueError("must not contain control characters")
        raise ValueError("must not start or end with whitespace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate cannot be stored in Redis or sent as UTF-8
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


# --- events and the stream ------------------------------------------------------------


# The consumer group the nightly job reads the stream through. The service creates it at start so
# that the group's lag is measurable from the first event; only entries this group has
# acknowledged are ever trimmed (by the nightly job), so no unread event is dropped.
EVENT_GROUP = "nightly"
# Event timestamps are epoch seconds in [0, MAX_TIMESTAMP] (2100-01-01T00:00:00Z): the API refuses
# others and the nightly job sets aside any stream entry outside the range.
MAX_TIMESTAMP = 4_102_444_800


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: float
    event_id: str

    def fields(self) -> dict[str, str]:
        return {"user_id": self.user_id, "item_id": self.item_id,
                "timestamp": repr(self.timestamp), "event_id": self.event_id}


def new_event_id() -> str:
    return uuid.uuid4().hex


# --- reading a stream entry back (the nightly job) ---------------------------------------------


class Malformed(ValueError):
    """A stream entry that is not a valid event; the message is the reason."""


def as_text(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _id_field(event: dict[str, Any], name: str) -> str:
    if name not in event:
        raise Malformed(f"no {name}")
    value = event[name]
    if not isinstance(value, str):
        raise Malformed(f"{name}: a string expected, got {type(value).__name__}")
    if not 0 < len(value) <= MAX_ID_LENGTH:
        raise Malformed(f"{name}: {len(value)} characters, not 1..{MAX_ID_LENGTH}")
    try:
        return check_id(value)  # the API's own id rule (a lone surrogate: Parquet refuses it)
    except ValueError as exc:
        raise Malformed(f"{name}: {exc}") from exc


def _timestamp(event: dict[str, Any]) -> int:
    if "timestamp" not in event:
        raise Malformed("no timestamp")
    raw = event["timestamp"]
    # The service writes repr(float); numbers are accepted too, booleans are not.
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise Malformed(f"timestamp: a number expected, got {type(raw).__name__}")
    try:
        value = float(raw)
    except OverflowError as exc:  # an integer beyond any float
        raise Malformed(f"timestamp: outside [0, {MAX_TIMESTAMP}]") from exc
    except ValueError as exc:
        raise Malformed(f"timestamp: not a number ({str(raw)[:40]!r})") from exc
    if not (math.isfinite(value) and 0 <= value <= MAX_TIMESTAMP):
        raise Malformed(f"timestamp: {value!r} is outside [0, {MAX_TIMESTAMP}]")
    return int(value)


def parse_entry(fields: dict[bytes, bytes] | None) -> tuple[str, str, str, int]:
    """(event_id, user_id, item_id, timestamp) of one stream entry, or Malformed(reason)."""
    if not isinstance(fields, dict | None):
        raise Malformed(f"fields: a mapping expected, got {type(fields).__name__}")
    if not fields:  # nil (redis-py: None or {}) for an entry deleted while pending
        raise Malformed("no fields (the entry was deleted or trimmed while pending)")
    raw = fields.get(b"event", fields.get("event"))
    if raw is None:
        raise Malformed("no 'event' field")
    try:
        body = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise Malformed("event: not UTF-8") from exc
    try:
        event = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise Malformed(f"event: not JSON ({exc})") from exc
    if not isinstance(event, dict):
        raise Malformed(f"event: a JSON object expected, got {type(event).__name__}")
    return (_id_field(event, "event_id"), _id_field(event, "user_id"),
            _id_field(event, "item_id"), _timestamp(event))
