"""Service settings: one source, the environment (or a .env file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.ab import check_experiment, parse_variants
from service.names import DEFAULT_MODEL_NAME, EVENT_STREAM, KeyLayout


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    models_dir: Path = Path("models")
    model_name: str = DEFAULT_MODEL_NAME
    # Unset: an in-process history store (single process only; histories die with it).
    # `redis+cluster://HOST:PORT` (any one node): Redis Cluster (docs/scaling.md).
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
    event_stream_shards: int | None = Field(
        None, ge=1, le=1024, description="event stream shards, by user (docs/scaling.md); "
                                         "unset: 1 on a single Redis, 16 on Redis Cluster")

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
    # Interests in the answer (service/recommender.py Shaping): adaptive interests drop the
    # ones no history item supports, merge near-duplicates and share the list by support.
    adaptive_interests: bool = Field(False, description="drop/merge interests per user and "
                                     "share the list by support (docs/results.md: off by "
                                     "default, the 10-fold comparison)")
    interest_merge_cosine: float = Field(0.9, gt=0, le=1, description="adaptive interests: "
                                         "cosine at which two interests merge")
    min_name_confidence: float | None = Field(None, ge=-1, le=1, description="name an interest "
                                              "only at this confidence; unset: the bundle's "
                                              "calibrated threshold")
    # A/B tests (service/ab.py, README "A/B tests"). Unset: one variant, `default`, serving
    # MODEL_NAME, and nothing recorded.
    ab_variants: str | None = Field(
        None, description="name=model[@version][:share],...; the first is the control")
    ab_experiment: str = Field("ab", description="salts the user -> variant hash and names the "
                                                 "counters: a new one reshuffles users")
    ab_attribution_ttl_seconds: int = Field(
        24 * 3600, ge=60, description="how long an answer's request id can earn events")
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

    @model_validator(mode="after")
    def _ab_test_is_valid(self) -> Settings:
        """Refuse A/B settings that cannot be served as meant (service/ab.py says why)."""
        check_experiment(self.ab_experiment)
        if self.ab_variants is not None:
            parse_variants(self.ab_variants, self.models_dir)
        return self

    @model_validator(mode="after")
    def _key_layout_works(self) -> Settings:
        """Refuse a key layout Redis Cluster would refuse at the first event."""
        if self.redis_url:
            KeyLayout.for_url(self.redis_url, self.event_stream, self.event_stream_shards)
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
