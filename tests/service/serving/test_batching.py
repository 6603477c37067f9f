"""Micro-batching of /recommend (service/serving/batching.py): concurrent requests share one
encoder run and one search, yet each gets exactly its answer alone; a faulty request fails
alone; a lone request is not held; a hot swap under batched load drops nothing."""

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import faiss
import httpx
import numpy as np
from fastapi import FastAPI

from service.app import create_app
from service.bundle.load import load_bundle
from service.observability import Metrics
from service.serving.batching import Batcher
from service.serving.recommender import Recommender
from tests.service.conftest import live_server, make_settings, publish_copy


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan run, called in this event loop (so requests really overlap)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def batches(metrics: Metrics) -> tuple[float, float]:
    """(batches run, batches of more than one request), from the batch-size histogram."""
    total = metrics.registry.get_sample_value("recsys_batch_size_count") or 0.0
    singles = metrics.registry.get_sample_value("recsys_batch_size_bucket", {"le": "1.0"}) or 0.0
    return total, total - singles


def mixed_requests(items: list[str], n: int = 20) -> list[dict]:
    """Different users: histories of different lengths, k (one above the fan-out, so searches
    of two sizes), exclusions, exclude_seen, and one with nothing known (popularity fallback)."""
    rng = np.random.default_rng(7)
    bodies = []
    for u in range(n):
        history = rng.choice(items, size=int(rng.integers(1, 30))).tolist()
        body = {"user_id": f"u{u}", "k": [5, 10, 20, 60][u % 4], "history": history,
                "exclude_seen": u % 3 == 0}
        if u % 5 == 1:
            body["exclude"] = rng.choice(items, size=10, replace=False).tolist()
        bodies.append(body)
    bodies[-1] = {"user_id": "newcomer", "k": 7, "history": ["no-such-item"]}
    return bodies


def tiny_model(models_dir) -> Recommender:
    return Recommender(load_bundle(models_dir / "tiny" / "1"))


def test_concurrent_requests_are_batched_and_each_gets_its_solo_answer(models_dir):
    solo_app = create_app(make_settings(models_dir, batch_max_size=1))
    batched_app = create_app(make_settings(models_dir, batch_window_ms=20))
    assert solo_app.state.recsys.batcher is None  # BATCH_MAX_SIZE=1: today's path

    async def scenario() -> tuple[list[dict], list[dict]]:
        async with serving(solo_app) as client:
            items = solo_app.state.recsys.models.current.bundle.item_ids.tolist()
            bodies = mixed_requests(items)
            # The same request id per body in both runs: answers carry it (request_id).
            ids = [{"X-Request-ID": f"r{i}"} for i in range(len(bodies))]
            solo = [(await client.post("/recommend", json=b, headers=h)).json()
                    for b, h in zip(bodies, ids, strict=True)]
        async with serving(batched_app) as client:
            answers = await asyncio.gather(*(client.post("/recommend", json=b, headers=h)
                                             for b, h in zip(bodies, ids, strict=True)))
        assert {r.status_code for r in answers} == {200}
        return solo, [r.json() for r in answers]

    solo, batched = asyncio.run(scenario())
    assert batched == solo  # same items, order, scores, interests, version: whole bodies
    assert any(b["fallback"] for b in solo) and not all(b["fallback"] for b in solo)
    assert batches(solo_app.state.recsys.metrics) == (0, 0)
    total, shared = batches(batched_app.state.recsys.metrics)
    assert shared >= 1 and total < len(solo) - 1, "the concurrent requests were not batched"


def test_a_request_whose_compute_fails_fails_alone(models_dir):
    model = tiny_model(models_dir)
    metrics = Metrics()
    batcher = Batcher(max_size=64, window_ms=50, metrics=metrics)
    items = model.bundle.item_ids.tolist()
    calls = [(items[i : i + 3 + i % 7], 10 + i, items[i + 20 : i + 22]) for i in range(8)]
    queries = [model.prepare(history, k, exclude) for history, k, exclude in calls]
    bad_row = queries[0].row.copy()
    bad_row[-1] = 10**6  # not an item: the encoder raises for the whole stacked batch
    bad = dataclasses.replace(queries[0], row=bad_row)

    async def scenario() -> list:
        jobs = [batcher.submit(model, q) for q in queries[:4]] + [batcher.submit(model, bad)] \
            + [batcher.submit(model, q) for q in queries[4:]]
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        after = await batcher.submit(model, queries[0])  # the batcher still serves
        await batcher.close()
        return [*outcomes, after]

    outcomes = asyncio.run(scenario())
    failed = outcomes.pop(4)
    assert isinstance(failed, Exception) and "Gather" in str(failed)
    expected = [model.recommend(history, k, exclude) for history, k, exclude in calls]
    assert outcomes == [*expected, expected[0]]
    assert metrics.registry.get_sample_value("recsys_batch_fallbacks_total") == 1
    assert batches(metrics)[1] >= 1


def test_a_batch_mixing_two_models_answers_each_request_with_its_own(models_dir):
    """A hot swap lands between requests of one batch: each keeps the model it captured."""
    old, new = tiny_model(models_dir), tiny_model(models_dir)
    flipped = faiss.IndexFlatIP(new.bundle.item_vectors.shape[1])
    flipped.add(-np.ascontiguousarray(new.bundle.item_vectors, dtype=np.float32))
    new.bundle.index = flipped  # a "new version" that ranks the catalogue upside down
    items = old.bundle.item_ids.tolist()
    calls = [(old if i % 2 else new, items[i : i + 5]) for i in range(10)]
    metrics = Metrics()
    batcher = Batcher(max_size=64, window_ms=50, metrics=metrics)

    async def scenario() -> list:
        jobs = [batcher.submit(model, model.prepare(history, 10)) for model, history in calls]
        done = await asyncio.gather(*jobs)
        await batcher.close()
        return done

    outcomes = asyncio.run(scenario())
    assert outcomes == [model.recommend(history, 10) for model, history in calls]
    assert outcomes[0].item_ids != old.recommend(items[:5], 10).item_ids  # the models differ
    assert batches(metrics) == (1, 1)


def test_a_lone_request_is_not_held_for_the_window(models_dir):
    model = tiny_model(models_dir)
    items = model.bundle.item_ids.tolist()
    query = model.prepare(items[:5], 10)
    metrics = Metrics()
    batcher = Batcher(max_size=64, window_ms=60_000, metrics=metrics)  # a one-minute window

    async def scenario():
        # Held for the window it would time out: it goes at once because nothing is queued.
        lone = await asyncio.wait_for(batcher.submit(model, query), timeout=10)
        await batcher.close()
        return lone

    started = time.perf_counter()
    assert asyncio.run(scenario()) == model.recommend(items[:5], 10)
    assert time.perf_counter() - started < 10
    assert batches(metrics) == (1, 0)


def test_a_request_alone_in_the_worker_skips_the_batch_queue(models_dir):
    app = create_app(make_settings(models_dir, batch_window_ms=1000))
    state = app.state.recsys

    async def scenario() -> list[dict]:
        async with serving(app) as client:
            items = state.models.current.bundle.item_ids.tolist()
            return [(await client.post("/recommend", json={"user_id": f"u{i}", "k": 5,
                                                            "history": items[i:i + 5]})).json()
                    for i in range(3)]

    answers = asyncio.run(scenario())
    model = tiny_model(models_dir)
    items = model.bundle.item_ids.tolist()
    for i, body in enumerate(answers):  # the answer it gets alone, without the batch loop
        assert [it["item_id"] for it in body["items"]] == model.recommend(
            items[i:i + 5], 5).item_ids
    assert state.batcher._task is None  # the batch loop never started
    assert batches(state.metrics) == (3, 0)


def test_the_window_holds_a_batch_open_for_late_mates_until_it_is_full(models_dir):
    model = tiny_model(models_dir)
    items = model.bundle.item_ids.tolist()
    queries = [model.prepare(items[i : i + 4], 10) for i in range(3)]
    metrics = Metrics()
    batcher = Batcher(max_size=3, window_ms=60_000, metrics=metrics)

    async def scenario() -> list:
        together = [asyncio.create_task(batcher.submit(model, q)) for q in queries[:2]]
        await asyncio.sleep(0.05)  # two arrived together: held open for more...
        assert not any(task.done() for task in together)
        late = asyncio.create_task(batcher.submit(model, queries[2]))
        # ...until a third fills it (max 3): it goes then, not when the window ends.
        done = await asyncio.wait_for(asyncio.gather(*together, late), timeout=10)
        await batcher.close()
        return done

    assert asyncio.run(scenario()) == [model.recommend(items[i : i + 4], 10) for i in range(3)]
    assert batches(metrics) == (1, 1)


def test_hot_reload_under_batched_load_drops_nothing(models_dir):
    # A real server on loopback, as in production: its event loop waits on sockets, so the
    # threads that publish and load the new version get the GIL. (In-process ASGI calls never
    # block, and a client looping on them can starve those threads for seconds.)
    app = create_app(make_settings(models_dir, reload_interval_seconds=0.05))

    async def scenario(url: str) -> list[tuple[int, dict]]:
        results: list[tuple[int, dict]] = []
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            items = app.state.recsys.models.current.bundle.item_ids.tolist()
            bodies = mixed_requests(items, 12)
            stop = time.monotonic() + 2.0

            async def worker(body: dict) -> None:
                while time.monotonic() < stop:
                    r = await client.post("/recommend", json=body)
                    results.append((r.status_code, r.json()))

            async def publisher() -> None:
                await asyncio.sleep(0.5)
                await asyncio.to_thread(publish_copy, models_dir, models_dir / "tiny" / "1")

            await asyncio.gather(publisher(), *(worker(b) for b in bodies))
        return results

    with live_server(app) as url:
        results = asyncio.run(scenario(url))
    assert {status for status, _ in results} == {200}
    versions = [body["model_version"] for _, body in results]
    assert set(versions) == {1, 2} and versions[-1] == 2
    # v2 is a copy of v1: whichever version served it, a user's answer is the same.
    by_user: dict[str, list] = {}
    for _, body in results:
        by_user.setdefault(body["user_id"], []).append(body["items"])
    assert all(all(a == answers[0] for a in answers) for answers in by_user.values())
    assert batches(app.state.recsys.metrics)[1] >= 1
