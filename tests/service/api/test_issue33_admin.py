"""Issue 33, point 5: the routes that change state for everyone (or show server paths) need
ADMIN_API_KEY; open admin routes on a non-loopback address refuse to start. Each test here
failed before its fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.service.conftest import free_port

# "\n" at the end passed `re.match(r"...$")`; "\r" and a leading "\n" are checked as well.
LINE_BREAK_IDS = ["a\n", "a\r", "\na"]


@pytest.fixture
def client(client_for):
    return client_for()


# --- 5: admin routes behind their own key ------------------------------------------------------

ADMIN_CALLS = [("POST", "/items/availability", {"unavailable": ["x"]}),
               ("POST", "/model/reload", None), ("DELETE", "/users/u/history", None),
               ("GET", "/model", None), ("GET", "/ab/report", None)]
DATA_CALLS = [("POST", "/recommend", {"user_id": "u"}), ("GET", "/users/u/history", None),
              ("POST", "/events", {"user_id": "u", "item_id": "1"}),
              ("GET", "/items/availability", None)]


@pytest.mark.parametrize("api_key", [None, "data-key"])
def test_admin_routes_need_the_admin_key(client_for, api_key):
    client = client_for(api_key=api_key, admin_api_key="admin-key")
    data = {"X-API-Key": api_key} if api_key else {}
    for method, path, body in ADMIN_CALLS:
        anonymous = client.request(method, path, json=body)
        assert anonymous.status_code == 401, (path, anonymous.text)
        assert "API key" in anonymous.json()["detail"]
        if api_key:
            assert client.request(method, path, json=body, headers=data).status_code == 403
        admin = client.request(method, path, json=body, headers={"X-API-Key": "admin-key"})
        assert admin.status_code == 200, (path, admin.text)
        bearer = client.request(method, path, json=body,
                                headers={"Authorization": "Bearer admin-key"})
        assert bearer.status_code == 200, path
    for method, path, body in DATA_CALLS:
        assert client.request(method, path, json=body, headers=data).status_code == 200, path
        # the admin key opens the data routes too
        assert client.request(method, path, json=body,
                              headers={"X-API-Key": "admin-key"}).status_code == 200, path


def test_without_an_admin_key_the_api_key_covers_every_route(client_for):
    client = client_for(api_key="data-key")
    for method, path, body in ADMIN_CALLS:
        assert client.request(method, path, json=body).status_code == 401, path
        assert client.request(method, path, json=body,
                              headers={"X-API-Key": "data-key"}).status_code == 200, path


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "api.example.com"])
def test_open_admin_routes_on_a_public_address_refuse_to_start(host):
    with pytest.raises(ValidationError, match="ADMIN_API_KEY"):
        Settings(host=host)
    with pytest.raises(ValidationError, match="ADMIN_API_KEY"):
        Settings(host=host, api_key="data-key")  # the data key alone does not close them
    assert Settings(host=host, admin_api_key="admin-key").admin_api_key == "admin-key"
    assert Settings(host=host, allow_open_admin=True).allow_open_admin  # said explicitly


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_open_admin_routes_on_loopback_start(host):
    assert Settings(host=host).host == host


def test_the_schema_documents_401_and_403_on_admin_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "403" in paths["/model/reload"]["post"]["responses"]
    assert "403" in paths["/items/availability"]["post"]["responses"]
    assert "403" not in paths["/recommend"]["post"]["responses"]




def test_python_m_service_on_a_public_address_exits_2_naming_the_fix(models_dir):
    import subprocess
    import sys

    from tests.service.test_workers import REPO, service_env

    env = service_env(models_dir, free_port(), host="0.0.0.0")
    done = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "ADMIN_API_KEY" in done.stderr and "ALLOW_OPEN_ADMIN=true" in done.stderr
