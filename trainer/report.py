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
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from trainer.data import DataError

HTML_NAME = "report.html"
PNG_NAME = "report.png"
# Bars in the interests panel of the PNG (the HTML table lists them all).
MAX_BARS = 20
# Rows of the per-user and per-crowd tables (an LLM budget can be large).
MAX_ROWS = 200
# Plot labels are cut to this many characters (the title to twice as many).
LABEL_CHARS = 40


# --- reading the run ----------------------------------------------------------------------------


@dataclass
class Named:
    """One interest the labeller named for one typical user or crowd."""

    name: str
    description: str
    items: list[str]  # the prompt lines (title, year, categories) it was given
    members: int | None = None  # crowd members that inherit it (crowd level only)


@dataclass
class Labelled:
    """A typical user, or a crowd's synthesized user, and what the labeller said."""

    who: str
    prompt_items: int
    interests: list[Named]
    members: int | None = None  # crowd only: members, supervised members, before merging
    supervised: int | None = None
    before_merge: int | None = None


@dataclass
class InterestSize:
    """An interest name over the whole run: whom and what it covers."""

    name: str
    description: str
    users: int = 0  # typical users it was named for
    crowds: int = 0  # crowds it was named for
    members: int = 0  # crowd members that inherit it
    items: set[str] = field(default_factory=set)  # distinct items given to it

    @property
    def covered(self) -> int:
        return self.users + self.members


@dataclass
class Run:
    path: Path
    metrics: dict[str, Any]
    curve: list[dict[str, Any]]
    users: list[Labelled] = field(default_factory=list)
    crowds: list[Labelled] = field(default_factory=list)
    vocabulary: dict[str, list[str]] = field(default_factory=dict)

    @property
    def train(self) -> dict[str, Any]:
        return self.metrics["train"]

    @property
    def selection(self) -> str:
        return self.train.get("selection_metric", "recall@50")  # runs before it was recorded

    @property
    def esim(self) -> dict[str, Any] | None:
        return self.metrics.get("esim")


def read_json(path: Path, required: bool = True) -> Any:
    if not path.is_file():
        if required:
            raise DataError(f"{path}: not found (is {path.parent} a finished training run?)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from exc


def check(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise DataError(f"{path}: {what}")


def named(raw: dict[str, Any], lines: Sequence[str]) -> Named:
    # Item numbers are 1-based positions in the prompt's list.
    return Named(name=str(raw["name"]).strip(), description=str(raw.get("description", "")),
                 items=[str(lines[n - 1]) for n in raw.get("items", []) if 0 < n <= len(lines)],
                 members=raw.get("members"))


def load_run(run_dir: Path) -> Run:
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: not a run directory")
    path = run_dir / "metrics.json"
    metrics = read_json(path)
    check(isinstance(metrics, dict), path, "not a training report (expected a JSON object)")
    for key in ("train", "valid", "test"):
        check(isinstance(metrics.get(key), dict), path, f"no {key!r} object (not a training "
              "report of `python -m trainer train`)")
    check(isinstance(metrics["train"].get("best_step"), int), path, "no train.best_step")
    check(isinstance(metrics.get("esim"), dict | None), path, "'esim' is not an object")
    path = run_dir / "curve.json"
    curve = read_json(path)
    check(isinstance(curve, list) and all(isinstance(p, dict) and isinstance(p.get("step"), int)
                                          for p in curve),
          path, "not a validation curve (expected a list of objects with a step)")
    run = Run(run_dir, metrics, curve)
    if run.esim is None:  # esim/ files left by an earlier run in this directory are not its
        return run

    esim_dir = run_dir / "esim"
    path = esim_dir / "interests.json"
    raw = read_json(path, required=False)
    try:  # the ESIM files are the trainer's own; a KeyError means a damaged or foreign file
        run.users = [Labelled(who=str(u["user_id"]), prompt_items=len(u["items"]),
                              interests=[named(i, u["items"]) for i in u["interests"]])
                     for u in raw or []]
        path = esim_dir / "crowds.json"
        raw = read_json(path, required=False)
        run.crowds = [Labelled(who=f"crowd {c['crowd']}", prompt_items=c["synthesized_items"],
                               interests=[named(i, c.get("items", []))
                                          for i in c.get("interests", [])],
                               members=c["members"], supervised=c["supervised_members"],
                               before_merge=c["interests_before_merge"])
                      for c in raw or []]
        path = esim_dir / "vocabulary.json"
        raw = read_json(path, required=False)
        run.vocabulary = {str(label): [str(t) for t in texts]
                          for label, texts in (raw or {}).items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: unexpected content ({type(exc).__name__}: {exc})") from exc
    return run


def interest_sizes(run: Run) -> list[InterestSize]:
    """Every interest name with the users, crowd members and distinct items it covers, the
    widest first."""
    sizes: dict[str, InterestSize] = {}
    for labelled in [*run.users, *run.crowds]:
        for interest in labelled.interests:
            size = sizes.setdefault(interest.name, InterestSize(interest.name,
                                                                interest.description))
            if labelled.members is None:
                size.users += 1
            else:
                size.crowds += 1
                size.members += interest.members or 0  # older runs did not record it
            size.items.update(interest.items)
    return sorted(sizes.values(), key=lambda s: (-s.covered, -len(s.items), s.name))


# --- the picture --------------------------------------------------------------------------------


def plot_label(text: str, chars: int = LABEL_CHARS) -> str:
    text = text if len(text) <= chars else text[: chars - 1] + "…"
    return text.replace("$", r"\$")  # a lone $ would start matplotlib's mathtext


def curve_metrics(run: Run) -> list[str]:
    """The selection metric first, then its cut-off's NDCG and hit rate, and Recall@50."""
    cutoff = run.selection.partition("@")[2]
    wanted = [run.selection, f"ndcg@{cutoff}", f"hitrate@{cutoff}", "recall@50"]
    present = {key for point in run.curve for key in point}
    return [m for m in dict.fromkeys(wanted) if m in present]


def mark_steps(ax: Any, run: Run) -> None:
    """The selected step (and where ESIM started) as vertical lines."""
    ax.axvline(run.train["best_step"], color="tab:red", linestyle="--", linewidth=1,
               label=f"selected step {run.train['best_step']}")
    if run.esim and run.esim.get("start_step") is not None:
        ax.axvline(run.esim["start_step"], color="tab:purple", linestyle=":", linewidth=1.2,
                   label=f"ESIM starts (step {run.esim['start_step']})")


def below(ax: Any, handles: list[Any], labels: list[str]) -> None:
    # Under the axes, not over the curves (constrained layout makes room for it).
    ax.legend(handles, labels, fontsize=8, ncol=3, loc="upper center",
              bbox_to_anchor=(0.5, -0.2), frameon=False)


def plot_validation(ax: Any, run: Run) -> None:
    steps = [p["step"] for p in run.curve]
    for metric in curve_metrics(run):
        points = [(p["step"], p[metric]) for p in run.curve if metric in p]
        ax.plot([s for s, _ in points], [v for _, v in points], marker=".",
                linewidth=2.2 if metric == run.selection else 1.2, label=f"valid {metric}")
    best = run.metrics["valid"].get(run.selection)
    if best is not None:  # the final evaluation may be the best and is not in the curve
        ax.plot([run.train["best_step"]], [best], marker="*", markersize=14, color="tab:red",
                linestyle="none", label=f"selected: {run.selection} = {best:.4f}")
    warm = (run.esim or {}).get("warmup_valid") or {}
    if run.selection in warm:
        ax.plot([run.esim["start_step"]], [warm[run.selection]], marker="D", color="tab:purple",
                linestyle="none", label=f"end of warm-up: {warm[run.selection]:.4f}")
    mark_steps(ax, run)
    if not steps:
        ax.text(0.5, 0.5, "no evaluation during training (fewer steps than --eval-every)",
                transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_title("Validation")
    ax.set_xlabel("step")
    ax.set_ylabel("metric")
    ax.grid(alpha=0.3)
    below(ax, *ax.get_legend_handles_labels())


def plot_loss(ax: Any, run: Run) -> None:
    points = [(p["step"], p["loss"]) for p in run.curve if p.get("loss") is not None]
    ax.plot([s for s, _ in points], [v for _, v in points], marker=".", color="tab:blue",
            label=f"training loss ({run.train.get('loss', '?')} softmax"
                  f"{' + ESIM' if run.esim else ''}, smoothed)")
    mark_steps(ax, run)
    handles, labels = ax.get_legend_handles_labels()
    parts = sorted({k for p in run.curve for k in p if k.startswith("esim_")})
    if parts:  # the ESIM losses, unweighted, have their own scale
        right = ax.twinx()
        for key, style in zip(parts, ("--", "-.", ":"), strict=False):
            pts = [(p["step"], p[key]) for p in run.curve if key in p]
            right.plot([s for s, _ in pts], [v for _, v in pts], linestyle=style, marker=".",
                       label=f"ESIM L_{key.removeprefix('esim_')} (right axis)")
        right.set_ylabel("ESIM loss")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.set_title("Training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    below(ax, handles, labels)


def plot_interests(ax: Any, sizes: Sequence[InterestSize]) -> None:
    shown = list(sizes[:MAX_BARS])[::-1]  # the widest on top
    rows = range(len(shown))
    users = [s.users for s in shown]
    ax.barh(rows, users, color="tab:green", label="typical users it was named for")
    if any(s.members for s in shown):
        ax.barh(rows, [s.members for s in shown], left=users, color="tab:olive",
                label="crowd members that inherit it")
    ax.set_yticks(list(rows), [plot_label(s.name) for s in shown], fontsize=8)
    more = f" (the {MAX_BARS} widest of {len(sizes)})" if len(sizes) > MAX_BARS else ""
    ax.set_title(f"ESIM: semantic interests by users covered{more}")
    ax.set_xlabel("users")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def render_png(run: Run, sizes: Sequence[InterestSize]) -> bytes:
    # A bare Figure (no pyplot): no global state, no display, Agg when saved.
    heights = [3.6, 3.0] + ([1.2 + 0.28 * min(len(sizes), MAX_BARS)] if sizes else [])
    fig = Figure(figsize=(10, sum(heights) + 0.6), layout="constrained")
    axes = fig.subplots(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    fig.suptitle(plot_label(f"{run.metrics.get('backbone', '?')} on "
                            f"{run.metrics.get('dataset', {}).get('name', '?')}",
                            2 * LABEL_CHARS))
    plot_validation(axes[0], run)
    plot_loss(axes[1], run)
    if sizes:
        plot_interests(axes[2], sizes)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()


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
