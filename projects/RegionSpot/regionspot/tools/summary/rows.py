"""Reading evaluation outputs into Table-1 rows (:func:`load_runs`) for ``regionspot-summarize``
(:mod:`regionspot.tools.summarize`): what counts as an evaluation ``metrics.json``, how a folder
is searched, the row labels derived from the proposal source, and the one-line
:class:`SummaryError`."""

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

METRICS_NAME = "metrics.json"
METRICS = ("APr", "APc", "APf", "AP")  # Table 1 column order
TASKS = (("bbox", "Box"), ("segm", "Mask"))
MISSING = "–"
NOT_AVAILABLE = "n/a"  # a task the evaluation skipped (e.g. mask AP on a dataset without masks)
MISSING_LEGEND = (f"{MISSING}: no value (not in metrics.json, null/NaN e.g. without detections, or the LVIS "
                  f"API's -1: no category of that frequency group was evaluated; COCO-format datasets have no "
                  f"APr/APc/APf)")
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

