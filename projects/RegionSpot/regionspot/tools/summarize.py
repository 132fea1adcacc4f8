"""Summarize RegionSpot evaluation outputs in the layout of the paper's Table 1.

    python tools/summarize.py RUN [RUN ...] [--label TEXT ...] [--dataset NAME]
                              [--output-dir DIR] [--name table1] [--note TEXT] [--title TEXT]

Each RUN is an evaluation ``metrics.json`` (what ``train_net.py --eval-only`` writes to
``<OUTPUT_DIR>/inference/<dataset>/metrics.json``) or a folder. A folder is searched
recursively for files named ``metrics.json``; those that are not evaluation outputs (such as
the training log Detectron2's ``JSONWriter`` writes to ``<OUTPUT_DIR>/metrics.json``: one JSON
object per line with "iteration", "total_loss", ...) are skipped. Within a folder the files
are taken in sorted path order (the folder's own ``metrics.json`` first); rows keep the order
of the RUN arguments. Every evaluated dataset of a file gives one row.

Numbers are LVIS-style average precision in percent (Detectron2's convention): AP over all
categories and APr / APc / APf over the rare / common / frequent categories, for boxes
("bbox") and, when masks were evaluated, for masks ("segm"). A missing value, null/NaN, or a
negative value (the LVIS API's -1 for "no category of this group was evaluated") is shown as
"–". Mask AP that the evaluation skipped because the dataset has no mask annotations (recorded
as "skipped_tasks" in metrics.json) is shown as "n/a", with a note saying why. Notes under the
table (and in the chart's caption and panels) also say when mask AP was not evaluated at all,
when a panel's values are all 0.0, and what "–" means.

The table is printed with the dataset(s), the weights and the evaluation protocol of each row,
then written as ``<DIR>/<name>.md`` (Markdown) and ``<DIR>/<name>.png`` (grouped bar chart),
both atomically. Errors (nothing found, malformed or non-evaluation JSON, label count mismatch,
an output that would overwrite an input) print one line and exit with status 2.
"""

import argparse
import io
import json
import math
import os
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from regionspot.tools.common import run_tool

PROG = "summarize.py"

with warnings.catch_warnings():  # importing the package imports torch and detectron2
    warnings.simplefilter("ignore")
    from regionspot.io import atomic_write

METRICS_NAME = "metrics.json"
METRICS = ("APr", "APc", "APf", "AP")  # Table 1 column order
TASKS = (("bbox", "Box"), ("segm", "Mask"))
MISSING = "–"
NOT_AVAILABLE = "n/a"  # a task the evaluation skipped (e.g. mask AP on a dataset without masks)
MISSING_LEGEND = (f"{MISSING}: no value (not in metrics.json, null/NaN e.g. without detections, or the LVIS "
                  f"API's -1: no category of that frequency group was evaluated; COCO-format datasets have no "
                  f"APr/APc/APf)")
DEFAULT_OUTPUT_DIR = os.path.join("output", "summary")
DEFAULT_NAME = "table1"
DEFAULT_TITLE = "RegionSpot: AP by proposal source (Table 1 layout)"
PROPOSAL_LABELS = {"gt": "GT boxes", "rpn": "RPN", "sam_auto": "SAM automatic masks"}
EXPECTED = ('an evaluation output of train_net.py --eval-only: one JSON object with a "results" '
            'section holding "bbox" and/or "segm" AP values (e.g. '
            '<OUTPUT_DIR>/inference/<dataset>/metrics.json)')


class SummaryError(ValueError):
    """A problem with the inputs or outputs of the summary, described in one line."""


@dataclass
class Row:
    """One evaluated (run, dataset): one line of Table 1.

    ``box`` and ``segm`` map "AP", "APr", "APc", "APf" (and whatever else the evaluator wrote)
    to AP in percent; ``segm`` is None when masks were not evaluated. ``skipped`` maps a task
    the evaluation skipped ("segm" on a dataset without mask annotations) to the reason
    recorded in metrics.json ("skipped_tasks"). ``description`` is the
    protocol's text (None if the file records none); ``proposals`` is "gt", "file", "rpn",
    "sam_auto" (or None when unknown); ``path`` is the metrics.json the row comes from.
    """

    label: str
    dataset: Optional[str]
    weights: Optional[str]
    proposals: Optional[str]
    description: Optional[str]
    box: Optional[Dict[str, Any]]
    segm: Optional[Dict[str, Any]]
    path: str
    protocol: Optional[Dict[str, Any]] = None
    coverage: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)

    def value(self, task: str, metric: str) -> Optional[float]:
        """AP in percent of ``task`` ("bbox" or "segm") for ``metric`` ("AP", "APr", "APc",
        "APf"), or None when missing, not a number, NaN or negative (LVIS's "undefined")."""
        section = self.box if task == "bbox" else self.segm
        if not isinstance(section, dict):
            return None
        raw = section.get(metric)
        if isinstance(raw, bool):
            return None
        try:
            number = float(raw)
        except (TypeError, ValueError):
            return None
        if math.isnan(number) or math.isinf(number) or number < 0:
            return None
        return number


# ----------------------------------------------------------------------------- reading


def _read_text(path: str) -> str:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SummaryError(f"{path}: cannot read the file ({e}); expected {EXPECTED}") from None


def _is_training_log(text: str) -> bool:
    """Detectron2 JSONWriter output: JSON objects, one per line, with an "iteration" key."""
    first = next((line for line in text.splitlines() if line.strip()), None)
    if first is None:
        return False
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and "iteration" in obj and "results" not in obj


def _classify(path: str) -> Tuple[str, Any]:
    """("eval", parsed object), ("other", reason) for well-formed JSON that is not an evaluation
    output (training log, empty file, other object), or raise SummaryError for malformed JSON."""
    text = _read_text(path)
    if not text.strip():
        return "other", "the file is empty"
    if _is_training_log(text):
        return "other", ('it is a training log (Detectron2 JSONWriter: one JSON object per line with '
                         '"iteration", "total_loss", ...)')
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise SummaryError(f"{path}: malformed JSON ({e}); expected {EXPECTED}") from None
    if not isinstance(obj, dict):
        return "other", f"it holds a JSON {type(obj).__name__}, not an object"
    if "results" not in obj:
        keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
        return "other", f'it has no "results" section (keys: {keys})'
    return "eval", obj


def _find_metrics(folder: str) -> List[str]:
    """Every metrics.json under ``folder``: its own first, then the rest in sorted path order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if METRICS_NAME in files:
            rel = os.path.relpath(os.path.join(root, METRICS_NAME), folder)
            found.append(rel)
    found.sort(key=lambda rel: (os.sep in rel, rel.split(os.sep)))
    return [os.path.join(folder, rel) for rel in found]


def _proposal_label(obj: Dict[str, Any]) -> Tuple[Optional[str], str]:
    """(proposal kind, default row label) from the file's "proposals" / protocol."""
    protocol = obj.get("protocol")
    kind = obj.get("proposals")
    if kind is None and isinstance(protocol, dict):
        kind = protocol.get("proposals")
    if kind is None and isinstance(protocol, str) and "ground-truth boxes" in protocol:
        kind = "gt"  # older outputs: the protocol is only a sentence
    if kind is None:
        return None, "unknown proposals"
    kind = str(kind)
    if kind == "file":
        source = protocol.get("proposal_file") if isinstance(protocol, dict) else None
        return kind, f"file: {os.path.basename(str(source))}" if source else "file proposals"
    return kind, PROPOSAL_LABELS.get(kind, kind)


def _protocol_description(protocol: Any) -> Optional[str]:
    if isinstance(protocol, str):
        text = protocol.strip()
        return text or None
    if isinstance(protocol, dict):
        text = protocol.get("description")
        if isinstance(text, str) and text.strip():
            return text.strip()
        # no description: spell out the recorded settings, proposal settings first
        keys = sorted(protocol, key=lambda k: (not str(k).startswith("proposal"), str(k)))
        parts = [f"{k}={protocol[k]}" for k in keys if k != "description"]
        if parts:
            proposal = ", ".join(p for p in parts if p.startswith("proposal"))
            rest = ", ".join(p for p in parts if not p.startswith("proposal"))
            return "; ".join(x for x in (f"proposals: {proposal}" if proposal else "", rest) if x)
    return None


def _rows_from_eval(path: str, obj: Dict[str, Any]) -> List[Row]:
    results = obj.get("results")
    if not isinstance(results, dict):
        raise SummaryError(f'{path}: "results" is a {type(results).__name__}, expected an object '
                           'with "bbox" and/or "segm" AP values')
    # One dataset per file (the current format); tolerate a file keyed by dataset name, as
    # Detectron2's own test() returns when several datasets are evaluated at once.
    if not any(task in results for task, _ in TASKS) and results and all(
            isinstance(v, dict) and any(t in v for t, _ in TASKS) for v in results.values()):
        per_dataset = list(results.items())
    else:
        per_dataset = [(obj.get("dataset"), results)]
    protocol = obj.get("protocol")
    kind, label = _proposal_label(obj)
    coverage = obj.get("proposal_coverage")
    skipped_tasks = obj.get("skipped_tasks")
    skipped = ({str(k): str(v) for k, v in skipped_tasks.items() if k in dict(TASKS)}
               if isinstance(skipped_tasks, dict) else {})
    rows = []
    for dataset, section in per_dataset:
        tasks = {}
        for task, _ in TASKS:
            if task not in section or section[task] is None:
                continue
            values = section[task]
            if not isinstance(values, dict) or not any(m in values for m in METRICS):
                raise SummaryError(f'{path}: results section "{task}" has no AP keys '
                                   f'(expected {", ".join(METRICS)} in percent); got '
                                   f'{json.dumps(values)[:120]}')
            tasks[task] = values
        if not tasks and not skipped:
            keys = ", ".join(map(str, section)) or "none"
            raise SummaryError(f'{path}: no "bbox" or "segm" AP values in "results" (keys: {keys}); '
                               f"expected {EXPECTED}")
        rows.append(Row(label=label, dataset=None if dataset is None else str(dataset),
                        weights=None if obj.get("weights") is None else str(obj.get("weights")),
                        proposals=kind, description=_protocol_description(protocol),
                        box=tasks.get("bbox"), segm=tasks.get("segm"), path=path,
                        protocol=protocol if isinstance(protocol, dict) else None,
                        coverage=coverage if isinstance(coverage, dict) else None,
                        skipped={t: r for t, r in skipped.items() if t not in tasks}))
    return rows


def _disambiguate(rows: List[Row]) -> None:
    """Make equal derived labels distinct: add the dataset, else the weights, else a number."""
    groups: Dict[str, List[Row]] = {}
    for row in rows:
        groups.setdefault(row.label, []).append(row)
    for label, group in groups.items():
        if len(group) < 2:
            continue
        datasets = [r.dataset or MISSING for r in group]
        weights = [os.path.basename(r.weights) if r.weights else MISSING for r in group]
        if len(set(datasets)) == len(group):
            extras = datasets
        elif len(set(weights)) == len(group):
            extras = weights
        elif len(set(zip(datasets, weights))) == len(group):
            extras = [f"{d}, {w}" for d, w in zip(datasets, weights)]
        else:
            extras = [f"#{i + 1}" for i in range(len(group))]
        for row, extra in zip(group, extras):
            row.label = f"{label} ({extra})"


def load_runs(paths: Sequence[str], labels: Optional[Sequence[str]] = None,
              dataset: Optional[str] = None) -> List[Row]:
    """Read evaluation outputs into Table-1 rows (AP in percent).

    ``paths``: metrics.json files or folders (searched recursively for evaluation
    metrics.json files; training logs and other JSON are skipped there, but are an error
    when named directly). Rows keep the order of ``paths``, sorted path order within a folder.
    ``dataset``: keep only rows of this dataset. ``labels``: one per resulting row, replacing
    the labels derived from the proposal source ("GT boxes", "RPN", "file: <proposal file>",
    "SAM automatic masks"). Raises :class:`SummaryError` with a one-line message.
    """
    if not paths:
        raise SummaryError("no RUN given: expected metrics.json files or folders holding them")
    rows: List[Row] = []
    for run in paths:
        if os.path.isdir(run):
            found = []
            skipped = []
            for path in _find_metrics(run):
                kind, what = _classify(path)
                if kind == "eval":
                    found.extend(_rows_from_eval(path, what))
                else:
                    skipped.append(path)
            if not found:
                extra = f" ({len(skipped)} other metrics.json skipped: {skipped[0]}, ...)" if skipped else ""
                raise SummaryError(f"{run}: no evaluation output found{extra}; expected {EXPECTED}")
            rows.extend(found)
        elif os.path.exists(run):
            kind, what = _classify(run)
            if kind != "eval":
                raise SummaryError(f"{run}: not an evaluation output: {what}; expected {EXPECTED}")
            rows.extend(_rows_from_eval(run, what))
        else:
            raise SummaryError(f"{run}: no such file or folder; expected a metrics.json file or a "
                               "folder holding evaluation outputs")
    if dataset is not None:
        available = sorted({r.dataset or MISSING for r in rows})
        rows = [r for r in rows if r.dataset == dataset]
        if not rows:
            raise SummaryError(f"no evaluation of dataset {dataset!r} in the given runs "
                               f"(datasets found: {', '.join(available)})")
    if labels is not None and len(labels) > 0:
        if len(labels) != len(rows):
            listing = "; ".join(f"{r.dataset or MISSING} from {r.path}" for r in rows)
            raise SummaryError(f"{len(labels)} --label value(s) for {len(rows)} row(s); give one label "
                               f"per row, in RUN order: {listing}")
        for row, label in zip(rows, labels):
            row.label = str(label)
    else:
        _disambiguate(rows)
    return rows


# ----------------------------------------------------------------------------- formatting


def _fmt(value: Optional[float]) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _has_segm(rows: Sequence[Row]) -> bool:
    """Whether the mask columns are shown: a row has mask AP, or mask AP was asked for and
    skipped (then the columns say "n/a")."""
    return any(r.segm is not None or "segm" in r.skipped for r in rows)


def _cell(row: Row, task: str, metric: str) -> str:
    """The table text of one value: one decimal, "–" when missing, "n/a" when the task was
    skipped for this row."""
    if task in row.skipped:
        return NOT_AVAILABLE
    return _fmt(row.value(task, metric))


def _labels(rows: Sequence[Row]) -> str:
    return ", ".join(r.label for r in rows)


def availability_notes(rows: Sequence[Row]) -> List[str]:
    """Lines that say which numbers are not available and why: mask AP skipped (dataset
    without mask annotations; the "n/a" cells), mask AP not evaluated, a panel whose values are
    all 0.0, and the meaning of "–" when a shown cell has it."""
    lines = []
    by_reason: Dict[str, List[Row]] = {}
    for r in rows:
        if "segm" in r.skipped:
            by_reason.setdefault(r.skipped["segm"], []).append(r)
    for reason, group in by_reason.items():
        who = "" if len(group) == len(rows) else f" for {_labels(group)}"
        lines.append(f"Mask AP not available ({NOT_AVAILABLE}){who}: {reason}; mask AP (segm) skipped, box AP only")
    not_evaluated = [r for r in rows if r.segm is None and "segm" not in r.skipped]
    if not_evaluated:
        who = "these runs" if len(not_evaluated) == len(rows) else _labels(not_evaluated)
        lines.append(f"Mask AP not evaluated for {who} (no segm results in metrics.json: MODEL.MASK_ON False)")
    for task, prefix in TASKS:
        if task == "segm" and not _has_segm(rows):
            continue
        values = [r.value(task, m) for r in rows for m in METRICS]
        present = [v for v in values if v is not None]
        if present and all(v == 0 for v in present):
            lines.append(f"{prefix} AP: every value is 0.0 (the bars have no height)")
    cells = [_cell(r, task, metric) for r in rows for _, task, metric in _columns(rows)]
    if MISSING in cells:
        lines.append(MISSING_LEGEND)
    return lines


def _columns(rows: Sequence[Row]) -> List[Tuple[str, str, str]]:
    """(header, task, metric) of the numeric columns, in Table-1 order."""
    cols = []
    for task, prefix in TASKS:
        if task == "segm" and not _has_segm(rows):
            continue
        for i, metric in enumerate(METRICS):
            cols.append((f"{prefix} {metric}" if i == 0 else metric, task, metric))
    return cols


def _cells(rows: Sequence[Row]) -> Tuple[List[str], List[List[str]]]:
    cols = _columns(rows)
    header = ["Proposals"] + [c[0] for c in cols]
    body = [[r.label] + [_cell(r, task, metric) for _, task, metric in cols] for r in rows]
    return header, body


def _split_description(text: str) -> Tuple[str, str]:
    """(proposal part, rest) of a protocol description ("proposals: ...; softmax ...; ...")."""
    parts = [p.strip() for p in text.split(";")]
    proposal, rest = [], []
    for p in parts:
        bare = p[len("protocol:"):].strip() if p.lower().startswith("protocol:") else p
        if bare.lower().startswith("proposals") or bare.lower().endswith("as proposals"):
            proposal.append(bare)
        elif p:
            rest.append(p)
    return "; ".join(proposal), "; ".join(rest)


def _strip_proposals_prefix(text: str) -> str:
    return text[len("proposals:"):].strip() if text.lower().startswith("proposals:") else text


def footer_lines(rows: Sequence[Row], note: Optional[str] = None) -> List[str]:
    """The lines printed under the table: dataset(s) (with a warning when rows evaluate
    different datasets), weights, proposal coverage problems, protocol, what is not available
    and why (:func:`availability_notes`), and ``note``."""
    lines = []
    datasets = [r.dataset or MISSING for r in rows]
    if len(set(datasets)) <= 1:
        lines.append(f"Dataset: {datasets[0] if datasets else MISSING}")
    else:
        lines.append("WARNING: rows evaluate different datasets, so their numbers are not comparable: "
                     + "; ".join(f"{r.label}: {d}" for r, d in zip(rows, datasets)))
    weights = [r.weights or MISSING for r in rows]
    if len(rows) > 1 and len(set(weights)) == 1:
        lines.append(f"Weights (all rows): {weights[0]}")
    else:
        for r, w in zip(rows, weights):
            lines.append(f"Weights: {r.label}: {w}")
    for r in rows:
        cov = r.coverage or {}
        missing, total = cov.get("images_without_proposals"), cov.get("images_in_dataset")
        if isinstance(missing, (int, float)) and missing > 0:
            lines.append(f"Coverage: {r.label}: {missing:g} of "
                         f"{total if total is not None else MISSING} images had no proposals")
    descriptions = [r.description for r in rows]
    if len(rows) == 1:
        lines.append(f"Protocol: {descriptions[0] or 'not recorded in ' + rows[0].path}")
    elif all(descriptions):
        split = [_split_description(d) for d in descriptions]
        rests = {rest for _, rest in split}
        if len(rests) == 1:
            per_row = "; ".join(f"{r.label} = {_strip_proposals_prefix(p) or MISSING}"
                                for r, (p, _) in zip(rows, split))
            lines.append(f"Protocol (all rows): {rests.pop() or MISSING}. Proposals per row: {per_row}")
        else:
            lines.append("Protocol (differs between rows):")
            lines.extend(f"  {r.label}: {d}" for r, d in zip(rows, descriptions))
    else:
        lines.append("Protocol (per row):")
        lines.extend(f"  {r.label}: {d or 'not recorded in ' + r.path}" for r, d in zip(rows, descriptions))
    lines.extend(availability_notes(rows))
    if note:
        lines.append(f"Note: {note}")
    return lines


def format_table(rows: Sequence[Row]) -> str:
    """The Table-1 layout as aligned plain text: ``Proposals | Box APr | APc | APf | AP`` and,
    when any row has masks or skipped them, ``| Mask APr | APc | APf | AP`` (AP in percent, one
    decimal, "–" when missing, "n/a" when skipped). Only the table; see :func:`format_report`
    for the lines under it."""
    header, body = _cells(rows)
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return " | ".join([first] + rest).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(cells) for cells in body])


def format_report(rows: Sequence[Row], note: Optional[str] = None) -> str:
    """:func:`format_table` followed by :func:`footer_lines` (dataset, weights, protocol, notes)."""
    return "\n".join([format_table(rows), ""] + footer_lines(rows, note))


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Row]) -> str:
    """The Table-1 layout as a Markdown table (AP in percent, one decimal, "–" when missing)."""
    header, body = _cells(rows)
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def markdown_report(rows: Sequence[Row], note: Optional[str] = None, title: Optional[str] = None) -> str:
    """The Markdown document written to ``<name>.md``: title, table, then the dataset, weights,
    protocol and note lines, one paragraph each."""
    parts = [f"# {title or DEFAULT_TITLE}", "", markdown_table(rows), ""]
    for text in footer_lines(rows, note):
        if text.startswith("  "):  # an indented per-row protocol line: a list item
            parts.append(f"- {_md_escape(text.strip())}")
        else:
            if parts[-1] != "":
                parts.append("")
            parts.extend([text, ""])
    return "\n".join(parts).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------- chart


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

    tasks = [(t, p) for t, p in TASKS if t == "bbox" or _has_segm(rows)]
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
                ax.text(bar.get_x() + bar.get_width() / 2, (v or 0.0) + top * 0.01, _cell(row, task, m),
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


# ----------------------------------------------------------------------------- writing


def output_paths(out_dir: str, name: str) -> Tuple[str, str]:
    """``(<out_dir>/<name>.md, <out_dir>/<name>.png)``."""
    return os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.png")


def check_outputs(rows: Sequence[Row], out_dir: str, name: str) -> Tuple[str, str]:
    """The output paths, or SummaryError if there are no rows, ``name`` is not a plain file
    stem, or an output path is one of the rows' input files (or a folder)."""
    if not rows:
        raise SummaryError("nothing to write: no rows")
    if not name or os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
        raise SummaryError(f"--name {name!r}: expected a plain file name without folders or suffix")
    md_path, png_path = output_paths(out_dir, name)
    inputs = {os.path.realpath(r.path) for r in rows}
    for path in (md_path, png_path):
        if os.path.realpath(path) in inputs:
            raise SummaryError(f"refusing to write {path}: it is one of the input files; choose "
                               "another --output-dir or --name")
        if os.path.isdir(path):
            raise SummaryError(f"cannot write {path}: it is a folder")
    return md_path, png_path


def write_outputs(rows: Sequence[Row], out_dir: str = DEFAULT_OUTPUT_DIR, name: str = DEFAULT_NAME,
                  note: Optional[str] = None, title: Optional[str] = None) -> Tuple[str, str]:
    """Write ``<out_dir>/<name>.md`` (Markdown table + dataset/weights/protocol/note lines) and
    ``<out_dir>/<name>.png`` (bar chart), each atomically, replacing earlier ones. Refuses
    (SummaryError) to write over a row's input file. Returns (md_path, png_path)."""
    md_path, png_path = check_outputs(rows, out_dir, name)
    md_text = markdown_report(rows, note=note, title=title)
    png = render_png(rows, title=title, note=note)  # render both before writing either
    try:
        atomic_write(md_path, lambda f: f.write(md_text), "w")
        atomic_write(png_path, lambda f: f.write(png), "wb")
    except OSError as e:
        raise SummaryError(f"cannot write the summary to {out_dir}: {e}") from None
    return md_path, png_path


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="summarize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="an evaluation metrics.json or a folder searched for them")
    p.add_argument("--label", action="extend", nargs="+", default=None, metavar="TEXT",
                   help="row labels, one per row in RUN order (--label A B or --label A --label B; "
                        "default: from the proposal source)")
    p.add_argument("--dataset", default=None, metavar="NAME", help="keep only rows of this dataset")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help=f"where <name>.md and <name>.png go (default: {DEFAULT_OUTPUT_DIR})")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"output file stem (default: {DEFAULT_NAME})")
    p.add_argument("--note", default=None, metavar="TEXT",
                   help="printed and written under the table (e.g. 'random weights: not accuracy')")
    p.add_argument("--title", default=None, metavar="TEXT", help="title of the Markdown file and chart")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 on an input/output error, in one
    ``summarize.py: error:`` line; the traceback too with ``--debug``, and in ``<DIR>/<name>.log``
    once the outputs are checked)."""
    from regionspot.cli import add_debug_argument, setup_logging

    args = add_debug_argument(build_parser()).parse_args(argv)

    def run() -> int:
        rows = load_runs(args.runs, labels=args.label, dataset=args.dataset)
        check_outputs(rows, args.output_dir, args.name)  # refuse before printing anything
        setup_logging(os.path.join(args.output_dir, f"{args.name}.log"))
        print(format_report(rows, note=args.note))
        md_path, png_path = write_outputs(rows, args.output_dir, args.name, note=args.note, title=args.title)
        print(f"\nWrote {md_path} and {png_path}")
        return 0

    return run_tool(run, PROG, args.debug)  # the log file once the outputs are checked


if __name__ == "__main__":
    sys.exit(main())
