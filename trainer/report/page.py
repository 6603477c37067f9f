"""`python -m trainer report RUN_DIR`: a training run as pictures.

Reads what `train` left in the run directory: metrics.json (config, best validation and test
metrics, training facts, the ESIM report), curve.json (the validation metrics and the running
training loss at every evaluation) and, with ESIM, esim/interests.json (typical users'
interests), esim/crowds.json (crowds' interests) and esim/vocabulary.json. Writes

* RUN_DIR/report.png: the validation curve with the selected step marked, the training loss
  and, with ESIM, the semantic interests found by how many users they cover;
* RUN_DIR/report.html: the same picture inline (a data URI) with the run's settings, the
  final metrics and the interests as tables. Self-contained: no script, no external URL, every
  text escaped (interest names come from an LLM).

A missing or malformed file is a DataError naming it (exit code 2 on the command line).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from trainer.data.loaders import DataError
from trainer.report.plot import render_png
from trainer.report.run_files import InterestSize, Named, Run, interest_sizes, load_run

HTML_NAME = "report.html"
PNG_NAME = "report.png"
# Rows of the per-user and per-crowd tables (an LLM budget can be large).
MAX_ROWS = 200


# --- the page -----------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(fmt(value), quote=True)


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):  # metrics and losses: 4 decimals (a learning rate: 1e-05)
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
          bold: int | None = None) -> str:
    """An HTML table, every cell escaped; row `bold` (an index) stands out."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        f"<tr{' class=best' if i == bold else ''}>"
        + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pairs(values: dict[str, Any]) -> str:
    return table(("", ""), values.items())


def summary(run: Run) -> dict[str, Any]:
    m, t = run.metrics, run.train
    data, cfg = m.get("dataset", {}), m.get("config", {})
    return {
        "data": f"{data.get('name')} ({data.get('source')}): {data.get('users')} users, "
                f"{data.get('items')} items, {data.get('interactions')} interactions; "
                f"train/valid/test users {data.get('train_users')}/{data.get('valid_users')}/"
                f"{data.get('test_users')}",
        "backbone": m.get("backbone"), "interests (K)": m.get("interests"),
        "dim": cfg.get("dim"), "maxlen": cfg.get("maxlen"),
        "softmax": t.get("loss"), "interest loss": cfg.get("interest_loss"),
        "lr / batch": f"{plain(cfg.get('lr'))} / {cfg.get('batch_size')}",
        "seed / split seed": f"{m.get('seed')} / {data.get('split_seed')}",
        "steps (epochs)": f"{t.get('steps')} ({t.get('epochs')})",
        "stopped by": t.get("stopped_by"),
        "selection metric": run.selection,
        "selected step": t["best_step"],
        "ESIM": (f"{run.esim.get('source')}, level {run.esim.get('level')}"
                 if run.esim else "off"),
        "seconds": plain(t.get("seconds")), "peak RSS (MB)": plain(t.get("peak_rss_mb")),
        **({"bundle": m["bundle"]} if m.get("bundle") else {}),
    }


def plain(value: Any) -> Any:
    """A setting as it was given (0.005, not 0.0050)."""
    return f"{value:g}" if isinstance(value, float) else value


def metrics_table(run: Run) -> str:
    columns = [("valid (selected step)", run.metrics["valid"]),
               ("test", run.metrics["test"]),
               ("MostPop (test)", run.metrics.get("mostpop") or {})]
    names = list(dict.fromkeys(k for _, values in columns for k in values))
    return table(["metric", *(c for c, _ in columns)],
                 [[n, *(values.get(n) for _, values in columns)] for n in names])


def distinctness_section(run: Run) -> str:
    """The K interests: distinct, or copies of one? (trainer/training/interests.py)."""
    measures = run.metrics.get("distinctness")
    if not measures:
        return ""
    return ("<h2>Interests (test users)</h2><p>Mean pairwise cosine of a user's interests (1: "
            "copies), effective interests (1 to K), the share of distinct items in the K "
            "per-interest top-50 lists, head overlap, the interests the merged top-20 is "
            "drawn from, category coverage, intra-list diversity and (one category per item) "
            "purity, and Recall@50 on test items outside / inside the user's dominant "
            "(model-free) item cluster.</p>"
            + table(["measure", "value"], [[k, v] for k, v in measures.items()]))


def curve_table(run: Run) -> str:
    keys = list(dict.fromkeys(k for p in run.curve for k in p))
    best = next((i for i, p in enumerate(run.curve) if p["step"] == run.train["best_step"]),
                None)
    return table(keys, [[p.get(k) for k in keys] for p in run.curve], bold=best)


def interest_list(interests: Sequence[Named]) -> str:
    return "; ".join(f"{i.name} ({count(len(i.items), 'item')}"
                     + (f", {count(i.members, 'member')}" if i.members is not None else "")
                     + ")" for i in interests)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def capped(rows: list[Sequence[Any]], source: str) -> tuple[list[Sequence[Any]], str]:
    if len(rows) <= MAX_ROWS:
        return rows, ""
    return rows[:MAX_ROWS], f"<p>{len(rows) - MAX_ROWS} more rows in {esc(source)}.</p>"


def esim_section(run: Run, sizes: Sequence[InterestSize]) -> str:
    esim = run.esim or {}
    llm = esim.get("llm") or {}
    facts = {
        "labeller": f"{esim.get('source')} ({esim.get('backend')})",
        "level": esim.get("level"), "started at step": esim.get("start_step"),
        f"valid {run.selection} at the end of the warm-up":
            (esim.get("warmup_valid") or {}).get(run.selection),
        "typical users (labelled)": f"{esim.get('typical_users')} "
                                    f"({esim.get('labelled_users')})",
        "crowds (labelled)": (f"{esim['crowd'].get('crowds')} "
                              f"({esim['crowd'].get('labelled_crowds')})"
                              if esim.get("crowd") else None),
        "supervised users": esim.get("supervised_users"),
        "semantic interests": esim.get("semantic_interests"),
        "vocabulary labels": esim.get("vocabulary"),
        "labeller calls / cached / repaired / failed":
            " / ".join(fmt(llm.get(k)) for k in ("calls", "cached", "repaired", "failed")),
    }
    parts = ["<h2>ESIM: semantic interests</h2>", pairs(facts)]
    if sizes:
        parts += ["<h3>Interests by name</h3>",
                  "<p>Users covered: typical users it was named for plus crowd members that "
                  "inherit it (a member inherits a crowd interest holding one of its recent "
                  "items).</p>",
                  table(["name", "description", "users covered", "typical users",
                         *(("crowds", "crowd members") if run.crowds else ()),
                         "distinct items"],
                        [[s.name, s.description, s.covered, s.users,
                          *((s.crowds, s.members) if run.crowds else ()), len(s.items)]
                         for s in sizes])]
    if run.vocabulary:
        rows = []
        for label, texts in sorted(run.vocabulary.items(), key=lambda kv: -len(kv[1])):
            counts: dict[str, int] = {}
            for text in texts:  # a vocabulary entry is "name: description"
                name = text.partition(": ")[0]
                counts[name] = counts.get(name, 0) + 1
            rows.append([label, len(texts), ", ".join(f"{n} ×{c}" for n, c in
                                                      sorted(counts.items(),
                                                             key=lambda kv: -kv[1]))])
        parts += ["<h3>Vocabulary (labels of L_pred)</h3>",
                  table(["label", "semantic interests", "names"], rows)]
    if run.users:
        rows, more = capped([[u.who, u.prompt_items, len(u.interests),
                              interest_list(u.interests)] for u in run.users],
                            "esim/interests.json")
        parts += ["<h3>Labelled typical users</h3>",
                  table(["user", "items shown", "interests", "interests (items)"], rows), more]
    if run.crowds:
        rows, more = capped([[c.who, c.members, c.supervised, c.prompt_items, c.before_merge,
                              len(c.interests), interest_list(c.interests)]
                             for c in run.crowds], "esim/crowds.json")
        parts += ["<h3>Crowds</h3>",
                  table(["crowd", "members", "supervised", "items shown",
                         "interests before merge", "after", "interests (items, members)"],
                        rows), more]
    return "\n".join(parts)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr.best td { font-weight: bold; background: #fff3d6; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def render_html(run: Run, sizes: Sequence[InterestSize], png: bytes) -> str:
    best = run.metrics["valid"].get(run.selection)
    title = f"Training report: {run.path.resolve().name}"
    body = [
        f"<h1>{esc(title)}</h1>",
        f"<p>Run directory <code>{esc(run.path)}</code>.</p>",
        "<h2>Run</h2>", pairs(summary(run)),
        "<h2>Curves</h2>",
        f"<p>Selected (best) step <b>{esc(run.train['best_step'])}</b>: valid "
        f"{esc(run.selection)} = <b>{esc(best)}</b>; stopped by {esc(run.train.get('stopped_by'))}"
        f" after {esc(run.train.get('steps'))} steps. The loss is the smoothed training loss the "
        "progress bar shows (exponential average; ESIM's weighted losses included once ESIM "
        "starts).</p>",
        f'<img alt="validation curve and training loss" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">',
        "<details><summary>Every evaluation (curve.json)</summary>", curve_table(run),
        "</details>",
        "<h2>Final metrics</h2>", metrics_table(run),
        distinctness_section(run),
    ]
    if run.esim:
        body.append(esim_section(run, sizes))
    config = run.metrics.get("config") or {}
    body += ["<h2>Configuration</h2>", pairs({k: plain(v) for k, v in config.items()})]
    return ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# --- the command --------------------------------------------------------------------------------


def write_report(run_dir: Path) -> dict[str, str]:
    """Write RUN_DIR/report.png and RUN_DIR/report.html; returns their paths."""
    run = load_run(run_dir)
    sizes = interest_sizes(run)
    png = render_png(run, sizes)
    page = render_html(run, sizes, png)
    paths = {"html": run_dir / HTML_NAME, "png": run_dir / PNG_NAME}
    try:
        paths["png"].write_bytes(png)
        paths["html"].write_text(page, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{run_dir}: cannot write the report ({exc})") from exc
    return {key: str(path) for key, path in paths.items()}
