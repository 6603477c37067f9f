"""The nightly job's options: `NightlyOptions` (what a run needs) and `NightlySettings` (their
defaults from the environment, by the service's variable names: service/settings.py
StoreSettings, plus DATA_DIR). The package docstring has the job's steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from service.settings import StoreSettings

log = logging.getLogger(__name__)

# Where the nightly job looks for Redis when REDIS_URL is unset (the service's default, unset,
# means an in-process store, which a separate job cannot read).
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class NightlySettings(StoreSettings):
    """The defaults of `python -m trainer nightly` (its flags win): MODELS_DIR, MODEL_NAME,
    REDIS_URL, EVENT_STREAM as the service reads them, and DATA_DIR. From the environment only
    (no .env file, as before). EVENT_STREAM_SHARDS is checked against REDIS_URL like the
    service's, but the job does not take the shard count from it: it reads every shard count
    the service has recorded (trainer/jobs/nightly/ingest.py streams_to_read)."""

    redis_url: str = Field(DEFAULT_REDIS_URL, description="Redis holding the event stream")
    data_dir: Path = Field(Path("data"), description="event partitions, reports and the lock")

    def options(self, **rest: Any) -> NightlyOptions:
        """NightlyOptions with these settings (`rest`: the other NightlyOptions fields)."""
        return NightlyOptions(redis_url=self.redis_url, stream=self.event_stream,
                              data_dir=self.data_dir, models_dir=self.models_dir,
                              name=self.model_name, **rest)


@dataclass
class NightlyOptions:
    redis_url: str
    stream: str
    group: str
    data_dir: Path
    models_dir: Path
    name: str
    tolerance: float = 0.005
    batch_size: int = 10_000
    train_overrides: dict[str, Any] | None = None
    crash_after_persist: bool = False  # test hook: die between writing and acknowledging
    progress: bool = True
    # The event stream's shard count; None: the counts the service recorded (service.store.keys.
    # KeyLayout.registry_key), or before it ever ran, 1 (16 on Redis Cluster).
    shards: int | None = None

