"""The training report's picture: the validation curve with the selected step, the training
loss and, with ESIM, the semantic interests by users covered (one PNG, matplotlib, no pyplot)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from trainer.report.run_files import InterestSize, Run

# Bars in the interests panel of the PNG (the HTML table lists them all).
MAX_BARS = 20
# Plot labels are cut to this many characters (the title to twice as many).
LABEL_CHARS = 40


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
