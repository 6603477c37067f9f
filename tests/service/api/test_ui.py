"""The web page (GET /ui) in a real browser: Debian's chromium, headless, driven by selenium
through Debian's chromedriver, against a real `python -m service` process on loopback (the
in-process history store, an API key and a two-variant A/B split). The flow a person follows:
give the key, pick a new user (popularity fallback), click an item, pick a user with a
history, check history titles and interest groups against the JSON API, click, see both lists
change. A screenshot is saved under the test's tmp dir and copied to benchmarks/results/ui/.

Skipped, with the reason, where chromium, chromedriver or selenium are missing (`make test`
installs them: the `chromium` target and the `dev` extra)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.bundle.format import republish
from tests.service.conftest import free_port

REPO = Path(__file__).resolve().parents[3]
SCREENSHOTS = REPO / "benchmarks" / "results" / "ui"  # gitignored
API_KEY = "ui-test-key"
# A title that would run script or add markup if the page used innerHTML with data.
HOSTILE = "<img src=x onerror=\"document.title='pwned'\"> Tom's & \"Jerry\" <b>bold</b>"
WAIT = 15  # seconds for one page update (they take well under one)


def browser_paths() -> tuple[str, str]:
    """Debian's chromium and chromedriver, or skip saying which is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    found = {name: shutil.which(name) or (f"/usr/bin/{name}"
                                          if os.access(f"/usr/bin/{name}", os.X_OK) else None)
             for name in ("chromium", "chromedriver")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        reason = (f"{' and '.join(missing)} not installed (make chromium: apt-get install "
                  f"chromium chromium-driver)")
        print(f"SKIP {reason}")
        pytest.skip(reason)
    return found["chromium"], found["chromedriver"]  # type: ignore[return-value]


@pytest.fixture
def ui_models(tiny_bundle: Path, tmp_path: Path) -> tuple[Path, str]:
    """A model store with 'tiny' v1 and v2 (the same model), whose most popular item has a
    title full of markup; and that item's id."""
    source = tmp_path / "source"
    shutil.copytree(tiny_bundle, source)
    items = json.loads((source / "items.json").read_text())
    popular = int(np.argmax(np.load(source / "popularity.npy")))
    items["titles"][popular] = HOSTILE
    (source / "items.json").write_text(json.dumps(items))
    root = tmp_path / "models"
    republish(source, root, "tiny")
    republish(source, root, "tiny")
    return root, items["item_ids"][popular]


@contextlib.contextmanager
def serve(models_dir: Path, log: Path) -> Iterator[str]:
    """`python -m service` on a free loopback port; yields its base URL once ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "API_KEY", "PROMETHEUS_MULTIPROC_DIR", "WORKERS")}
    env.update({"MODELS_DIR": str(models_dir), "MODEL_NAME": "tiny", "HOST": "127.0.0.1",
                "PORT": str(port), "LOG_LEVEL": "WARNING", "API_KEY": API_KEY,
                # control serves the newest version (2), treatment pins version 1.
                "AB_VARIANTS": "control=tiny:0.5,treatment=tiny@1:0.5",
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])})
    with open(log, "wb") as out:
        # cwd: the tmp dir, so that no .env of the checkout changes the settings.
        process = subprocess.Popen([sys.executable, "-m", "service"], cwd=log.parent, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"service exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready: {log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).json().get("ready"):
                    break
            time.sleep(0.1)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the session started here
            process.wait(timeout=5)


@contextlib.contextmanager
def chrome(chromium: str, chromedriver: str, tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,1400", f"--user-data-dir={tmp_path / 'chrome-profile'}",
                "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console
    driver = webdriver.Chrome(service=Service(chromedriver,
                                              log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


# --- reading the page ---------------------------------------------------------------------------


def loaded_marker(driver: Any) -> str | None:
    return driver.execute_script("return document.body.dataset.loaded || null")


def wait_for(driver: Any, condition: Any, what: str) -> None:
    """Wait for condition(driver); on timeout say what was awaited and what the page said."""
    deadline = time.monotonic() + WAIT
    while not condition(driver):
        if time.monotonic() > deadline:
            status = driver.find_element("id", "status").text
            raise AssertionError(f"timed out waiting for {what}; page status: {status!r}")
        time.sleep(0.05)


def wait_reload(driver: Any, before: str | None, what: str) -> None:
    wait_for(driver, lambda d: loaded_marker(d) not in (None, before), what)


def shown_history(driver: Any) -> list[tuple[str, str]]:
    """(item id, title) of the history list, as shown: newest first."""
    return [(li.get_attribute("data-item-id"), li.find_element("css selector", ".title").text)
            for li in driver.find_elements("css selector", "#history li")]


def shown_groups(driver: Any) -> list[tuple[str, str, list[str]]]:
    """(data-interest, heading, item ids) per recommendation group, in page order."""
    return [(group.get_attribute("data-interest"), group.find_element("tag name", "h3").text,
             [b.get_attribute("data-item-id")
              for b in group.find_elements("css selector", "button.item")])
            for group in driver.find_elements("css selector", "#groups section.group")]


def shown_rows(driver: Any) -> list[tuple[str, str, str, list[str]]]:
    """(data-interest, name, because line, item ids) per interest row, in page order."""
    return [(row.get_attribute("data-interest"),
             row.find_element("css selector", "h3 .title").text,
             row.find_element("css selector", ".because").text,
             [b.get_attribute("data-item-id") for b in row.find_elements("css selector",
                                                                         "button.item")])
            for row in driver.find_elements("css selector", "#rows section.row")]


def expected_rows(answer: dict[str, Any]) -> list[tuple[str, str, str, list[str]]]:
    """The JSON answer's rows as the page shows them ("Because you watched" the first four
    history items, by title)."""
    out = []
    for row in answer["rows"]:
        named = [t or i for i, t in zip(row["because"], row["because_titles"], strict=True)]
        because = "Because you watched " + ", ".join(named[:4]) + (
            f" and {len(named) - 4} more" if len(named) > 4 else "")
        out.append((row["interest"], row["name"], because,
                    [i["item_id"] for i in row["items"]]))
    return out


def term(driver: Any, panel: str, name: str) -> str:
    return driver.find_element("css selector", f'#{panel} dd[data-term="{name}"]').text


def expected_groups(answer: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The JSON answer's items grouped by interest, groups in the order of their best item."""
    groups: dict[str, list[str]] = {}
    for item in answer["items"]:
        key = "fallback" if item["interest"] is None else str(item["interest"])
        groups.setdefault(key, []).append(item["item_id"])
    return list(groups.items())


def load_user(driver: Any, user: str) -> None:
    box = driver.find_element("id", "user")
    box.clear()
    box.send_keys(user)
    before = loaded_marker(driver)
    driver.find_element("id", "load").click()
    wait_reload(driver, before, f"user {user!r} to load")


def click_item(driver: Any, item_id: str) -> None:
    before = loaded_marker(driver)
    driver.find_element("css selector", f'button.item[data-item-id="{item_id}"]').click()
    wait_reload(driver, before, f"the page to reload after clicking {item_id}")


# --- without a browser ----------------------------------------------------------------------------


def test_page_is_public_static_and_self_contained(client_for: Any) -> None:
    client = client_for(api_key="k")
    for path in ("/", "/ui"):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'src="ui/app.js"' in page.text  # relative: the same from / and /ui
    assert client.get("/ui/", follow_redirects=False).headers["location"].endswith("/ui")
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        answer = client.get(f"/ui/{asset}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
    # Nothing from outside the service: no absolute or protocol-relative URL in the files.
    for file in (REPO / "service" / "ui").iterdir():
        assert not re.search(r"(https?:)?//[\w.-]+\.[a-z]", re.sub(
            r"^\s*//.*$", "", file.read_text(), flags=re.M)), file
    assert "/ui" not in client.get("/openapi.json").json()["paths"]
    assert client.get("/users/u/history/titles").status_code == 401  # the data is not public


def test_history_titles(client_for: Any) -> None:
    client = client_for()
    items = [i["item_id"] for i in client.post(
        "/recommend", json={"user_id": "probe", "k": 2}).json()["items"]]
    events = [{"user_id": "a/b", "item_id": item, "timestamp": 1e9 + n}
              for n, item in enumerate([*items, "not-in-the-catalogue"])]
    assert client.post("/events", json={"events": events}).json()["accepted"] == 3
    body = client.get("/users/a/b/history/titles").json()
    assert body == {"user_id": "a/b", "model_version": 1, "items": [
        {"item_id": items[0], "title": f"item {items[0]}"},
        {"item_id": items[1], "title": f"item {items[1]}"},
        {"item_id": "not-in-the-catalogue", "title": None}]}
    assert client.get("/users/a/b/history").json()["items"] == [*items, "not-in-the-catalogue"]
    assert client.get("/users/nobody/history/titles").json()["items"] == []
    assert client.get("/users/%20x/history/titles").status_code == 422


# --- the flow -----------------------------------------------------------------------------------


def test_page_flow_in_headless_chromium(ui_models: tuple[Path, str], tmp_path: Path) -> None:
    chromium, chromedriver = browser_paths()
    from selenium.webdriver.common.action_chains import ActionChains

    models_dir, hostile_item = ui_models
    started = time.monotonic()
    with serve(models_dir, tmp_path / "service.log") as base, \
            httpx.Client(base_url=base, timeout=10, headers={"X-API-Key": API_KEY}) as api, \
            chrome(chromium, chromedriver, tmp_path) as driver:

        def recommend(user: str, diversity: float = 0.0) -> dict[str, Any]:  # the page's
            body = {"user_id": user, "k": 20, "exclude_seen": True, "diversity": diversity,
                    "rows": 4}
            return api.post("/recommend", json=body).raise_for_status().json()

        def stored(user: str) -> list[str]:
            return api.get(f"/users/{user}/history").raise_for_status().json()["items"]

        # The page is public; its data calls are not: the key box opens on the first 401.
        assert httpx.get(f"{base}/ui").status_code == 200
        assert httpx.get(f"{base}/model").status_code == 401
        driver.get(f"{base}/ui")
        wait_for(driver, lambda d: d.find_element("id", "key-box").get_attribute("open")
                 is not None, "the API key box to open after a 401")
        driver.find_element("id", "api-key").send_keys(API_KEY)
        driver.find_element("css selector", "#key-form button").click()

        # Model panel: the served manifest and the A/B split, as GET /model reports them.
        model = api.get("/model").json()
        version = str(model["manifest"]["version"])
        wait_for(driver, lambda d: d.find_elements("css selector", '#model dd[data-term="version"]')
                 and term(d, "model", "version") == version, f"model version {version}")
        assert version == "2" and term(driver, "model", "name") == "tiny"
        assert term(driver, "model", "items") == str(model["manifest"]["item_count"])
        metrics = driver.find_elements("css selector", "#metrics dt")
        assert metrics and all(m.text.startswith("test / ") for m in metrics)
        assert "50% of users" in term(driver, "ab", "control")
        assert "tiny v2" in term(driver, "ab", "control")
        assert "tiny v1 (pinned @1)" in term(driver, "ab", "treatment")

        # A new user: the popularity fallback, said so; titles shown as text, never as markup.
        load_user(driver, "newcomer")
        assert driver.find_element("id", "fallback").is_displayed()
        assert shown_history(driver) == []
        answer = recommend("newcomer")
        assert answer["fallback"] is True
        groups = shown_groups(driver)
        assert [(g[0], g[2]) for g in groups] == expected_groups(answer) == [
            ("fallback", [i["item_id"] for i in answer["items"]])]
        assert groups[0][1] == "Popular items (fallback)"
        hostile = driver.find_element(
            "css selector", f'button.item[data-item-id="{hostile_item}"] .title')
        assert hostile.text == HOSTILE
        assert not driver.find_elements("css selector", "#groups img, #groups b")
        assert driver.title == "EIMF recommender"

        # Its first click: stored, shown first in the history, and the fallback is gone.
        click_item(driver, hostile_item)
        assert stored("newcomer") == [hostile_item]
        assert shown_history(driver) == [(hostile_item, HOSTILE)]
        assert "new" in driver.find_element("css selector", "#history li").get_attribute("class")
        assert not driver.find_element("id", "fallback").is_displayed()
        assert [(g[0], g[2]) for g in shown_groups(driver)] == expected_groups(
            recommend("newcomer"))

        # A user with a stored history of two tastes (given through the JSON API, oldest
        # first): three items of each of two categories.
        categories = json.loads((models_dir / "tiny" / "2" / "items.json").read_text())[
            "fields"]["category"]
        ids = json.loads((models_dir / "tiny" / "2" / "items.json").read_text())["item_ids"]
        seed = [ids[r] for r in categories["topic-2"][:3] + categories["topic-7"][:3]]
        events = [{"user_id": "ui-user", "item_id": item, "timestamp": 1.7e9 + n,
                   "event_id": f"seed-{n}"} for n, item in enumerate(seed)]
        assert api.post("/events", json={"events": events}).json()["accepted"] == len(seed)
        load_user(driver, "ui-user")
        titled = api.get("/users/ui-user/history/titles").json()["items"]
        assert [t["item_id"] for t in titled] == stored("ui-user") == seed
        assert shown_history(driver) == [(t["item_id"], t["title"]) for t in reversed(titled)]
        assert not driver.find_element("id", "fallback").is_displayed()

        # Recommendations grouped by interest, exactly the JSON API's answer (near-copy
        # interests reported as one), and the rows: the user's two tastes, named.
        answer = recommend("ui-user")
        groups = shown_groups(driver)
        assert [(g[0], g[2]) for g in groups] == expected_groups(answer)
        for interest, heading, _ in groups:
            assert heading.startswith(f"Interest {int(interest) + 1}")
        shown = shown_rows(driver)
        assert shown == expected_rows(answer)
        assert sorted(name for _, name, _, _ in shown) == ["topic-2", "topic-7"]
        assert all(because.startswith("Because you watched item ") for _, _, because, _ in shown)
        summaries = driver.find_elements("css selector", "#interests li")
        assert len(summaries) == len(answer["interests"])
        assert term(driver, "last-answer", "model") == f"tiny v{answer['model_version']}"
        if "variant" in answer:  # the A/B fields: the user's variant and this answer's id
            assert term(driver, "last-answer", "variant") == answer["variant"]

        # Click an item of the second row: the history grows by it, the lists change.
        clicked = shown[1][3][0]
        before = [i for _, _, ids in groups for i in ids]
        click_item(driver, clicked)
        assert stored("ui-user") == [*seed, clicked]
        history = shown_history(driver)
        assert history[0][0] == clicked and len(history) == len(seed) + 1
        after = shown_groups(driver)
        shown_after = [i for _, _, ids in after for i in ids]
        assert clicked not in shown_after and shown_after != before  # exclude_seen
        assert [(g[0], g[2]) for g in after] == expected_groups(recommend("ui-user"))
        assert shown_rows(driver) == expected_rows(recommend("ui-user"))
        assert clicked not in [i for _, _, _, ids in shown_rows(driver) for i in ids]
        assert "recorded a click on" in driver.find_element("id", "status").text

        # The diversity box goes into the request: the groups are the spread answer's.
        box = driver.find_element("id", "diversity")
        box.clear()
        box.send_keys("1")
        before_marker = loaded_marker(driver)
        driver.find_element("id", "load").click()
        wait_reload(driver, before_marker, "the page to reload with diversity 1")
        assert [(g[0], g[2]) for g in shown_groups(driver)] == expected_groups(
            recommend("ui-user", 1.0))

        # Both clicks carried their answer's request id: the A/B report counts them.
        if "request_id" in answer:
            report = api.get("/ab/report").json()
            assert sum(v["clicked_requests"] for v in report["variants"]) == 2
            text = term(driver, "ab-report", answer["variant"])
            assert int(re.match(r"(\d+)/(\d+) answers clicked", text).group(1)) >= 1

        # The pointer off the lists, so that no item shows its hover style in the picture.
        ActionChains(driver).move_to_element(driver.find_element("tag name", "h1")).perform()
        shot = tmp_path / "ui.png"
        assert driver.save_screenshot(str(shot))
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        copy = SCREENSHOTS / "ui-flow.png"
        shutil.copyfile(shot, copy)
        print(f"screenshot: {shot} (copied to {copy})")

        # No script errors; the only failed loads are the 401s before the key was given.
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
                  and "status of 401" not in e["message"]]
        assert not errors, errors
    assert time.monotonic() - started < 60
