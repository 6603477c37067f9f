"""A/B tests between bundles: which variant serves a user, and which variant earned an event.

Configuration (service/settings.py, README "A/B tests"): `AB_VARIANTS` lists the variants as
`name=model[@version][:share]`, comma-separated; the first one is the control (the one /model
and /readyz report at top level). Unset, the service serves one variant, `default` = MODEL_NAME,
and records nothing (no request ids, no counters): exactly the service without A/B.

Assignment: a user's point in [0, 1) is the first 8 bytes of sha256(AB_EXPERIMENT "\n"
user_id) read as an integer over 2**64; the variants own consecutive intervals as long as their
shares, in the order given. It is the same in every process, replica, restart and Python version
(Python's hash() is salted per process, so it is not used); a new AB_EXPERIMENT reshuffles
users and starts the counters from zero. A user keeps their variant as long as AB_EXPERIMENT
and the shares do not change (growing a later variant's share moves some users into it from
the one next to it only).

Attribution: every /recommend answer of an A/B test remembers which variant served its request
id (with a digest of the user id) for AB_ATTRIBUTION_TTL_SECONDS; an event that carries that
`request_id` (and the same user) counts for that variant. Per variant: `requests` (answers
served), `events` (events attributed) and `clicked` (requests with at least one attributed
event, each counted once); click-through is clicked / requests. An event whose request id is
unknown, expired, from another experiment or another user's is still stored and counted as
unattributed. Only accepted events count: a repeated `event_id` is not attributed twice.

Storage: Redis when REDIS_URL is set (the history store's client, so workers and replicas share
the counters), else in this process. Keys (`<exp>` = AB_EXPERIMENT):

* `recsys:ab:<exp>:req:{<request id>}` string "<variant> <user digest>", TTL; written with SET
  EX on every answer;
* `recsys:ab:<exp>:clk:{<request id>}` "1", set NX by the first attributed event (same TTL as
  the request's key, which it shares a hash tag and so a Redis Cluster slot with: the one script
  that reads one and sets the other stays in one slot);
* `recsys:ab:<exp>:variant:<name>` hash {requests, events, clicked} (HINCRBY), no TTL;
* `recsys:ab:<exp>:unattributed` integer (INCRBY), no TTL.

This module is imported by the settings, so it imports nothing heavy (no redis, no FAISS):
the multi-worker supervisor reads the settings only.

Modules: `spec` (AB_VARIANTS), `assign` (user -> variant), `attribution` (counters).
"""
