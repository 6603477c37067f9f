"""End to end without Docker: the service (real uvicorn, real Redis) records events, the nightly
job turns them into a new bundle, the service hot-swaps to it and recommends with it."""

import subprocess
import sys
import time

import httpx

from tests.service.conftest import free_port


def test_events_to_nightly_to_hot_swap(tmp_path, redis_url, models_dir):
    import threading

    import uvicorn

    from service.app import create_app
    from tests.service.conftest import make_settings

    app = create_app(make_settings(models_dir, redis_url=redis_url,
                                   reload_interval_seconds=0.2))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/readyz").json()["ready"] is True

        # Users interact with known items and with one the served model has never seen.
        known = [i["item_id"] for i in client.post(
            "/recommend", json={"user_id": "probe", "k": 6}).json()["items"]]
        events = [{"user_id": f"shopper{u}", "item_id": item, "timestamp": 2e9 + t,
                   "event_id": f"{u}-{t}"}
                  for u in range(12)
                  for t, item in enumerate([*known, "brand-new-item", known[u % 6]])]
        assert client.post("/events", json={"events": events}).json()["accepted"] == len(events)
        before = client.post("/recommend", json={"user_id": "x", "history": ["brand-new-item"]})
        assert before.json()["model_version"] == 1 and before.json()["unknown_items"] == 1

        nightly = subprocess.run(
            [sys.executable, "-m", "trainer", "nightly", "--redis-url", redis_url,
             "--data-dir", str(tmp_path / "data"), "--models", str(models_dir),
             "--name", "tiny", "--epochs", "2", "--tolerance", "1", "--no-progress"],
            capture_output=True, text=True, timeout=300)
        assert nightly.returncode == 0, nightly.stderr

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if client.get("/model").json()["manifest"]["version"] == 2:
                break
            time.sleep(0.2)
        after = client.post("/recommend", json={"user_id": "x", "history": ["brand-new-item"],
                                                "k": 10}).json()
        assert after["model_version"] == 2
        assert after["unknown_items"] == 0 and after["fallback"] is False
        assert len(after["items"]) == 10
    finally:
        client.close()
        server.should_exit = True
        thread.join(timeout=10)
