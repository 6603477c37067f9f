"""One prompt and one answer schema for every backend: build the messages, parse and validate an
answer, and the repair prompt for an answer that does not parse.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class LLMError(RuntimeError):
    """The backend could not give an answer (after its retries)."""


@dataclass(frozen=True)
class PromptItem:
    title: str
    year: float | None
    categories: tuple[str, ...]

    def line(self) -> str:
        year = f" ({int(self.year)})" if self.year and self.year == self.year else ""
        cats = f" [{', '.join(self.categories)}]" if self.categories else ""
        return f"{self.title}{year}{cats}"


class InterestAnswer(BaseModel):
    name: str = Field(min_length=1, max_length=80)
    description: str = Field(min_length=1, max_length=400)
    items: list[int] = Field(min_length=1)

    @field_validator("name", "description")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()


class Answer(BaseModel):
    interests: list[InterestAnswer] = Field(min_length=1)


@dataclass(frozen=True)
class AnswerSchema:
    n_items: int
    max_interests: int
    # The listed items themselves, for backends that decode against them (local).
    items: tuple[PromptItem, ...] = ()


SYSTEM_PROMPT = "You analyse what a user of a recommender system is interested in."
JSON_SHAPE = ('{"interests": [{"name": <2-4 word theme>, "description": <one sentence>, '
              '"items": [<item numbers>]}]}')


def build_messages(items: Sequence[PromptItem], max_interests: int) -> Messages:
    listing = "\n".join(f"{i}. {item.line()}" for i, item in enumerate(items, start=1))
    user = (
        f"A user interacted with these items, oldest first:\n{listing}\n\n"
        f"Group the items into 1 to {max_interests} distinct interests of this user (a genre, "
        "theme or kind of item each). For each give a short name, a one-sentence description "
        "and the numbers of the listed items that belong to it. Answer with JSON only, shaped "
        f"like {JSON_SHAPE}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def repair_messages(messages: Messages, answer: str, error: str) -> Messages:
    return [*messages, {"role": "assistant", "content": answer},
            {"role": "user", "content": f"That answer is not valid: {error}. Reply again with "
                                        f"JSON only, shaped like {JSON_SHAPE}"}]


def frequent_categories(items: Sequence[PromptItem]) -> list[str]:
    """The items' categories, most frequent first (ties by name)."""
    counts: dict[str, int] = {}
    for item in items:
        for cat in item.categories:
            counts[cat] = counts.get(cat, 0) + 1
    return sorted(counts, key=lambda c: (-counts[c], c))


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_answer(text: str, schema: AnswerSchema) -> Answer:
    """The answer's interests, or ValueError with a message fit for a repair prompt."""
    match = _JSON_OBJECT.search(text)  # tolerate ```json fences and chatter around the object
    if match is None:
        raise ValueError("no JSON object found")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at character {exc.pos})") from None
    try:
        answer = Answer.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}: {first['msg']}") from None
    if len(answer.interests) > schema.max_interests:
        raise ValueError(f"{len(answer.interests)} interests; at most {schema.max_interests}")
    for k, interest in enumerate(answer.interests):
        bad = [i for i in interest.items if not 1 <= i <= schema.n_items]
        if bad:
            raise ValueError(f"interests.{k}.items: {bad} not between 1 and {schema.n_items}")
        interest.items = list(dict.fromkeys(interest.items))
    return answer
