"""TrainConfig: choices declared once (Literal types), stored configs load, and the registries
keyed by the configured choices fail at import when they differ from them."""

import importlib.util
from dataclasses import fields
from typing import get_args

import pytest

import trainer.config
from trainer.config import (
    BACKBONES,
    ESIM_LEVELS,
    HELP,
    INTEREST_LOSSES,
    LLM_BACKENDS,
    LOSSES,
    MATCHING_RULES,
    Backbone,
    EsimLevel,
    InterestLoss,
    LLMBackend,
    Loss,
    MatchingRule,
    TrainConfig,
    check_registry,
)


def test_choice_tuples_are_the_literal_types():
    assert BACKBONES == get_args(Backbone) == (
        "comirec-sa", "comirec-dr", "mind", "sasrec", "transformer-sa")
    assert LOSSES == get_args(Loss) == ("auto", "full", "sampled")
    assert INTEREST_LOSSES == get_args(InterestLoss) == ("max", "argmax")
    assert LLM_BACKENDS == get_args(LLMBackend) == ("local", "openai", "metadata", "oracle")
    assert MATCHING_RULES == get_args(MatchingRule) == ("attention", "similarity")
    assert ESIM_LEVELS == get_args(EsimLevel) == ("individual", "crowd", "dual")


@pytest.mark.parametrize("name,value", [("backbone", "nope"), ("loss", "nope"),
                                        ("interest_loss", "nope"), ("llm", "nope"),
                                        ("esim_matching", "nope"), ("esim_level", "nope")])
def test_a_value_outside_the_choices_is_refused(name, value):
    with pytest.raises(ValueError, match="nope"):
        TrainConfig(**{name: value})


def test_every_field_has_help():
    for f in fields(TrainConfig):
        assert f.metadata.get(HELP), f"TrainConfig.{f.name} has no help text"


def test_a_stored_config_with_the_old_extra_field_still_loads():
    assert "extra" not in TrainConfig().to_dict()
    stored = {**TrainConfig(dim=8).to_dict(), "extra": {}, "some_future_key": 1}
    assert TrainConfig.from_dict(stored) == TrainConfig(dim=8)
    assert TrainConfig.from_dict({"extra": {"a": 1}, "max_epochs": 3}).max_epochs == 3


def test_check_registry_names_what_differs():
    check_registry("things", {"a": 1, "b": 2}, ("b", "a"))
    with pytest.raises(RuntimeError, match=r"no implementation: \['c'\]; not a choice: \[\]"):
        check_registry("things", {"a": 1, "b": 2}, ("a", "b", "c"))
    with pytest.raises(RuntimeError, match=r"no implementation: \[\]; not a choice: \['b'\]"):
        check_registry("things", {"a": 1, "b": 2}, ("a",))


def import_fresh(module: str) -> None:
    """Execute a module anew (not registered in sys.modules): what importing it does."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_backbone_classes_are_keyed_by_the_configured_backbones(monkeypatch):
    from trainer.encoders.registry import BACKBONE_CLASSES

    assert tuple(BACKBONE_CLASSES) == BACKBONES
    import_fresh("trainer.encoders.registry")  # as it is: fine
    monkeypatch.setattr(trainer.config, "BACKBONES", (*BACKBONES, "new-net"))
    with pytest.raises(RuntimeError, match="backbones.*no implementation: \\['new-net'\\]"):
        import_fresh("trainer.encoders.registry")
    monkeypatch.setattr(trainer.config, "BACKBONES", BACKBONES[1:])
    with pytest.raises(RuntimeError, match="not a choice: \\['comirec-sa'\\]"):
        import_fresh("trainer.encoders.registry")


def test_labellers_are_keyed_by_the_configured_llm_backends(monkeypatch):
    from trainer.semantics.llm.labellers import LABELLERS, make_labeller

    assert tuple(LABELLERS) == LLM_BACKENDS
    assert type(make_labeller("metadata", 3)).__name__ == "MetadataLabeller"
    with pytest.raises(ValueError, match="unknown LLM backend 'nope'"):
        make_labeller("nope", 3)
    monkeypatch.setattr(trainer.config, "LLM_BACKENDS", (*LLM_BACKENDS, "new-llm"))
    with pytest.raises(RuntimeError, match="LLM backends.*no implementation: \\['new-llm'\\]"):
        import_fresh("trainer.semantics.llm.labellers")
