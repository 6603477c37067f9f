"""The fuzzer in CI (issue 33): schemathesis generates requests from the OpenAPI schema, valid
and invalid (`--mode all`), with a fixed seed and a bounded number of examples per operation,
against the app behind a real uvicorn server with the limits `python -m service` serves with
and both API keys set. It asserts that no answer is a 5xx (counted by the server itself, not
only by schemathesis's check) and that every answer conforms to the schema (`--checks all`:
status codes, content types, bodies); it finds nothing but what is documented as intended
(README, API):

* ST202 on POST /recommend for `k: 3.0` (and `rows`, `row_size`): JSON Schema counts 3.0 as an
  integer; the API refuses it on purpose (strict types: a float is not a count).
* ST202 on POST /recommend and GET /items/{item_id}/similar for a filter's field or value that
  the served bundle does not have: the fields and their values are the catalogue's, which the
  schema cannot know (a 422 that names them, on purpose).
* ST205 on OPTIONS /users/{user_id}/history and /items/availability: each has two routes (GET
  and DELETE; GET and POST), and Starlette's 405 for an unsupported method lists the methods
  of the first one only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from starlette.types import ASGIApp, Receive, Scope, Send

from service.__main__ import server_options
from service.app import create_app
from tests.service.conftest import live_server, make_settings

SEED = 1
MAX_EXAMPLES = 40  # per operation and phase: about 20 s on two cores
ADMIN_KEY = "fuzz-admin-key"

INTENDED = {
    ("POST /recommend", "ST202"): re.compile(
        r'"type":"int_type","loc":\["body","(k|rows|row_size)"\]|"msg":"unknown (field|value)'),
    ("GET /items/{item_id}/similar", "ST202"): re.compile(r'"msg":"unknown (field|value)'),
    ("GET /users/{user_id}/history", "ST205"): re.compile(r"Allow: GET"),
    ("DELETE /users/{user_id}/history", "ST205"): re.compile(r"Allow: GET"),
    ("POST /items/availability", "ST205"): re.compile(r"Allow: POST"),
    ("GET /items/availability", "ST205"): re.compile(r"Allow: POST"),
}


def base_schema(app: Answers) -> dict:
    return app.app.openapi()  # type: ignore[attr-defined]


def schema_paths(schema: dict) -> dict:
    return {path: {m: op for m, op in item.items() if m in ("get", "post", "delete")}
            for path, item in schema["paths"].items()}


def schemathesis_cli() -> str | None:
    found = Path(sys.executable).with_name("schemathesis")
    return str(found) if found.exists() else shutil.which("schemathesis")


class Answers:
    """Counts the server's answers by (method, route, status), whatever the client checks."""

    def __init__(self, app: ASGIApp) -> None:
        self.app, self.seen = app, Counter[tuple[str, str, int]]()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.seen[(scope["method"], route, status)] += 1


@pytest.mark.slow
def test_schemathesis_finds_only_documented_deviations(models_dir, redis_url, tmp_path):
    cli = schemathesis_cli()
    if cli is None:
        pytest.skip("schemathesis is not installed (make install installs it)")
    settings = make_settings(models_dir, redis_url=redis_url, api_key="fuzz-data-key",
                             admin_api_key=ADMIN_KEY)
    app = Answers(create_app(settings))
    started = time.monotonic()
    with live_server(app, **server_options(settings)) as base:  # type: ignore[arg-type]
        run = subprocess.run(
            [cli, "run", f"{base}/openapi.json", "--checks", "all", "--mode", "all",
             "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
             "--header", f"X-API-Key: {ADMIN_KEY}", "--workers", "1",
             "--report", "junit", "--report-dir", str(tmp_path / "report"), "--no-color"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    fuzzed, statuses = Counter[tuple[str, str]](), Counter[int]()
    for (method, route, status), n in app.seen.items():
        if route != "/openapi.json":  # {user_id:anyid} -> {user_id}, as the schema has it
            fuzzed[(method, re.sub(r":\w+}", "}", route))] += n
            statuses[status] += n
    documented = {(m.upper(), path) for path, item in schema_paths(base_schema(app)).items()
                  for m in item}
    server_errors = {key: n for key, n in app.seen.items() if key[2] >= 500}
    print(f"\nschemathesis (seed {SEED}, at most {MAX_EXAMPLES} examples per operation and "
          f"phase): {sum(fuzzed.values())} requests, {len(documented & set(fuzzed))} of the "
          f"schema's {len(documented)} operations, in {seconds:.1f} s; statuses "
          f"{sorted(statuses.items())}")
    assert not server_errors, server_errors
    assert documented <= set(fuzzed), documented - set(fuzzed)  # every operation was fuzzed
    assert sum(fuzzed.values()) >= 500, fuzzed
    reports = list((tmp_path / "report").glob("*.xml"))
    assert reports, run.stdout[-3000:] + run.stderr[-3000:]
    cases = ET.parse(reports[0]).getroot().iter("testcase")
    unexpected, tested = [], 0
    for case in cases:
        tested += 1
        for failure in case.iter("failure"):
            text = failure.text or ""
            for code in sorted(set(re.findall(r"^- (ST\d+)", text, re.M))):
                pattern = INTENDED.get((case.get("name"), code))
                if pattern is None or not pattern.search(text):
                    unexpected.append(f"{case.get('name')} {code}:\n{text[:1500]}")
    assert tested >= 12  # every operation was exercised
    assert not unexpected, "\n\n".join(unexpected)


# The id rule against its schema, by hypothesis directly: any text is accepted by the server
# exactly when the schema's pattern accepts it (ECMA's `$` ends the input: a fullmatch). The
# schemathesis run above did not find the "a\n" defect of issue 33 (run on the code before the
# fix with seed 1 and its bounded examples, it never sent one); this does (falsifying example
# "0\n", accepted by the old rule), in 300 derandomized examples, a few seconds.
# Text with its ends drawn from the characters the rule is about (where it went wrong).
EDGES = ["", "", "", "\n", "\n", "\r", "\r\n", " ", "\t", "\x00", "\x85", "\u00a0",
         "\ufeff"]
IDS = st.builds(lambda head, core, tail: head + core + tail, st.sampled_from(EDGES),
                st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cc",)),
                        max_size=12) | st.text(alphabet=st.characters(codec="utf-8"),
                                               max_size=12),
                st.sampled_from(EDGES)).filter(bool)


@given(value=IDS)
@hypothesis_settings(max_examples=300, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_ids_are_accepted_exactly_when_the_schema_pattern_accepts_them(client_for, value):
    client = shared_client(client_for)
    pattern = client.get("/openapi.json").json()["components"]["schemas"]["EventIn"][
        "properties"]["user_id"]["pattern"]
    schema_ok = re.fullmatch(pattern, value) is not None
    events = client.post("/events", json={"user_id": "fuzz", "item_id": value})
    assert (events.status_code == 200) == schema_ok, (value, events.text)
    history = client.get(f"/users/{quote(value, safe='')}/history")
    assert (history.status_code == 200) == schema_ok, (value, history.text)


_clients: dict[int, Any] = {}


def shared_client(client_for) -> Any:
    """One app for all of hypothesis's examples (the fixture is function-scoped)."""
    key = id(client_for)
    if key not in _clients:
        _clients.clear()
        _clients[key] = client_for()
    return _clients[key]
