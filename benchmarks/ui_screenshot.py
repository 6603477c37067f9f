"""A screenshot of the web page for a history given by titles, on a published bundle.

Starts `python -m service` on loopback (in-process history store), stores the history as
events of one user, opens `/ui?user=...` in Debian's headless chromium (selenium) and saves a
PNG; prints the served answer (titles per interest, names) as JSON beside it.

    python benchmarks/ui_screenshot.py models --model recommender \\
        --title "Silence of the Lambs, The (1991)" --title "Star Wars (1977)" \\
        --out benchmarks/results/ui/issue22-default.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

# A sibling script (free_port, wait_ready): run as a script, benchmarks/ is on the path.
import service_load

REPO = Path(__file__).resolve().parents[1]
USER = "page-demo"


@contextlib.contextmanager
def serve(models_dir: Path, model: str, log: Path) -> Iterator[str]:
    port = service_load.free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "API_KEY", "PROMETHEUS_MULTIPROC_DIR", "WORKERS")}
    env.update({"MODELS_DIR": str(models_dir.resolve()), "MODEL_NAME": model,
                "HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(REPO)})
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service"], cwd=log.parent, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        service_load.wait_ready(base, process, timeout=60)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models_dir", type=Path, help="the model store (MODELS_DIR)")
    parser.add_argument("--model", default="recommender", help="MODEL_NAME")
    parser.add_argument("--title", action="append", required=True,
                        help="a history item's exact title, oldest first (repeat)")
    parser.add_argument("--diversity", type=float, default=0.0,
                        help="the request's diversity setting (the page's box)")
    parser.add_argument("--rows", type=int, default=4,
                        help="interest rows beside the list (the page's box)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, \
            serve(args.models_dir, args.model, Path(tmp) / "service.log") as base, \
            httpx.Client(base_url=base, timeout=10) as api:
        served = api.get("/model").raise_for_status().json()
        version = served["manifest"]["version"]
        items = json.loads((Path(served["path"]) / "items.json").read_text())
        by_title = dict(zip(items["titles"], items["item_ids"], strict=True))
        missing = [t for t in args.title if t not in by_title]
        if missing:
            raise SystemExit(f"titles not in the bundle's items.json: {missing}")
        events = [{"user_id": USER, "item_id": by_title[t], "timestamp": 1e9 + n}
                  for n, t in enumerate(args.title)]
        api.post("/events", json={"events": events}).raise_for_status()
        answer = api.post("/recommend", json={
            "user_id": USER, "k": 20, "exclude_seen": True, "diversity": args.diversity,
            "rows": args.rows}).raise_for_status().json()

        options = webdriver.ChromeOptions()
        options.binary_location = args.chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--disable-gpu", "--window-size=1440,2300",
                    f"--user-data-dir={Path(tmp) / 'chrome-profile'}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
        try:
            driver.get(f"{base}/ui?user={USER}&diversity={args.diversity}&rows={args.rows}")
            deadline = time.monotonic() + 30
            while not driver.find_elements("css selector", "#groups section.group"):
                if time.monotonic() > deadline:
                    raise SystemExit("the page showed no recommendations within 30 s")
                time.sleep(0.1)
            time.sleep(0.5)  # the last paint
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    titles = dict(zip(items["item_ids"], items["titles"], strict=True))
    groups: dict[str, list[str]] = {}
    for item in answer["items"]:
        key = "fallback" if item["interest"] is None else str(item["interest"])
        groups.setdefault(key, []).append(titles.get(item["item_id"], item["item_id"]))
    print(json.dumps({"model_version": version, "history": args.title,
                      "diversity": args.diversity, "screenshot":
                      str(args.out), "groups": groups,
                      "interests": answer.get("interests"),
                      "rows": [{"name": r["name"], "source": r["source"],
                                "confidence": r["confidence"],
                                "because": [titles.get(i, i) for i in r["because"]],
                                "items": [titles.get(i["item_id"], i["item_id"])
                                          for i in r["items"]]}
                               for r in answer.get("rows", [])]}, indent=1))


if __name__ == "__main__":
    main()
