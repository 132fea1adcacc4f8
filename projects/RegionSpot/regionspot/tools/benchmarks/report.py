"""How the benchmarks report: the machine header of a JSON report, writing the figures
atomically as they come, and plain-text tables. Shared by the subcommands of
``regionspot-benchmark`` (:mod:`regionspot.tools.benchmark`); imports nothing of them.
"""

import argparse
import contextlib
import datetime
import os
import platform
import warnings
from typing import Dict, Iterator, List, Sequence

from regionspot.tools.common import SOURCE_DIR

# Import-time deprecation noise of the dependencies (pkg_resources via clip, TorchScript in
# SAM 2 / OpenCLIP, nested tensors in nn.TransformerEncoder) that a benchmark's output omits.
DEPENDENCY_WARNINGS = (".*pkg_resources is deprecated.*", ".*enable_nested_tensor.*",
                       ".*torch.jit.script.*deprecated.*")


def add_run_arguments(parser: argparse.ArgumentParser, output: str, quick: str) -> None:
    """The options of a run that measures models: ``--device``, ``--threads``, ``--seed``,
    ``--output`` (whose help is ``output``: the JSON file and its default; the log goes to
    OUTPUT.log), ``--quick`` (help ``quick``) and ``--debug``."""
    from regionspot.cli import add_debug_argument

    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    parser.add_argument("--output", default=None, help=output + "; the log goes to OUTPUT.log")
    parser.add_argument("--quick", action="store_true", help=quick)
    add_debug_argument(parser)


@contextlib.contextmanager
def quiet_dependency_warnings() -> Iterator[None]:
    """Hide :data:`DEPENDENCY_WARNINGS` for the block; the warning filters are restored after."""
    with warnings.catch_warnings():
        for message in DEPENDENCY_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def run_header(schema: str, device) -> Dict[str, object]:
    """The start of a benchmark's JSON report: what ran where.

    Args:
        schema: the report's schema name (e.g. ``"regionspot-benchmark/1"``); None leaves it out.
        device: the ``torch.device`` (or string) the figures were measured on.

    Returns:
        ``schema``, ``date`` (UTC, ISO 8601), ``device`` (type, name, CPU count, CUDA version on
        CUDA), ``torch_version``, ``python_version``, ``git_commit`` of the repository,
        ``threads``, ``interop_threads`` and ``load_average_before`` (1, 5, 15 minutes).
    """
    import torch

    from regionspot.environment import device_name, git_commit, load_average

    device = torch.device(device)
    header = {"schema": schema} if schema else {}
    header.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": device_name(device), "cpu_count": os.cpu_count(),
                   "cuda_version": torch.version.cuda if device.type == "cuda" else None},
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(SOURCE_DIR),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "load_average_before": load_average(),
    })
    return header


def save_progress(path: str, report: Dict[str, object]) -> None:
    """Record ``load_average_after`` in ``report`` and write it to ``path`` as JSON, atomically
    (:func:`regionspot.io.write_json_atomic`): called after each measured part, so the parts done
    survive a later failure.

    Raises:
        OSError: the file cannot be written.
    """
    from regionspot.environment import load_average
    from regionspot.io import write_json_atomic

    report["load_average_after"] = load_average()
    write_json_atomic(path, report)


def format_table(rows: Sequence[Sequence[object]]) -> List[str]:
    """Rows of cells as right-aligned text columns, a rule of dashes under the first row (the
    header): one string per line."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines
