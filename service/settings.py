"""Service settings: one source, the environment (or a .env file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.names import DEFAULT_MODEL_NAME, EVENT_STREAM


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    models_dir: Path = Path("models")
    model_name: str = DEFAULT_MODEL_NAME
    # Unset: an in-process history store (single process only; histories die with it).
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # Worker processes of `python -m service` (uvicorn's multi-worker mode). More than one
    # needs REDIS_URL: an in-process history store would split histories across workers.
    workers: int = Field(1, ge=1, le=64, description="worker processes")
    mmap_bundle: bool = Field(True, description="memory-map the bundle's large files, shared "
                                                "by all workers (service/bundle.py)")

    history_max_len: int = Field(200, ge=1, description="items kept per user")
    history_ttl_seconds: int = Field(30 * 24 * 3600, ge=1, description="idle users expire")
    event_stream: str = EVENT_STREAM
    event_stream_max_len: int = Field(
        1_000_000, ge=1, description="unconsumed events the stream may hold; then /events "
                                     "answers 503 (nothing is trimmed unread)")
    event_dedup_ttl_seconds: int = Field(7 * 24 * 3600, ge=1)

    default_k: int = Field(20, ge=1)
    max_k: int = Field(200, ge=1)
    per_interest_fanout: int = Field(50, ge=1, description="candidates per interest (min)")
    max_request_history: int = Field(1000, ge=1, description="history items one request may send")
    max_events_per_request: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)

    api_key: str | None = None
    reload_interval_seconds: float = Field(5.0, gt=0)
    onnx_threads: int = Field(1, ge=1)
    faiss_threads: int = Field(0, ge=0, description="0 = auto (service/models.py)")
    # Micro-batching of /recommend across requests (service/batching.py); 1 = off, each
    # request computed alone on the event loop as before.
    batch_max_size: int = Field(64, ge=1, le=4096, description="requests per ONNX run / FAISS "
                                                               "search; 1 = no batching")
    batch_window_ms: float = Field(1.0, ge=0, le=1000, description="how long a batch of "
                                   "concurrent requests is held open for more (a lone request "
                                   "is never held)")
    log_level: str = "INFO"


    @model_validator(mode="after")
    def _workers_need_redis(self) -> Settings:
        """Refuse a multi-worker setup that would serve wrong answers."""
        if self.workers > 1 and not self.redis_url:
            raise ValueError(
                f"WORKERS={self.workers} needs REDIS_URL: without Redis each worker process "
                f"keeps its own in-process history store, so a user's events and "
                f"recommendations would land on different, diverging histories. Set "
                f"REDIS_URL=redis://HOST:6379/0 or use WORKERS=1.")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
