"""Labellers: who names a user's interests (the one interface the trainer uses).

`make_labeller(kind)`: a chat model (`local` SmolLM2 or an `openai`-compatible endpoint) through
one prompt, answer schema and cache; `metadata` (the user's most frequent item categories, no
LLM); `oracle` (the planted topics of synthetic data, an upper bound). `label_users` labels many
users with a progress bar and counts what failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from trainer.config import LLM_BACKENDS, check_registry
from trainer.semantics.llm.backends import Chat, LLMSettings, OpenAIChat, local_chat
from trainer.semantics.llm.cache import ResponseCache
from trainer.semantics.llm.prompt import (
    AnswerSchema,
    LLMError,
    Messages,
    PromptItem,
    build_messages,
    frequent_categories,
    parse_answer,
    repair_messages,
)

log = logging.getLogger(__name__)

METADATA_SOURCE = "metadata (item categories, no LLM)"
ORACLE_SOURCE = "oracle (true planted topics)"
TOPIC_PREFIX = "topic-"  # how trainer.data.synthetic marks an item's true topic
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


def _openai_labeller(max_interests: int, settings: LLMSettings, threads: int) -> Labeller:
    cache = ResponseCache(settings.cache_dir)
    return ChatLabeller(OpenAIChat(settings), cache, max_interests)


def _local_labeller(max_interests: int, settings: LLMSettings, threads: int) -> Labeller:
    cache = ResponseCache(settings.cache_dir)
    return ChatLabeller(local_chat(threads), cache, max_interests)


# The labeller of each LLM backend (trainer/config.py LLMBackend), from (max_interests, settings,
# threads); a backend without a factory, or the reverse, fails at import.
LABELLERS: dict[str, Callable[[int, LLMSettings, int], Labeller]] = {
    "local": _local_labeller,
    "openai": _openai_labeller,
    "metadata": lambda max_interests, settings, threads: MetadataLabeller(max_interests),
    "oracle": lambda max_interests, settings, threads: OracleLabeller(max_interests),
}
check_registry("LLM backends", LABELLERS, LLM_BACKENDS)


def make_labeller(kind: str, max_interests: int, settings: LLMSettings | None = None,
                  threads: int = 0) -> Labeller:
    settings = settings or LLMSettings()
    factory = LABELLERS.get(kind)
    if factory is None:
        raise ValueError(f"unknown LLM backend {kind!r}; choose one of {LLM_BACKENDS}")
    return factory(max_interests, settings, threads)


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
