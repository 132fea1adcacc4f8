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
import os
import sys
from typing import Optional, Sequence

from regionspot.tools.common import run_tool
from regionspot.tools.summary.chart import build_figure, panel_note, render_png  # noqa: F401 (re-exported)
from regionspot.tools.summary.outputs import (  # noqa: F401 (re-exported: the tool's public names)
    DEFAULT_NAME,
    DEFAULT_OUTPUT_DIR,
    check_outputs,
    output_paths,
    write_outputs,
)
from regionspot.tools.summary.report import (  # noqa: F401 (re-exported)
    DEFAULT_TITLE,
    availability_notes,
    footer_lines,
    format_report,
    format_table,
    markdown_report,
    markdown_table,
)
from regionspot.tools.summary.rows import (  # noqa: F401 (re-exported)
    EXPECTED,
    METRICS,
    METRICS_NAME,
    MISSING,
    MISSING_LEGEND,
    NOT_AVAILABLE,
    PROPOSAL_LABELS,
    TASKS,
    Row,
    SummaryError,
    load_runs,
)

PROG = "summarize.py"


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
