"""Shared fixtures: a small synthetic dataset, a briefly trained model and its bundle."""

import shutil
from pathlib import Path

import pytest
from pytest_redis import factories

from trainer.config import TrainConfig
from trainer.data.dataset import build_dataset
from trainer.data.synthetic import make_synthetic

# A real, throwaway Redis server per session (Debian's redis-server via pytest-redis), never
# the machine's shared one; `redisdb` flushes it after each test.
redis_proc = factories.redis_proc(port=None)
redisdb = factories.redisdb("redis_proc", decode=True)


@pytest.fixture
def redis_url(redis_proc, redisdb):
    return f"redis://{redis_proc.host}:{redis_proc.port}/0"


TINY_SPEC = {"synthetic": {"n_users": 300, "n_items": 200, "n_topics": 10, "min_len": 10,
                           "max_len": 20, "seed": 0}}


@pytest.fixture(scope="session")
def tiny_dataset():
    return build_dataset(make_synthetic(**TINY_SPEC["synthetic"]))


@pytest.fixture(scope="session")
def tiny_trained(tiny_dataset):
    from trainer.training.loop import train

    cfg = TrainConfig(max_epochs=2, eval_every=10, dim=16, seed=0)
    return cfg, train(tiny_dataset, cfg, progress=False)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_dataset, tiny_trained, tmp_path_factory) -> Path:
    """A published bundle of the tiny model in a fresh model store (read-only for tests)."""
    from trainer.export import publish_bundle
    from trainer.training.loop import evaluate_model

    cfg, result = tiny_trained
    test = evaluate_model(result.model, tiny_dataset.eval_split("test", cfg.maxlen))
    models = tmp_path_factory.mktemp("models")
    return publish_bundle(result.model, tiny_dataset, cfg, TINY_SPEC, {"test": test}, models,
                          "tiny", progress=False)


@pytest.fixture
def models_dir(tiny_bundle, tmp_path):
    """A model store with the tiny bundle as version 1 of model 'tiny'."""
    root = tmp_path / "models"
    shutil.copytree(tiny_bundle, root / "tiny" / "1")
    return root


@pytest.fixture(scope="session")
def sentence_encoder():
    """MiniLM, loaded once for the ESIM and crowd tests (imported here lazily: transformers
    is slow to import and most tests do not need it)."""
    from trainer.semantics.text_encoder import SentenceEncoder

    return SentenceEncoder()
