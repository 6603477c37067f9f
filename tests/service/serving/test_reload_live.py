"""Hot reload under concurrent load, against a real uvicorn server on loopback."""

import asyncio
import time

import httpx

from service.app import create_app
from tests.service.conftest import live_server, make_settings, publish_copy


def test_reload_under_concurrent_requests_drops_none(models_dir):
    app = create_app(make_settings(models_dir, reload_interval_seconds=0.05))

    async def load(base: str) -> list[tuple[int, int | None]]:
        results: list[tuple[int, int | None]] = []
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            probe = await client.post("/recommend", json={"user_id": "p", "k": 3})
            history = [i["item_id"] for i in probe.json()["items"]]
            stop = time.monotonic() + 3.0

            async def worker(n: int) -> None:
                while time.monotonic() < stop:
                    r = await client.post("/recommend", json={"user_id": f"u{n}", "k": 10,
                                                              "history": history})
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    results.append((r.status_code, version))

            async def publisher() -> None:
                await asyncio.sleep(0.8)
                await asyncio.to_thread(publish_copy, models_dir, models_dir / "tiny" / "1")

            await asyncio.gather(publisher(), *(worker(n) for n in range(8)))
        return results

    with live_server(app) as base:
        results = asyncio.run(load(base))
    statuses = {status for status, _ in results}
    versions = [v for _, v in results]
    assert statuses == {200}, f"non-200 answers during reload: {statuses}"
    assert len(results) > 50
    assert versions[0] == 1 and versions[-1] == 2 and set(versions) == {1, 2}
