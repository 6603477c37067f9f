"""Service fixtures: apps built on a private copy of the tiny bundle."""


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
    from service.bundle import republish

    return republish(source, models_dir, name)
