"""The trainer's command line, run as a user runs it (a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import TrainConfig
from trainer.data.synthetic import make_synthetic

SYNTH = "users=200,items=150,topics=10,min_len=10,max_len=20"


def run(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run("train", "--dataset", "synthetic", "--synthetic", SYNTH, "--epochs", "2",
               "--eval-every", "5", "--dim", "16", "--no-progress", "--run-dir", str(out),
               "--out", str(out / "models"), cwd=out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_prints_test_and_mostpop_metrics_as_last_line(trained):
    out, proc = trained
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("test", "mostpop", "valid"):
        assert set(report[key]) >= {"recall@20", "recall@50", "ndcg@20", "ndcg@50",
                                    "hitrate@20", "hitrate@50"}
    assert report["backbone"] == TrainConfig().backbone and report["interests"] == 4
    assert json.loads((out / "metrics.json").read_text())["test"] == report["test"]
    assert (out / "checkpoint.pt").is_file()


def test_evaluate_reproduces_the_test_metrics(trained):
    out, proc = trained
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    again = run("evaluate", str(out / "checkpoint.pt"), cwd=out)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["test"] == report["test"]


def test_train_on_a_users_own_csv(tmp_path):
    raw = make_synthetic(n_users=150, n_items=100, n_topics=5, min_len=10, max_len=15)
    raw.interactions.to_csv(tmp_path / "events.csv", index=False)
    raw.items.to_csv(tmp_path / "items.csv", index=False)
    proc = run("train", "--data", "events.csv", "--items", "items.csv", "--epochs", "1",
               "--backbone", "mind", "--interests", "2", "--dim", "8", "--no-progress",
               "--run-dir", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["dataset"]["name"] == "events" and report["backbone"] == "mind"


def test_declared_item_fields_reach_the_bundle_and_filter_its_answers(tmp_path):
    raw = make_synthetic(n_users=150, n_items=100, n_topics=5, min_len=10, max_len=15)
    items = raw.items.copy()
    # Every third item has two brands, every fifth none; "007" must stay a label, not 7.
    items["brand"] = [("" if i % 5 == 0 else f"b{i % 4}|007" if i % 3 == 0 else f"b{i % 4}")
                      for i in range(len(items))]
    raw.interactions.to_csv(tmp_path / "events.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    proc = run("train", "--data", "events.csv", "--items", "items.csv", "--item-fields",
               "brand", "--epochs", "1", "--dim", "8", "--no-progress", "--run-dir", "run",
               "--out", "models", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    from service.bundle.load import load_bundle
    from service.serving.filters import ItemFilter
    from service.serving.recommender import Recommender

    bundle = load_bundle(tmp_path / "models" / "recommender" / "1")
    expected: dict[str, set[str]] = {}
    for item_id, brands in zip(items["item_id"], items["brand"], strict=True):
        for brand in filter(None, brands.split("|")):
            expected.setdefault(brand, set()).add(item_id)
    served = set(bundle.item_ids)
    got = {value: {str(bundle.item_ids[r]) for r in rows}
           for value, rows in bundle.fields["brand"].items()}
    assert got == {b: ids & served for b, ids in expected.items() if ids & served}
    assert "007" in got and {"category", "year", "brand"} <= set(bundle.fields)

    model = Recommender(bundle)
    allowed, gone = model.restrict(ItemFilter(include={"brand": ["007"]}))
    answer = model.recommend([str(bundle.item_ids[0])], 10, [], 50, allowed=allowed,
                             unavailable=gone)
    assert answer.item_ids and set(answer.item_ids) <= got["007"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--item-fields", "colour"], "items.csv: missing column(s) colour"),
    (["--item-fields", "category"], "'category' is reserved"),
    (["--item-fields", "a b"], "bad field name 'a b'"),
])
def test_bad_item_fields_are_named(tmp_path, flags, message):
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp\nu,a,1\nu,b,2\n")
    (tmp_path / "items.csv").write_text("item_id,title\na,A\nb,B\n")
    proc = run("train", "--data", "events.csv", "--items", "items.csv", *flags,
               "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_file_fails_with_the_file_and_line(tmp_path):
    (tmp_path / "bad.csv").write_text("user_id,item_id,timestamp\nu,a,1\nu,b,soon\n")
    proc = run("train", "--data", "bad.csv", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    assert "bad.csv: line 3: bad timestamp 'soon'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_refuses_a_damaged_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = run("evaluate", "checkpoint.pt", cwd=tmp_path)
    assert proc.returncode == 2 and "checkpoint.pt: not a readable checkpoint" in proc.stderr


def test_train_publishes_a_bundle_that_evaluates_to_the_same_metrics(trained):
    out, proc = trained
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["bundle"] == str(out / "models" / "recommender" / "1")
    again = run("evaluate", "--bundle", report["bundle"], cwd=out)
    assert again.returncode == 0, again.stderr
    bundle_metrics = json.loads(again.stdout.strip().splitlines()[-1])["test"]
    for key, value in report["test"].items():
        assert abs(bundle_metrics[key] - value) <= 1e-3, key


def test_export_publishes_a_checkpoint_as_the_next_version(trained, tmp_path):
    out, _ = trained
    proc = run("export", str(out / "checkpoint.pt"), "--out", str(tmp_path / "store"),
               "--name", "mine", "--no-progress", cwd=out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["bundle"] == str(tmp_path / "store" / "mine" / "1")
    assert report["parity_max_abs_diff"] <= 1e-4 and report["index"]["kind"] == "flat"


def test_if_missing_skips_training_when_a_bundle_exists(trained):
    out, _ = trained
    proc = run("train", "--dataset", "synthetic", "--synthetic", SYNTH, "--out",
               str(out / "models"), "--if-missing", "--no-progress", cwd=out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"skipped": True, "bundle": str(out / "models" / "recommender" / "1")}


def test_default_run_dir_is_under_RUNS_DIR(tmp_path):
    proc = run("train", "--dataset", "synthetic", "--synthetic", SYNTH, "--epochs", "1",
               "--dim", "8", "--no-progress", cwd=tmp_path,
               env={"RUNS_DIR": str(tmp_path / "writable")})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = Path(report["run_dir"])
    assert run_dir.parent == tmp_path / "writable" and run_dir.name.startswith("synthetic-")
    assert (run_dir / "metrics.json").is_file() and (run_dir / "checkpoint.pt").is_file()
    assert not (tmp_path / "runs").exists()  # not the working directory
    # Fewer than 200 items: selected on Recall@(a tenth of the catalogue).
    assert report["train"]["selection_metric"] == f"recall@{report['dataset']['items'] // 10}"
    # The training-time line: wall seconds, steps, seconds per step, the best step, the load.
    train = report["train"]
    # (seconds is rounded to 0.01 s in the report, seconds_per_step is not)
    assert train["seconds_per_step"] == pytest.approx(train["seconds"] / train["steps"],
                                                      abs=0.01 / train["steps"] + 1e-4)
    assert train["steps_after_best"] == train["steps"] - train["best_step"] >= 0
    assert set(train["phase_seconds"]) >= {"forward_loss", "backward", "evaluate"}
    assert len(train["load_average"]["start"]) == 3


def test_run_dir_that_cannot_be_created_is_a_clear_cli_error(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    proc = run("train", "--dataset", "synthetic", "--synthetic", SYNTH, "--no-progress",
               cwd=tmp_path, env={"RUNS_DIR": str(tmp_path / "a-file")})
    assert proc.returncode == 2
    assert f"error: {tmp_path / 'a-file' / 'synthetic-'}" in proc.stderr
    assert "-seed0: cannot create the run directory (" in proc.stderr
    assert "set --run-dir or RUNS_DIR" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_runs_dir_is_a_clear_cli_error(tmp_path):
    (tmp_path / "app").mkdir(mode=0o555)  # like /app in the image: not the user's
    proc = run("train", "--dataset", "synthetic", "--synthetic", SYNTH, "--no-progress",
               cwd=tmp_path / "app")
    assert proc.returncode == 2
    assert "error: runs/synthetic-" in proc.stderr
    assert "-seed0: cannot create the run directory (" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nightly_every_must_be_positive_and_only_the_flag_loops(monkeypatch):
    from service.store.events import EVENT_GROUP
    from trainer.cli import build_parser

    monkeypatch.delenv("NIGHTLY_INTERVAL_SECONDS", raising=False)
    args = build_parser().parse_args(["nightly"])
    assert args.every is None and args.group == EVENT_GROUP  # run once, as before
    assert build_parser().parse_args(["nightly", "--every", "0.5"]).every == 0.5
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["nightly", "--every", bad])
        assert exc.value.code == 2
    # the compose file sets NIGHTLY_INTERVAL_SECONDS in the scheduler's container, where an
    # operator's `docker compose exec nightly python -m trainer nightly` must run once
    monkeypatch.setenv("NIGHTLY_INTERVAL_SECONDS", "86400")
    assert build_parser().parse_args(["nightly"]).every is None
    assert build_parser().parse_args(["nightly", "--every", "60"]).every == 60


def test_per_user_test_metrics_average_to_the_reported_ones(trained):
    out, proc = trained
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    per_user = json.loads((out / "per_user.json").read_text())
    assert len(per_user["users"]) == report["dataset"]["test_users"]
    for metric in ("recall@20", "recall@50", "ndcg@50"):
        assert len(per_user["model"][metric]) == len(per_user["users"])
        assert sum(per_user["model"][metric]) / len(per_user["users"]) == pytest.approx(
            report["test"][metric], abs=1e-5)
        assert sum(per_user["mostpop"][metric]) / len(per_user["users"]) == pytest.approx(
            report["mostpop"][metric], abs=1e-5)


def test_a_fold_run_tests_that_fold_and_a_sasrec_serves_with_one_interest(tmp_path):
    proc = run("train", "--dataset", "synthetic", "--synthetic", SYNTH, "--epochs", "1",
               "--eval-every", "5", "--dim", "16", "--no-progress", "--folds", "5", "--fold",
               "2", "--backbone", "sasrec", "--run-dir", str(tmp_path / "run"),
               "--out", str(tmp_path / "models"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["dataset"]["folds"] == 5 and report["dataset"]["fold"] == 2
    assert report["dataset"]["test_users"] == 40 and report["interests"] == 1  # 200 users / 5
    from service.bundle.load import load_bundle

    bundle = load_bundle(tmp_path / "models" / "recommender" / "1")  # checks and smoke test
    assert bundle.manifest.interests == 1 and bundle.manifest.config["fold"] == 2
    bad = run("train", "--dataset", "synthetic", "--synthetic", SYNTH, "--folds", "5",
              "--fold", "5", "--no-progress", "--run-dir", str(tmp_path / "bad"), cwd=tmp_path)
    assert bad.returncode == 2 and "fold 5 of 5" in bad.stderr


# --- the train flags, derived from TrainConfig ---------------------------------------------------

# The configuration flags `train` has always had (dest: the flag's name with underscores).
CONFIG_FLAGS = {
    "--backbone", "--interests", "--dim", "--maxlen", "--epochs", "--lr", "--batch-size",
    "--loss", "--interest-loss", "--item-text", "--eval-every", "--patience", "--max-minutes",
    "--seed", "--split-seed", "--folds", "--fold", "--threads", "--esim", "--llm",
    "--llm-budget", "--esim-warmup-epochs", "--esim-clusters", "--esim-users-per-cluster",
    "--esim-labels", "--esim-alpha", "--esim-beta", "--esim-tau", "--esim-matching",
    "--esim-level", "--esim-crowds", "--esim-crowd-items", "--esim-merge-threshold",
    "--esim-batch-users",
    "--score-positions",  # issue 21 (a training-speed candidate, off by default)
    "--lr-schedule",  # issue 21 (a training-speed candidate, constant by default)
    "--argmax-weight",  # issue 22 (an interest-distinctness candidate, 0 by default)
    "--score-dtype",  # issue 21 (auto by default: bfloat16 where the CPU has it)
    "--target-horizon",  # issue 22 (a candidate; 1, next-item training, by default)
    "--min-item-count", "--train-events",  # issue 23: sparse regimes (1 and all by default)
    "--comirec-protocol",  # issue 34: the old default (ComiRec's filter, no item text)
    "--shuffle-item-text",  # issue 23: the shuffled-label control of --item-text
    "--text-only-items", "--text-only-length",  # issue 23: new items placed by their text
    # issue 23: ESIM on the item side (0, off, by default) and its two controls
    "--esim-item-weight", "--esim-shuffle-labels", "--esim-shuffle-items",
}
OTHER_TRAIN_FLAGS = {
    "-h", "--help", "--dataset", "--data", "--items", "--item-fields", "--format", "--synthetic",
    "--run-dir",
    "--no-item-text", "--no-text-only-items",  # issue 34: both on by default
    "--llm-base-url", "--llm-model", "--llm-cache", "--out", "--name", "--index",
    "--if-missing", "--no-progress",
}
NOT_ON_CLI_FIELDS = {"negatives_per_example", "min_user_count", "esim_batch_items"}


def train_subparser():
    import argparse

    from trainer.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_train_flags_are_the_config_fields_with_their_defaults():
    from trainer.cli import build_parser, config_flags

    assert set(config_flags().values()) == CONFIG_FLAGS
    options = {o for action in train_subparser()._actions for o in action.option_strings}
    assert options == CONFIG_FLAGS | OTHER_TRAIN_FLAGS
    args = vars(build_parser().parse_args(["train"]))
    cfg = TrainConfig()
    for name, flag in config_flags().items():
        assert args[flag[2:].replace("-", "_")] == getattr(cfg, name), flag
    # the two flags not named after their field keep their dest names
    assert args["epochs"] == cfg.max_epochs and args["llm_budget"] is None


def test_the_catalogue_is_the_default_and_the_comirec_protocol_one_flag_away():
    from trainer.cli import build_parser, config_from_args

    default = config_from_args(build_parser().parse_args(["train"]))
    assert (default.min_item_count, default.item_text, default.text_only_items) == (1, True, True)
    old = config_from_args(build_parser().parse_args(["train", "--comirec-protocol"]))
    assert (old.min_item_count, old.item_text, old.text_only_items) == (5, False, False)
    assert TrainConfig.from_dict(old.to_dict()) == old  # a stored config reads back the same
    off = config_from_args(build_parser().parse_args(["train", "--no-item-text"]))
    assert (off.min_item_count, off.item_text, off.text_only_items) == (1, False, True)
    # without item text in the data, the text settings are off in what the run stores
    assert default.for_data(has_item_text=False).item_text is False
    assert default.for_data(has_item_text=False).text_only_items is False
    assert default.for_data(has_item_text=True) == default
    with pytest.raises(ValueError, match="min_item_count"):
        TrainConfig(min_item_count=0)


def test_every_config_field_has_a_flag_or_is_marked_off_the_cli():
    from dataclasses import fields

    from trainer.cli import config_flag, config_flags
    from trainer.config import HELP, NOT_ON_CLI

    for f in fields(TrainConfig):
        assert f.metadata.get(HELP), f"TrainConfig.{f.name}: no help text"
        assert (config_flag(f) is None) == bool(f.metadata.get(NOT_ON_CLI)), f.name
    assert {f.name for f in fields(TrainConfig) if f.metadata.get(NOT_ON_CLI)} == \
        NOT_ON_CLI_FIELDS
    assert set(config_flags()) | NOT_ON_CLI_FIELDS == {f.name for f in fields(TrainConfig)}


def test_parsed_train_flags_build_the_config():
    from trainer.cli import build_parser, config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["train"])) == TrainConfig()
    cfg = config_from_args(parse([
        "train", "--epochs", "3", "--llm-budget", "5", "--esim", "--item-text", "--backbone",
        "mind", "--esim-level", "dual", "--lr", "0.01", "--max-minutes", "1.5",
        "--batch-size", "32", "--llm", "metadata", "--esim-merge-threshold", "0.5"]))
    assert cfg == TrainConfig(max_epochs=3, esim_llm_budget=5, esim=True, item_text=True,
                              backbone="mind", esim_level="dual", lr=0.01, max_minutes=1.5,
                              batch_size=32, llm="metadata", esim_merge_threshold=0.5)
    for bad in (["--backbone", "nope"], ["--epochs", "x"], ["--esim-alpha", "a"]):
        with pytest.raises(SystemExit) as exc:
            parse(["train", *bad])
        assert exc.value.code == 2


# --- the nightly job's settings ------------------------------------------------------------------

NIGHTLY_ENV = ("REDIS_URL", "EVENT_STREAM", "EVENT_STREAM_SHARDS", "DATA_DIR", "MODELS_DIR",
               "MODEL_NAME")


def test_nightly_defaults_come_from_the_service_settings_names(monkeypatch, tmp_path):
    from service.bundle.format import DEFAULT_MODEL_NAME
    from service.store.keys import EVENT_STREAM
    from trainer.jobs.nightly.options import NightlySettings

    for name in NIGHTLY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MODELS_DIR=from-dotenv\n")  # the service's only
    s = NightlySettings()
    assert (s.redis_url, s.event_stream, s.data_dir, s.models_dir, s.model_name) == (
        "redis://127.0.0.1:6379/0", EVENT_STREAM, Path("data"), Path("models"),
        DEFAULT_MODEL_NAME)
    env = {"REDIS_URL": "redis://r:1/2", "EVENT_STREAM": "ev", "DATA_DIR": "/d",
           "MODELS_DIR": "/m", "MODEL_NAME": "mine", "EVENT_STREAM_SHARDS": "4"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    opts = NightlySettings().options(group="g")
    assert (opts.redis_url, opts.stream, opts.data_dir, opts.models_dir, opts.name,
            opts.group) == ("redis://r:1/2", "ev", Path("/d"), Path("/m"), "mine", "g")
    assert opts.shards is None  # the job reads every shard count the service recorded


def test_nightly_flags_win_over_the_environment(monkeypatch, tmp_path):
    import trainer.cli as cli

    for name in NIGHTLY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODEL_NAME", "env-name")
    monkeypatch.setenv("DATA_DIR", "env-data")
    seen = []
    monkeypatch.setattr(cli, "run_nightly", lambda opts: seen.append(opts) or {})
    assert cli.main(["nightly", "--name", "flag-name", "--models", "m", "--tolerance",
                     "0.1", "--epochs", "2", "--no-progress"]) == 0
    (opts,) = seen
    assert (opts.name, opts.models_dir, opts.data_dir, opts.redis_url) == (
        "flag-name", Path("m"), Path("env-data"), "redis://127.0.0.1:6379/0")
    assert opts.tolerance == 0.1 and opts.train_overrides == {"max_epochs": 2}
    assert opts.progress is False
    # invalid settings are a usage error, as a bad flag is
    monkeypatch.setenv("EVENT_STREAM_SHARDS", "0")
    assert cli.main(["nightly"]) == 2
