"""Service fixtures: apps built on a private copy of the tiny bundle."""

import shutil

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def make_settings(models_dir, **overrides) -> Settings:
    base = dict(models_dir=models_dir, model_name="tiny", redis_url=None,
                reload_interval_seconds=0.1, log_level="WARNING")
    return Settings(**{**base, **overrides})


@pytest.fixture
def client_for(models_dir):
    """Builds a started TestClient for the given setting overrides."""
    clients = []

    def build(**overrides) -> TestClient:
        client = TestClient(create_app(make_settings(models_dir, **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def publish_copy(models_dir, source, name="tiny"):
    """Publish the files of bundle `source` as the next version of `name` (a real publish)."""
    import json

    from service import bundle as fmt

    manifest = json.loads((source / fmt.MANIFEST).read_text())
    keep = {k: v for k, v in manifest.items()
            if k not in ("files", "version", "name", "created", "format_version")}

    def copy_files(staging):
        for file in fmt.REQUIRED_FILES:
            shutil.copy(source / file, staging / file)

    return fmt.publish(models_dir, name, copy_files, keep)
