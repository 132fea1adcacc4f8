"""The Table-1 layout as text and Markdown for ``regionspot-summarize``: the table (AP in percent,
one decimal, "–" when missing, "n/a" when skipped), and the lines under it (dataset, weights,
coverage, protocol, what is not available and why)."""

from typing import Dict, List, Optional, Sequence, Tuple

from regionspot.tools.summary.rows import METRICS, MISSING, MISSING_LEGEND, NOT_AVAILABLE, TASKS, Row

DEFAULT_TITLE = "RegionSpot: AP by proposal source (Table 1 layout)"


def _fmt(value: Optional[float]) -> str:
    return MISSING if value is None else f"{value:.1f}"


def has_segm(rows: Sequence[Row]) -> bool:
    """Whether the mask columns are shown: a row has mask AP, or mask AP was asked for and
    skipped (then the columns say "n/a")."""
    return any(r.segm is not None or "segm" in r.skipped for r in rows)


def cell(row: Row, task: str, metric: str) -> str:
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
        if task == "segm" and not has_segm(rows):
            continue
        values = [r.value(task, m) for r in rows for m in METRICS]
        present = [v for v in values if v is not None]
        if present and all(v == 0 for v in present):
            lines.append(f"{prefix} AP: every value is 0.0 (the bars have no height)")
    cells = [cell(r, task, metric) for r in rows for _, task, metric in _columns(rows)]
    if MISSING in cells:
        lines.append(MISSING_LEGEND)
    return lines


def _columns(rows: Sequence[Row]) -> List[Tuple[str, str, str]]:
    """(header, task, metric) of the numeric columns, in Table-1 order."""
    cols = []
    for task, prefix in TASKS:
        if task == "segm" and not has_segm(rows):
            continue
        for i, metric in enumerate(METRICS):
            cols.append((f"{prefix} {metric}" if i == 0 else metric, task, metric))
    return cols


def _cells(rows: Sequence[Row]) -> Tuple[List[str], List[List[str]]]:
    cols = _columns(rows)
    header = ["Proposals"] + [c[0] for c in cols]
    body = [[r.label] + [cell(r, task, metric) for _, task, metric in cols] for r in rows]
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
