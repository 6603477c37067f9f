"""Service settings: one source, the environment (or a .env file).

Each setting is declared once, with its description; the README's settings table is rendered
from these fields (`python -m service.settings --markdown`, checked by
tests/service/test_settings.py). `StoreSettings` holds what the nightly job shares with the
service (the model store and the event stream; trainer/jobs/nightly/options.py extends it).
Imported by the multi-worker supervisor: keep it light (no numpy, faiss, onnxruntime).
"""

from __future__ import annotations

import ipaddress
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.ab.spec import check_experiment, parse_variants
from service.bundle.format import CATEGORY_FIELD, DEFAULT_MODEL_NAME
from service.serving.row_policy import NEW_ITEM_SHARE, RowPolicy
from service.store.keys import EVENT_STREAM, KeyLayout

ROWS = RowPolicy()  # interest rows' defaults


class StoreSettings(BaseSettings):
    """The model store and the event stream: the service's and the nightly job's, by the same
    environment variables."""

    model_config = SettingsConfigDict(extra="ignore", protected_namespaces=())

    models_dir: Path = Field(Path("models"), description="model store: bundles in "
                             "`MODELS_DIR/<name>/<version>/`")
    model_name: str = Field(DEFAULT_MODEL_NAME, description="model to serve (and the one the "
                            "nightly job retrains and publishes)")
    redis_url: str | None = Field(
        None, description="unset: an in-process history store (one process only; histories die "
        "with it); `redis+cluster://HOST:PORT` (any one node): Redis Cluster "
        "([docs/scaling.md](docs/scaling.md#redis-cluster))")
    event_stream: str = Field(EVENT_STREAM, description="Redis Stream of the events "
                              "(`POST /events`) that the nightly job reads")
    event_stream_shards: int | None = Field(
        None, ge=1, le=1024, description="event stream shards, by user; unset: 1 on a single "
        "Redis (the unsharded key names), 16 on Redis Cluster "
        "([docs/scaling.md](docs/scaling.md#key-layout))")

    @model_validator(mode="after")
    def _key_layout_works(self) -> StoreSettings:
        """Refuse a key layout Redis Cluster would refuse at the first event."""
        if self.redis_url:
            KeyLayout.for_url(self.redis_url, self.event_stream, self.event_stream_shards)
        return self


class Settings(StoreSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    workers: int = Field(1, ge=1, le=64, description="worker processes of `python -m service` "
                         "(the server's multi-worker mode); more than 1 needs `REDIS_URL` (an "
                         "in-process history store would split histories across workers)")
    server: Literal["uvicorn", "granian"] = Field(
        "uvicorn", description="the ASGI server of `python -m service`: uvicorn (uvloop + "
        "httptools) or granian (HTTP in Rust); the same app and API "
        "([docs/results.md](docs/results.md#serving-overhead-issue-24))")
    mmap_bundle: bool = Field(True, description="memory-map the bundle's large files, one copy "
                              "shared by all workers (service/bundle/)")

    history_max_len: int = Field(200, ge=1, description="items kept per user")
    history_ttl_seconds: int = Field(30 * 24 * 3600, ge=1, description="idle users' histories "
                                     "expire after this (2592000: 30 days)")
    event_stream_max_len: int = Field(
        1_000_000, ge=1, description="with Redis: unconsumed events the stream may hold "
        "(shared evenly by the shards), then `POST /events` answers 503 (nothing is trimmed "
        "unread); the in-process store keeps this many latest events")
    event_dedup_ttl_seconds: int = Field(7 * 24 * 3600, ge=1, description="how long an "
                                         "`event_id` is remembered (604800: 7 days)")

    default_k: int = Field(20, ge=1, description="`k` when a request has none")
    max_k: int = Field(200, ge=1, description="largest `k` (above: 422)")
    per_interest_fanout: int = Field(50, ge=1, description="candidates searched per interest "
                                     "(at least `k` + the excluded items)")
    max_request_history: int = Field(1000, ge=1, description="history items one `/recommend` "
                                     "request may send (above: 422)")
    max_events_per_request: int = Field(1000, ge=1, description="events one `POST /events` "
                                        "request may send (above: 422)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    max_header_bytes: int = Field(
        16 * 1024, ge=8192, le=1 << 20, description="a request's head (request line and "
        "headers) over this, or over 100 header lines, gets 431 from the server "
        "(service/http_limits.py; granian: its read buffer)")

    api_key: str | None = Field(None, description="unset: open; set: the data routes need it "
                                "(or `ADMIN_API_KEY`) as `X-API-Key` or `Authorization: Bearer`")
    admin_api_key: str | None = Field(
        None, description="set: the admin routes (`POST /items/availability`, `POST "
        "/model/reload`, `DELETE /users/{id}/history`, `GET /model`, `GET /ab/report`) need it, "
        "the data key is not enough; unset: they follow `API_KEY` like the data routes "
        "([admin routes](#admin-routes))")
    allow_open_admin: bool = Field(
        False, description="start on a non-loopback `HOST` without `ADMIN_API_KEY` (admin routes "
        "open, or behind `API_KEY` only); without it such a start is refused")
    reload_interval_seconds: float = Field(5.0, gt=0, description="how often each worker looks "
                                           "for a new model version")
    availability_refresh_seconds: float = Field(
        0.05, gt=0, le=60, description="how often each worker polls the availability version "
        "(one GET; the set is read only when it changed)")
    onnx_threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per "
                              "model")
    faiss_threads: int = Field(0, ge=0, description="FAISS search threads; 0 = auto: 1 for an "
                               "exact index, this worker's share of the cores (cores / "
                               "`WORKERS`) for ANN indexes (HNSW, IVF, IVF-PQ) "
                               "(service/serving/model_manager.py)")
    # Micro-batching of /recommend across requests (service/serving/batching.py).
    batch_max_size: int = Field(64, ge=1, le=4096, description="`/recommend` micro-batching: "
                                "most requests per ONNX run / FAISS search; 1 = no batching, "
                                "each request computed alone on the event loop")
    batch_window_ms: float = Field(1.0, ge=0, le=1000, description="how long a batch of "
                                   "concurrent requests is held open for more (a lone request "
                                   "is never held)")
    # Interests in the answer (service/serving/recommender.py Shaping).
    adaptive_interests: bool = Field(False, description="drop interests no history item "
                                     "supports, merge near-duplicates, share the list by "
                                     "support ([named and adaptive interests]"
                                     "(#named-and-adaptive-interests); off by default: no "
                                     "better in the 10-fold comparison, "
                                     "[docs/results.md](docs/results.md))")
    interest_merge_cosine: float = Field(0.9, gt=0, le=1, description="cosine at which two "
                                         "interests count as one: reported as one in the "
                                         "answer's `interests` (the list unchanged); with "
                                         "adaptive interests also merged in the list")
    # Interest rows (`rows` in POST /recommend; service/serving/rows.py): the defaults are
    # RowPolicy's, chosen as measured in docs/results.md, "Interest rows".
    row_size: int = Field(ROWS.size, ge=1, le=100, description="items per interest row when a "
                          "request gives no `row_size`")
    row_fields: str = Field(CATEGORY_FIELD, description="item fields interest rows come from, "
                            "comma-separated (e.g. `esim_label,category`); a field the bundle "
                            "lacks is skipped")
    row_min_support: int = Field(ROWS.min_support, ge=1, description="history items an "
                                 "interest needs to become a row")
    row_history_weight: float = Field(ROWS.history_weight, ge=0, le=1, description="rows are "
                                      "ranked by the model's predicted mass in each interest "
                                      "(0) or the history's share of it (1), or a blend")
    row_min_ratio: float = Field(ROWS.min_ratio, ge=0, le=1, description="a row's score is at "
                                 "least this share of the user's best row's (so one taste "
                                 "gives one row)")
    row_min_size: int | None = Field(ROWS.min_size, ge=1, description="the rows share `rows x "
                                     "row_size` items by their scores, at least this many each; "
                                     "unset: `row_size` each")
    # docs/results.md, "The whole catalogue (issue 34)": chosen on validation users.
    new_item_share: float = Field(NEW_ITEM_SHARE, ge=0, le=0.5, description="the share of a "
                                  "list (rounded: k x share places, at its end) given to the "
                                  "best new items (no event yet, placed by their text at "
                                  "export) by the model's score, unless it holds that many "
                                  "already; 0: new items compete on score alone")
    min_name_confidence: float | None = Field(None, ge=-1, le=1, description="name an interest "
                                              "only at this confidence; unset: the bundle's "
                                              "calibrated threshold")
    # A/B tests (service/ab/).
    ab_variants: str | None = Field(
        None, description="A/B test: `name=model[@version][:share],...`, the first is the "
        "control ([A/B tests](#ab-tests)); unset: one variant, `default`, serving "
        "`MODEL_NAME`, and nothing recorded")
    ab_experiment: str = Field("ab", description="salts the user -> variant hash and names the "
                                                 "counters: a new one reshuffles users")
    ab_attribution_ttl_seconds: int = Field(
        24 * 3600, ge=60, description="how long an answer's request id can earn events "
        "(86400: 1 day)")
    log_level: str = Field("INFO", description="log level (DEBUG, INFO, WARNING, ...)")

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
    def _admin_routes_closed_off_loopback(self) -> Settings:
        """Refuse to listen beyond this machine with the admin routes open, unless told to."""
        if not self.admin_api_key and not self.allow_open_admin and not is_loopback(self.host):
            raise ValueError(
                f"HOST={self.host} listens beyond this machine and ADMIN_API_KEY is unset: "
                f"anyone who reaches it could mark items unavailable, reload models and delete "
                f"any user's history. Set ADMIN_API_KEY (and API_KEY for the data routes), "
                f"listen on 127.0.0.1, or set ALLOW_OPEN_ADMIN=true if something in front "
                f"guards these routes.")
        return self

    @model_validator(mode="after")
    def _ab_test_is_valid(self) -> Settings:
        """Refuse A/B settings that cannot be served as meant (service/ab/ says why)."""
        check_experiment(self.ab_experiment)
        if self.ab_variants is not None:
            parse_variants(self.ab_variants, self.models_dir)
        return self


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost; anything else (0.0.0.0, ::, a name) may be reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    return Settings()


def markdown_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def settings_table(settings: type[BaseSettings] = Settings) -> str:
    """The settings as a markdown table (README.md, "Operations"): one row per field, its
    environment variable, default and description."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in settings.model_fields.items():
        rows.append(f"| `{name.upper()}` | {markdown_default(info.default)} | "
                    f"{info.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m service.settings --markdown  (prints README.md's settings "
                 "table)")
    sys.stdout.write(settings_table())
