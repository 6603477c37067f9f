"""Redis key names and layout, shared by the settings, the history store and the nightly job, in
a module with no heavy imports: the multi-worker supervisor (`python -m service`, WORKERS > 1)
reads the settings without loading FAISS, onnxruntime or numpy, which only the workers need.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

EVENT_STREAM = "recsys:events"  # default Redis Stream of accepted events (the nightly job reads it)

# REDIS_URL schemes that select redis-py's cluster client; the rest of the URL is a seed node's.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# The event stream's shards on Redis Cluster when EVENT_STREAM_SHARDS is unset: a few per master
# of a small cluster (docs/scaling.md).
CLUSTER_SHARDS = 16


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def node_url(url: str) -> str:
    """The URL redis-py takes: `redis+cluster://host:port` -> `redis://host:port`."""
    scheme, sep, rest = url.partition("://")
    return f"{CLUSTER_SCHEMES.get(scheme.lower(), scheme)}{sep}{rest}"


@dataclass(frozen=True)
class KeyLayout:
    """Where the history store's keys live (docs/scaling.md, "Redis Cluster").

    With one shard: today's names, `recsys:history:<user>`, `recsys:event:<event id>` and the
    stream `<stream>`; a single Redis only, since one script call touches all three and they
    hash to different cluster slots.

    With N > 1 shards, user u belongs to shard s = crc32(u) % N and every key one event's
    script touches carries the hash tag `{s<s>}`: `recsys:history:{s3}:<user>`,
    `recsys:event:{s3}:<event id>` and the stream shard `<stream>:{s3}`, so the call stays in
    one slot. An event id is therefore deduplicated within its user's shard (a retry, same
    user and id, always is). A shard's key does not depend on N, so changing N keeps every
    stream shard's name; the set `<stream>:shards` records every N the service has used so
    that the nightly job also drains shards a smaller N no longer writes to.
    """

    stream: str = EVENT_STREAM
    shards: int = 1

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"EVENT_STREAM_SHARDS={self.shards}: at least 1")
        if self.shards > 1 and ("{" in self.stream or "}" in self.stream):
            raise ValueError(f"EVENT_STREAM={self.stream!r}: no braces with sharding (the "
                             "shards' keys carry the Redis Cluster hash tag {s<n>})")

    @classmethod
    def for_url(cls, url: str, stream: str, shards: int | None) -> KeyLayout:
        """The layout for REDIS_URL; shards None: 1 on a single Redis, CLUSTER_SHARDS on
        Redis Cluster (where one shard cannot work: its keys span slots)."""
        cluster = is_cluster_url(url)
        count = shards if shards is not None else CLUSTER_SHARDS if cluster else 1
        if cluster and count == 1:
            raise ValueError("EVENT_STREAM_SHARDS=1 cannot work on Redis Cluster (one event's "
                             "keys would span hash slots): leave it unset or set 2 or more")
        return cls(stream, count)

    def shard(self, user_id: str) -> int:
        # crc32, not hash(): the same shard in every process and Python version.
        return zlib.crc32(user_id.encode("utf-8", "surrogatepass")) % self.shards

    def stream_key(self, shard: int) -> str:
        return self.stream if self.shards == 1 else f"{self.stream}:{{s{shard}}}"

    def streams(self) -> dict[str, str]:
        """Every stream key -> its shard's tag ("" for the unsharded stream)."""
        if self.shards == 1:
            return {self.stream: ""}
        return {self.stream_key(s): f"s{s}" for s in range(self.shards)}

    def history_key(self, user_id: str) -> str:
        if self.shards == 1:
            return f"recsys:history:{user_id}"
        return f"recsys:history:{{s{self.shard(user_id)}}}:{user_id}"

    def dedup_key(self, user_id: str, event_id: str) -> str:
        if self.shards == 1:
            return f"recsys:event:{event_id}"
        return f"recsys:event:{{s{self.shard(user_id)}}}:{event_id}"

    @property
    def registry_key(self) -> str:
        """The set of every shard count the service has used with this stream."""
        return f"{self.stream}:shards"
