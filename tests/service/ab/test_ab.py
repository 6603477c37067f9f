"""A/B tests between bundles (service/ab/, service/serving/variants.py): a stable split close to
the configured shares, variants that hot-reload independently, a pin that never moves, and
attribution counts from a scripted session (in-process and with a real throwaway Redis)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.ab.assign import Assigner
from service.ab.attribution import Claim, InMemoryAttributionStore
from service.ab.spec import VariantSpec, parse_variants
from tests.helpers import metric, wait_for
from tests.service.conftest import make_settings, publish_copy

SPLIT = "control=tiny:0.5,treatment=tiny-b:0.5"


@pytest.fixture
def ab_models(models_dir):
    """Model `tiny` (version 1) and model `tiny-b` (version 1, a copy): two variants."""
    publish_copy(models_dir, models_dir / "tiny" / "1", name="tiny-b")
    return models_dir






# --- the split ----------------------------------------------------------------------------------


USERS = [f"user-{i}" for i in range(10_000)]


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.1, 0.9), (0.5, 0.25, 0.25)])
def test_split_is_close_to_the_shares_over_10000_ids(shares):
    specs = [VariantSpec(f"v{i}", "tiny", None, s) for i, s in enumerate(shares)]
    assigner = Assigner(specs, "exp-1")
    got = [assigner.variant(u) for u in USERS]
    for spec in specs:
        fraction = got.count(spec.name) / len(USERS)
        assert abs(fraction - spec.share) < 0.02, (spec, fraction)
    # Stable: the same answers again, and from a fresh assigner (a restart).
    assert [Assigner(specs, "exp-1").variant(u) for u in USERS] == got


def test_split_is_the_same_in_another_process_and_a_new_experiment_reshuffles():
    specs = [VariantSpec("a", "tiny", None, 0.5), VariantSpec("b", "tiny", None, 0.5)]
    here = "".join(Assigner(specs, "exp-1").variant(u) for u in USERS[:2000])
    code = ("from service.ab.assign import Assigner\n"
            "from service.ab.spec import VariantSpec\n"
            "specs = [VariantSpec('a', 'tiny', None, 0.5), VariantSpec('b', 'tiny', None, 0.5)]\n"
            "print(''.join(Assigner(specs, 'exp-1').variant(f'user-{i}') for i in range(2000)))")
    # Another interpreter with another str hash seed: the split does not use hash().
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""},
                           cwd=Path(__file__).parents[3]).stdout
    assert there.strip() == here
    other = "".join(Assigner(specs, "exp-2").variant(u) for u in USERS[:2000])
    moved = sum(x != y for x, y in zip(here, other, strict=True)) / 2000
    assert 0.4 < moved < 0.6  # independent halves: about half the users change sides


def test_a_zero_share_gets_nobody():
    specs = [VariantSpec("a", "tiny", None, 1.0), VariantSpec("off", "tiny", None, 0.0)]
    assert {Assigner(specs, "e").variant(u) for u in USERS[:1000]} == {"a"}


def test_variant_settings_parse_with_defaults(ab_models):
    assert [(s.name, s.model, s.version, s.share) for s in parse_variants(
        "a=tiny, b=tiny-b@1")] == [("a", "tiny", None, 0.5), ("b", "tiny-b", 1, 0.5)]
    specs = parse_variants("a=tiny,b=tiny-b:0.1,c=tiny@1:0.2", ab_models)
    assert [round(s.share, 9) for s in specs] == [0.7, 0.1, 0.2]  # `a` gets the rest


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("", "AB_VARIANTS is empty"),
        ("a=tiny:1.5,b=tiny-b", "share 1.5 is not in [0, 1]"),
        ("a=tiny:-0.1,b=tiny-b", "share -0.1 is not in [0, 1]"),
        ("a=tiny:0.3,b=tiny-b:0.3", "shares add up to 0.6"),
        ("a=tiny:0.8,b=tiny-b:0.7,c=tiny", "over 1"),
        ("a=tiny:0.5,b=tiny-b,c=tiny", "leave out exactly one"),
        ("a=tiny:lots", "not a number"),
        ("a=tiny,a=tiny-b", "repeated: a"),
        ("a b=tiny", "variant name 'a b'"),
        ("a=../etc", "model name '../etc'"),
        ("tiny", "expected name=model"),
        ("a=tiny@0", "must be a positive integer"),
        ("a=tiny@x", "must be a positive integer"),
        ("a=tiny,b=nope", "no model 'nope'"),
        ("a=tiny,b=tiny@7", "pinned version 7 of 'tiny' does not exist"),
    ],
)
def test_bad_variant_settings_are_refused_with_a_reason(ab_models, value, needle):
    with pytest.raises(ValidationError) as caught:
        make_settings(ab_models, ab_variants=value)
    assert needle in str(caught.value)


def test_bad_experiment_name_is_refused(ab_models):
    with pytest.raises(ValidationError, match="AB_EXPERIMENT"):
        make_settings(ab_models, ab_experiment="new experiment!")


# --- serving ------------------------------------------------------------------------------------


def test_split_through_the_api_is_stable_across_calls_and_restarts(client_for, ab_models):
    users = [f"u{i}" for i in range(40)]
    first = client_for(ab_variants=SPLIT, ab_experiment="exp-1")
    answers = {u: first.post("/recommend", json={"user_id": u, "k": 3}).json() for u in users}
    expected = Assigner(parse_variants(SPLIT), "exp-1")
    assert {u: a["variant"] for u, a in answers.items()} == {u: expected.variant(u)
                                                            for u in users}
    assert {a["variant"] for a in answers.values()} == {"control", "treatment"}
    for answer in answers.values():  # each variant answers with its own model
        assert answer["model_name"] == {"control": "tiny", "treatment": "tiny-b"}[
            answer["variant"]]
    again = [first.post("/recommend", json={"user_id": u}).json()["variant"] for u in users]
    restarted = client_for(ab_variants=SPLIT, ab_experiment="exp-1")  # a new app, same settings
    after = [restarted.post("/recommend", json={"user_id": u}).json()["variant"] for u in users]
    assert again == after == [answers[u]["variant"] for u in users]


def test_without_ab_settings_answers_say_default_and_nothing_is_recorded(client_for):
    client = client_for()
    response = client.post("/recommend", json={"user_id": "u", "k": 2},
                           headers={"X-Request-ID": "req-1"})
    body = response.json()
    assert body["variant"] == "default" and body["model_name"] == "tiny"
    assert body["request_id"] == response.headers["x-request-id"] == "req-1"
    made = client.post("/recommend", json={"user_id": "u"})
    assert made.json()["request_id"] == made.headers["x-request-id"]
    event = {"user_id": "u", "item_id": body["items"][0]["item_id"], "request_id": "req-1"}
    assert client.post("/events", json=event).json() == {"accepted": 1, "duplicates": 0}
    report = client.get("/ab/report").json()
    assert report["tracking"] is False and report["unattributed_events"] == 0
    assert [(v["variant"], v["share"], v["requests"], v["attributed_events"])
            for v in report["variants"]] == [("default", 1.0, 0, 0)]
    metrics = client.get("/metrics").text
    assert metric(metrics, "recsys_recommendations_total", variant="default") == 2
    assert metric(metrics, "recsys_recommend_seconds_count", variant="default") == 2
    assert metric(metrics, "recsys_model_version", variant="default") == 1
    ready = client.get("/readyz").json()
    assert ready["model_version"] == 1 and ready["variants"] == {"default": 1}


def versions(client) -> dict[str, int | None]:
    return {v["variant"]: v["model_version"] for v in client.get("/model").json()["variants"]}


def test_variants_hot_reload_independently_and_a_pin_stays(client_for, ab_models):
    client = client_for(ab_variants="a=tiny:0.4,b=tiny-b:0.4,pinned=tiny@1:0.2")
    assert versions(client) == {"a": 1, "b": 1, "pinned": 1}

    publish_copy(ab_models, ab_models / "tiny" / "1", name="tiny-b")  # tiny-b 2: only b moves
    assert wait_for(lambda: versions(client)["b"] == 2)
    time.sleep(0.3)  # several reload intervals: nothing else moved
    assert versions(client) == {"a": 1, "b": 2, "pinned": 1}

    publish_copy(ab_models, ab_models / "tiny" / "1")  # tiny 2: `a` moves, the pin does not
    assert wait_for(lambda: versions(client)["a"] == 2)
    reload = client.post("/model/reload").json()
    assert reload["variants"]["pinned"] == {"changed": False, "model_version": 1,
                                            "last_error": None}
    assert versions(client) == {"a": 2, "b": 2, "pinned": 1}

    # Answers say so too, per variant.
    seen: dict[str, tuple[str, int]] = {}
    for i in range(200):
        body = client.post("/recommend", json={"user_id": f"u{i}", "k": 1}).json()
        seen[body["variant"]] = (body["model_name"], body["model_version"])
        if len(seen) == 3:
            break
    assert seen == {"a": ("tiny", 2), "b": ("tiny-b", 2), "pinned": ("tiny", 1)}
    metrics = client.get("/metrics").text
    assert metric(metrics, "recsys_model_version", variant="pinned") == 1
    assert metric(metrics, "recsys_model_version", variant="a") == 2
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["variants"] == {"a": 2, "b": 2, "pinned": 1}


def test_ready_only_when_every_variant_has_a_model(client_for, ab_models):
    (ab_models / "tiny-c").mkdir()  # the model exists, no bundle yet
    client = client_for(ab_variants="a=tiny,c=tiny-c")
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["model"] is False
    assert ready.json()["variants"] == {"a": 1, "c": None}
    assigner = Assigner(parse_variants("a=tiny,c=tiny-c"), "ab")
    user_a = next(u for u in USERS if assigner.variant(u) == "a")
    user_c = next(u for u in USERS if assigner.variant(u) == "c")
    assert client.post("/recommend", json={"user_id": user_a}).status_code == 200
    refused = client.post("/recommend", json={"user_id": user_c})
    assert refused.status_code == 503 and "variant 'c'" in refused.json()["detail"]

    publish_copy(ab_models, ab_models / "tiny" / "1", name="tiny-c")
    assert wait_for(lambda: client.get("/readyz").status_code == 200)
    assert client.post("/recommend", json={"user_id": user_c}).json()["variant"] == "c"


# --- attribution --------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_attribution_counts_from_a_scripted_session(client_for, ab_models, request, store):
    overrides = {"ab_variants": SPLIT, "ab_experiment": "exp-7"}
    if store == "redis":
        overrides["redis_url"] = request.getfixturevalue("redis_url")
    client = client_for(**overrides)

    # 30 users, one answer each, user u0 a second one; u1 sends its own X-Request-ID.
    served: list[tuple[str, str, str]] = []  # (user, variant, request id)
    for i in [*range(30), 0]:
        headers = {"X-Request-ID": "client-req-1"} if i == 1 else {}
        response = client.post("/recommend", json={"user_id": f"u{i}", "k": 3},
                               headers=headers)
        body = response.json()
        assert body["request_id"] == response.headers["x-request-id"]
        served.append((f"u{i}", body["variant"], body["request_id"]))
    assert served[1][2] == "client-req-1"
    assert len({rid for _, _, rid in served}) == len(served)
    variant_of = {rid: variant for _, variant, rid in served}
    assert set(variant_of.values()) == {"control", "treatment"}

    def event(user: str, rid: str | None, event_id: str | None = None) -> dict:
        out = {"user_id": user, "item_id": "1"}
        if rid is not None:
            out["request_id"] = rid
        if event_id is not None:
            out["event_id"] = event_id
        return out

    clicked = served[:10]  # one click on each of the first ten answers
    for n, (user, _, rid) in enumerate(clicked):
        assert client.post("/events", json=event(user, rid, f"click-{n}")).json()["accepted"]
    # Three of them clicked again (a batch): more events, no more clicked requests.
    again = [event(user, rid) for user, _, rid in clicked[:3]]
    # A retried event (same event id) is a duplicate: stored once, attributed once.
    retry = event(clicked[0][0], clicked[0][2], "click-0")
    unknown = [event("u5", "no-such-request"), event("u6", "expired-or-never-was")]
    stolen = event("someone-else", clicked[4][2])  # another user's request id
    plain = [event("u7", None), event("u8", None)]  # no request id: not part of the report
    answer = client.post("/events", json={"events": [*again, retry, *unknown, stolen, *plain]})
    assert answer.json() == {"accepted": 8, "duplicates": 1}

    expected = {v: {"requests": 0, "attributed_events": 0, "clicked_requests": 0}
                for v in ("control", "treatment")}
    for _, variant, _ in served:
        expected[variant]["requests"] += 1
    for _, variant, _ in clicked:
        expected[variant]["attributed_events"] += 1
        expected[variant]["clicked_requests"] += 1
    for _, variant, _ in clicked[:3]:
        expected[variant]["attributed_events"] += 1

    report = client.get("/ab/report").json()
    assert report["experiment"] == "exp-7" and report["tracking"] is True
    assert report["store"] == store and report["unattributed_events"] == 3
    got = {v["variant"]: {k: v[k] for k in ("requests", "attributed_events",
                                            "clicked_requests")} for v in report["variants"]}
    assert got == expected
    for row in report["variants"]:
        c = expected[row["variant"]]
        assert row["share"] == 0.5 and row["model_version"] == 1
        assert row["ctr"] == pytest.approx(c["clicked_requests"] / c["requests"])
        low, high = row["ctr_ci95"]
        assert low <= row["ctr"] <= high

    metrics = client.get("/metrics").text
    for variant, c in expected.items():
        assert metric(metrics, "recsys_recommendations_total", variant=variant) == c["requests"]
        assert metric(metrics, "recsys_attributed_events_total",
                      variant=variant) == c["attributed_events"]
    assert metric(metrics, "recsys_unattributed_events_total") == 3

    if store == "redis":
        redis = request.getfixturevalue("redisdb")
        key = f"recsys:ab:exp-7:req:{{{served[2][2]}}}"
        assert redis.get(key).split(" ")[0] == served[2][1]
        assert 0 < redis.ttl(key) <= 24 * 3600
        assert 0 < redis.ttl(f"recsys:ab:exp-7:clk:{{{served[2][2]}}}") <= 24 * 3600
        # A second replica on the same Redis reports the same counts.
        replica = client_for(**overrides)
        assert replica.get("/ab/report").json() == report


def test_request_ids_expire_and_then_count_as_unattributed():
    now = [0.0]
    store = InMemoryAttributionStore("e", ttl_seconds=60, capacity=2, clock=lambda: now[0])

    async def session() -> tuple[list[str | None], list[str | None]]:
        await store.served("r1", "u1", "a")
        now[0] = 61.0
        await store.served("r2", "u2", "b")
        await store.served("r3", "u3", "b")
        await store.served("r4", "u4", "a")  # over capacity: r2 (the oldest) is forgotten
        late = await store.attribute([Claim("r1", "u1"), Claim("r2", "u2")])
        live = await store.attribute([Claim("r3", "u3"), Claim("r4", "u4"), Claim("r4", "u4")])
        return late, live

    late, live = asyncio.run(session())
    assert late == [None, None] and live == ["b", "a", "a"]
    counts = asyncio.run(store.counts(["a", "b"]))
    assert counts.unattributed == 2
    assert (counts.variants["a"].requests, counts.variants["a"].events,
            counts.variants["a"].clicked) == (2, 2, 1)


@pytest.mark.parametrize("bad", ["", "x" * 129, "café", "a\nb", "tab\there", 42, None])
def test_a_bad_request_id_gets_422_and_stores_nothing(client_for, bad):
    client = client_for()
    single = client.post("/events", json={"user_id": "u", "item_id": "1", "request_id": bad})
    if bad is None:  # null is "no request id"
        assert single.status_code == 200
        return
    assert single.status_code == 422
    detail = single.json()["detail"]
    assert detail[0]["loc"][-1] == "request_id"
    if isinstance(bad, str):
        assert "1..128 printable ASCII characters" in detail[0]["msg"]
    batch = client.post("/events", json={"events": [
        {"user_id": "u", "item_id": "1"}, {"user_id": "u", "item_id": "2", "request_id": bad}]})
    assert batch.status_code == 422
    assert client.get("/users/u/history").json()["items"] == []


def test_a_client_request_id_the_events_route_would_refuse_is_replaced(client_for):
    client = client_for()
    response = client.post("/recommend", json={"user_id": "u"},
                           headers={"X-Request-ID": "x" * 129})
    rid = response.json()["request_id"]
    assert rid == response.headers["x-request-id"] and len(rid) == 32


def test_redis_down_still_answers_and_the_report_says_503(client_for, ab_models):
    client = client_for(ab_variants=SPLIT, redis_url="redis://127.0.0.1:1/0")
    answer = client.post("/recommend", json={"user_id": "u", "k": 2})
    assert answer.status_code == 200 and answer.json()["degraded"] is True
    plain = client.post("/recommend", json={"user_id": "u", "use_stored_history": False})
    assert plain.status_code == 200
    assert metric(client.get("/metrics").text, "recsys_ab_errors_total") == 2
    report = client.get("/ab/report")
    assert report.status_code == 503 and "attribution store unavailable" in report.text
