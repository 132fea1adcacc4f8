"""The grouped bar chart of ``regionspot-summarize`` (``<name>.png``): one panel per task, a note
inside a panel with nothing to show, the protocol and notes in a caption."""

import io
import textwrap
from typing import Optional, Sequence

from regionspot.tools.summary.report import DEFAULT_TITLE, cell, footer_lines, has_segm
from regionspot.tools.summary.rows import METRICS, MISSING, TASKS, Row


def panel_note(rows: Sequence[Row], task: str) -> Optional[str]:
    """The text drawn inside the ``task`` panel of the chart when its bars show nothing: "not
    available" (and why: e.g. mask AP skipped on a dataset without mask annotations) when no
    row has a value, "every value is 0.0" when all values are 0; None otherwise."""
    present = [v for v in (r.value(task, m) for r in rows for m in METRICS) if v is not None]
    if not present:
        reasons = sorted({r.skipped[task] for r in rows if task in r.skipped})
        if reasons:
            return "not available:\n" + "\n".join(textwrap.fill(x, 60) for x in reasons) + "\n(skipped, box AP only)"
        return "not available: no value for any row"
    if all(v == 0 for v in present):
        return "every value is 0.0"
    return None


def build_figure(rows: Sequence[Row], title: Optional[str] = None, note: Optional[str] = None):
    """The bar chart of :func:`render_png` as a matplotlib ``Figure`` (Agg canvas, no pyplot
    state): groups APr, APc, APf, AP; one bar per row; a panel for box AP and one for mask AP
    when any row has or skipped masks; a panel with nothing to show says so inside it
    (:func:`panel_note`); the dataset(s) in the title; the protocol, the notes on what is not
    available (:func:`availability_notes`) and ``note`` in a caption under the panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [(t, p) for t, p in TASKS if t == "bbox" or has_segm(rows)]
    datasets = sorted({r.dataset or MISSING for r in rows})
    full_title = title or DEFAULT_TITLE
    dataset_text = ", ".join(datasets)
    if dataset_text not in full_title:
        full_title += f"\n{'dataset' if len(datasets) == 1 else 'datasets (differ!)'}: {dataset_text}"
    caption = "\n".join(textwrap.fill(line.strip(), 130) for line in footer_lines(rows, note)
                        if not line.startswith(("Dataset:", "Weights")))

    n = max(len(rows), 1)
    fig = Figure(figsize=(len(tasks) * max(4.5, 1.0 + 0.45 * n * len(METRICS)) + 2.5, 4.5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False, sharey=True)[0]
    width = 0.8 / n
    top = max([r.value(t, m) or 0.0 for r in rows for t, _ in tasks for m in METRICS] + [1.0])
    for ax, (task, prefix) in zip(axes, tasks):
        empty = panel_note(rows, task)
        for i, row in enumerate(rows):
            xs = [g + (i - (n - 1) / 2) * width for g in range(len(METRICS))]
            values = [row.value(task, m) for m in METRICS]
            # a missing value gets no bar (height 0), only its "–" / "n/a" label
            bars = ax.bar(xs, [v or 0.0 for v in values], width, label=row.label, color=f"C{i % 10}")
            if empty is not None and not any(values):
                continue  # the panel's note says it all
            for bar, v, m in zip(bars, values, METRICS):
                ax.text(bar.get_x() + bar.get_width() / 2, (v or 0.0) + top * 0.01, cell(row, task, m),
                        ha="center", va="bottom", fontsize=7 if n <= 4 else 5)
        if empty is not None:
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", fontsize=9,
                    color="0.25", bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.6"))
        ax.set_xticks(range(len(METRICS)))
        ax.set_xticklabels(METRICS)
        ax.set_ylim(0, top * 1.12)
        ax.set_title(f"{prefix} AP")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_ylabel("AP (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="Proposals")
    fig.suptitle(full_title)
    fig.text(0.01, -0.01, caption, ha="left", va="top", fontsize=7)
    return fig


def render_png(rows: Sequence[Row], title: Optional[str] = None, note: Optional[str] = None) -> bytes:
    """:func:`build_figure` as PNG bytes (120 dpi; the saved area takes in the caption)."""
    fig = build_figure(rows, title=title, note=note)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()
