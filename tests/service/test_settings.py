"""Settings: one declaration per setting, with its description; the README table is rendered
from them; the fields the nightly job shares live in StoreSettings."""

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, StoreSettings, settings_table

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- settings-table:start", "<!-- settings-table:end -->"
REGENERATE = ("python -m service.settings --markdown, pasted between the settings-table "
              "markers in README.md")


def readme_table() -> str:
    lines = (ROOT / "README.md").read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(START)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END)]
    assert len(starts) == len(ends) == 1 and starts[0] < ends[0], \
        f"README.md needs one {START} ... {END} block"
    return "".join(lines[starts[0] + 1 : ends[0]])


def test_readme_settings_table_is_the_rendered_one():
    assert readme_table() == settings_table(), \
        f"README.md's settings table differs from service/settings.py; regenerate: {REGENERATE}"


def test_every_setting_has_a_description_and_its_field_name_as_variable():
    for name, info in Settings.model_fields.items():
        assert info.description, f"Settings.{name} has no description (README table)"
        assert "|" not in info.description and "\n" not in info.description, name
        assert info.alias is None and info.validation_alias is None, name  # env = NAME
    assert Settings.model_config.get("env_prefix", "") == ""


def test_the_shared_fields_are_in_the_base_and_read_by_the_same_names(monkeypatch, tmp_path):
    assert issubclass(Settings, StoreSettings)
    assert set(StoreSettings.model_fields) == {
        "models_dir", "model_name", "redis_url", "event_stream", "event_stream_shards"}
    for name, info in StoreSettings.model_fields.items():
        assert Settings.model_fields[name].description == info.description
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODELS_DIR", "/srv/models")
    monkeypatch.setenv("MODEL_NAME", "mine")
    monkeypatch.setenv("REDIS_URL", "redis://r:6379/1")
    monkeypatch.setenv("EVENT_STREAM", "ev")
    monkeypatch.setenv("EVENT_STREAM_SHARDS", "4")
    monkeypatch.setenv("FAISS_THREADS", "3")
    s = Settings()
    assert (s.models_dir, s.model_name, s.redis_url, s.event_stream, s.event_stream_shards,
            s.faiss_threads) == (Path("/srv/models"), "mine", "redis://r:6379/1", "ev", 4, 3)


def test_the_service_reads_dot_env_and_the_base_does_not(monkeypatch, tmp_path):
    for name in ("MODEL_NAME", "PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MODEL_NAME=from-dotenv\nPORT=9000\n")
    assert (Settings().model_name, Settings().port) == ("from-dotenv", 9000)
    assert StoreSettings().model_name == "recommender"


def test_validation_is_unchanged(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match="EVENT_STREAM_SHARDS=1 cannot work"):
        StoreSettings(redis_url="redis+cluster://h:7000", event_stream_shards=1)
    with pytest.raises(ValidationError, match="EVENT_STREAM_SHARDS=1 cannot work"):
        Settings(redis_url="redis+cluster://h:7000", event_stream_shards=1)
    with pytest.raises(ValidationError, match="WORKERS=2 needs REDIS_URL"):
        Settings(redis_url=None, workers=2)
    with pytest.raises(ValidationError):
        Settings(event_stream_shards=0)
    assert Settings(redis_url="redis://h:6379/0", workers=2).workers == 2


def test_settings_module_stays_light():
    # The multi-worker supervisor imports it before any worker loads a model.
    code = ("import sys, service.settings; print([m for m in ('numpy', 'faiss', 'onnxruntime', "
            "'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_markdown_command_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "service.settings", "--markdown"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == settings_table()
