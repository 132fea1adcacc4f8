"""Where ``regionspot-summarize`` writes (``<DIR>/<name>.md`` and ``<DIR>/<name>.png``), the checks
before writing, and the atomic writes."""

import os
import warnings
from typing import Optional, Sequence, Tuple

from regionspot.tools.summary.chart import render_png
from regionspot.tools.summary.report import markdown_report
from regionspot.tools.summary.rows import Row, SummaryError

with warnings.catch_warnings():  # importing the package imports torch and detectron2
    warnings.simplefilter("ignore")
    from regionspot.io import atomic_write

DEFAULT_OUTPUT_DIR = os.path.join("output", "summary")
DEFAULT_NAME = "table1"


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
