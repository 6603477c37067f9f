"""The nightly job: event log -> training data -> candidate -> quality gate -> publish.

1. Take a lock (one run at a time).
2. Drain the service's Redis Stream, shard by shard (service.store.keys.KeyLayout: one stream, or
   N by user hash; on Redis Cluster too), through a consumer group: first this consumer's
   pending entries (read by a run that died before acknowledging), then new ones. Each batch is
   written as a Parquet partition named after its shard and its first and last stream ids
   (write to a temporary file, fsync, rename) and only then acknowledged. A crash in between
   leaves the entries pending; the rerun reads the same ids again and the loader keeps one row
   per stream id (qualified by the shard: `s3:<id>`, since shards' ids may coincide), so
   nothing is lost and nothing is duplicated. A malformed entry is set aside in
   malformed/[<shard>-]<first>-<last>.jsonl (with the reason) and acknowledged like the others,
   so it never blocks the job. After each acknowledgement the shard is trimmed up to the
   oldest entry the group has not acknowledged (the service appends without a length cap).
3. Retrain with the served model's configuration on its base data plus every persisted event.
4. Evaluate the candidate and the served bundle through the serving code path on the same
   held-out users of the new data; publish the candidate only if its Recall@50 is not worse
   than the served one's by more than the tolerance. The decision and both metric sets go to
   a report.

`run_every` repeats the job on an interval as a long-running process (a container's PID 1):
SIGTERM or SIGINT stops it at once while it sleeps, and abandons a cycle in progress (every
step above is safe to interrupt and redo).

Modules: `lock` (one run at a time), `ingest` (step 2), `gate` (step 4's evaluation through the
serving path), `run` (steps 1-4), `schedule` (`run_every`); `options` holds the job's settings.
"""
