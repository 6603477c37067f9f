"""The trainer's command line, run as a user runs it (a subprocess)."""

import json
import subprocess
import sys

import pytest

from trainer.synthetic import make_synthetic

SYNTH = "users=200,items=150,topics=10,min_len=10,max_len=20"


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


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
    assert report["backbone"] == "comirec-sa" and report["interests"] == 4
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
