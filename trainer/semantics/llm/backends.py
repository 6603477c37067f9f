"""Chat backends: an OpenAI-compatible endpoint over httpx (settings from LLM_* variables) and
the local SmolLM2 model (`local_chat`, loaded only when asked for).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.semantics.llm.prompt import AnswerSchema, LLMError, Messages

log = logging.getLogger(__name__)

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


class Chat(Protocol):
    """What ChatLabeller needs of a backend (OpenAIChat, trainer.semantics.llm.local.LocalChat)."""

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


def local_chat(threads: int = 0) -> Chat:
    """The `local` backend, imported only when asked for (trainer.semantics.llm.local)."""
    from trainer.semantics.llm.local import LocalChat

    return LocalChat(threads=threads)
