"""schemathesis (`--checks all`) against the running service finds nothing but what is
documented as intended (README, API):

* ST202 on POST /recommend for `k: 3.0`: JSON Schema counts 3.0 as an integer; the API refuses
  it on purpose (strict types: a float is not a count).
* ST202 on POST /recommend and GET /items/{item_id}/similar for a filter's field or value that
  the served bundle does not have: the fields and their values are the catalogue's, which the
  schema cannot know (a 422 that names them, on purpose).
* ST205 on OPTIONS /users/{user_id}/history and /items/availability: each has two routes (GET
  and DELETE; GET and POST), and Starlette's 405 for an unsupported method lists the methods
  of the first one only.
"""

import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from service.app import create_app
from tests.service.conftest import live_server, make_settings

INTENDED = {
    ("POST /recommend", "ST202"): re.compile(
        r'"type":"int_type","loc":\["body","k"\]|"msg":"unknown (field|value)'),
    ("GET /items/{item_id}/similar", "ST202"): re.compile(r'"msg":"unknown (field|value)'),
    ("GET /users/{user_id}/history", "ST205"): re.compile(r"Allow: GET"),
    ("DELETE /users/{user_id}/history", "ST205"): re.compile(r"Allow: GET"),
    ("POST /items/availability", "ST205"): re.compile(r"Allow: POST"),
    ("GET /items/availability", "ST205"): re.compile(r"Allow: POST"),
}


def schemathesis_cli() -> str | None:
    found = Path(sys.executable).with_name("schemathesis")
    return str(found) if found.exists() else shutil.which("schemathesis")


@pytest.mark.slow
def test_schemathesis_finds_only_documented_deviations(models_dir, redis_url, tmp_path):
    cli = schemathesis_cli()
    if cli is None:
        pytest.skip("schemathesis is not installed (make install installs it)")
    app = create_app(make_settings(models_dir, redis_url=redis_url))
    with live_server(app) as base:
        run = subprocess.run(
            [cli, "run", f"{base}/openapi.json", "--checks", "all", "--max-examples", "40",
             "--seed", "1", "--report", "junit", "--report-dir", str(tmp_path / "report"),
             "--no-color"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600)
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
