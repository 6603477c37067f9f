"""`python -m trainer report RUN_DIR`: the pictures of a real (tiny) run, with and without
ESIM, and clear errors for what is not a run."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from trainer.cli import main as cli_main

TINY = ["train", "--dataset", "synthetic", "--synthetic",
        "users=300,items=200,topics=10,min_len=10,max_len=20", "--epochs", "2",
        "--batch-size", "32", "--eval-every", "3", "--dim", "16", "--threads", "1",
        "--no-progress"]
# The oracle labeller names the planted topics at both levels (no LLM, MiniLM only); a
# vocabulary of 6 labels for the ~28 semantic interests of so tiny a run.
ESIM = ["--esim", "--llm", "oracle", "--esim-level", "dual", "--esim-warmup-epochs", "0.5",
        "--esim-clusters", "2", "--esim-users-per-cluster", "2", "--esim-crowds", "3",
        "--esim-crowd-items", "15", "--esim-batch-users", "16", "--esim-labels", "6"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train(run: Path, *extra: str) -> Path:
    assert cli_main([*TINY, "--run-dir", str(run), *extra]) == 0
    return run


@pytest.fixture(scope="module")
def esim_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("esim") / "run", *ESIM)


def report(run: Path, capsys) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = cli_main(["report", str(run)])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]) if code == 0 else None, err


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def external_links(page: str) -> list[str]:
    """Every src/href value that is not inline data (http(s) ones, relative files)."""
    values = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.I)
    return [v for v in values if not v.startswith("data:")]


def test_report_draws_the_curves_metrics_and_interests(esim_run, capsys):
    code, paths, err = report(esim_run, capsys)
    assert code == 0, err
    assert paths == {"html": str(esim_run / "report.html"), "png": str(esim_run / "report.png")}
    png = (esim_run / "report.png").read_bytes()
    width, height = png_size(png)
    assert width >= 600 and height >= 800  # three panels: validation, loss, interests
    page = (esim_run / "report.html").read_text()

    metrics = json.loads((esim_run / "metrics.json").read_text())
    train = metrics["train"]
    assert f"Selected (best) step <b>{train['best_step']}</b>" in page
    assert f"<td>selected step</td><td>{train['best_step']}</td>" in page
    selection = train["selection_metric"]
    assert f"{metrics['valid'][selection]:.4f}" in page
    for split in ("valid", "test", "mostpop"):
        for value in metrics[split].values():
            assert f"<td>{value:.4f}</td>" in page
    assert "<h2>Interests (test users)</h2>" in page
    distinct = metrics["distinctness"]
    assert 0 < distinct["effective_interests"] <= metrics["interests"]
    assert all(f"<td>{name}</td><td>{value:.4f}</td>" in page
               for name, value in distinct.items())
    curve = json.loads((esim_run / "curve.json").read_text())
    assert curve and all(f"<td>{p['step']}</td><td>{p['loss']:.4f}</td>" in page for p in curve)

    # Every interest name the labeller gave, and the sizes recorded for crowd interests.
    users = json.loads((esim_run / "esim" / "interests.json").read_text())
    crowds = json.loads((esim_run / "esim" / "crowds.json").read_text())
    names = {i["name"] for entry in [*users, *crowds] for i in entry.get("interests", [])}
    assert names and all(f"<td>{name}</td>" in page for name in names)
    assert all(i["members"] >= 1 for c in crowds for i in c.get("interests", []))
    assert all(f"<td>{u['user_id']}</td>" in page for u in users)
    assert "<h2>ESIM: semantic interests</h2>" in page

    # Self-contained: the one image is the PNG itself, inline; no script, no external URL.
    assert external_links(page) == []
    assert "http://" not in page and "https://" not in page and "<script" not in page
    inline = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(inline) == 1 and base64.b64decode(inline[0]) == png


def test_report_of_a_run_without_esim(tmp_path, capsys):
    run = train(tmp_path / "plain")
    code, paths, err = report(run, capsys)
    assert code == 0, err
    width, height = png_size(Path(paths["png"]).read_bytes())
    assert width >= 600 and 0 < height < 800  # two panels
    page = Path(paths["html"]).read_text()
    assert "ESIM: semantic interests" not in page and "<td>ESIM</td><td>off</td>" in page
    assert external_links(page) == []


def test_interest_names_are_escaped(esim_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(esim_run, run)
    path = run / "esim" / "interests.json"
    users = json.loads(path.read_text())
    evil = '<script>alert("x")</script> & $5 films'  # $: not mathtext in the PNG either
    users[0]["interests"][0]["name"] = evil
    path.write_text(json.dumps(users))
    code, _, err = report(run, capsys)
    assert code == 0, err
    page = (run / "report.html").read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; $5 films" in page
    png_size((run / "report.png").read_bytes())


def test_a_directory_without_a_run_is_a_clear_cli_error(tmp_path, capsys):
    code, _, err = report(tmp_path, capsys)
    assert code == 2 and f"error: {tmp_path / 'metrics.json'}: not found" in err
    assert "Traceback" not in err
    code, _, err = report(tmp_path / "missing", capsys)
    assert code == 2 and f"error: {tmp_path / 'missing'}: not a run directory" in err


@pytest.mark.parametrize(("name", "text"), [
    ("metrics.json", "{not json"),
    ("metrics.json", '{"valid": {}}'),
    ("curve.json", '{"step": 1}'),
    ("esim/interests.json", '["not a user"]'),
])
def test_a_damaged_run_file_is_named(esim_run, tmp_path, capsys, name, text):
    run = tmp_path / "run"
    shutil.copytree(esim_run, run)
    (run / name).write_text(text)
    code, _, err = report(run, capsys)
    assert code == 2 and f"error: {run / name}: " in err and "Traceback" not in err
