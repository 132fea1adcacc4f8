"""What every entry point shares (``train_net.py``, ``demo/demo.py``, ``tools/*.py``): the
project's log lines on the console and in the run's log file, and errors a person can act on.

Logging. Detectron2's ``default_setup`` configures only the ``detectron2`` and ``fvcore``
loggers; without :func:`setup_logging` every ``regionspot.*`` INFO line (which weights were
loaded from which file, training progress, text-embedding progress, the protocol under each
AP table) would reach Python's last-resort handler, which prints warnings only. Each process
calls :func:`setup_logging` once, early (console), and again when its output folder is known
(log file): handlers are never added twice, the console is rank 0's, and the log file of a
folder is ``<folder>/log.txt`` for rank 0 and ``log.txt.rank<N>`` for the others (Detectron2's
convention, sharing Detectron2's open stream so the lines of both stay in order).

Errors. :data:`USER_ERRORS` are the exceptions caused by the user's input (a config key that
does not exist, an unregistered dataset, a missing file, a checkpoint of another model, a bad
boxes file). :func:`run_entry_point` reports them as one line ``<prog>: error: <message>`` on
stderr with exit code 2; the traceback goes to the log file, and to the console with
``--debug`` (:func:`add_debug_argument`).

Inputs. The demo and ``regionspot-export-region-embeddings`` read images the same way:
``--input`` files or glob patterns (:func:`expand_inputs`) and an optional ``--boxes`` JSON
file (:func:`read_boxes_file`, looked up per image by :func:`boxes_for`).
"""

import argparse
import glob
import json
import logging
import os
import sys
import traceback
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from .checkpoint import CheckpointError
from .data.token_cache import TokenCacheError
from .data.validation import InputError
from .modeling.weights import WeightsError

# ValueError covers ConfigError, InputError, ProposalFileError, LVISFormatError and the tools'
# own input errors; OSError covers missing and unreadable files.
USER_ERRORS = (ValueError, OSError, WeightsError, CheckpointError, TokenCacheError)
# Exit code of a run refused because of its input (argparse's code for a bad command line).
USER_ERROR_EXIT_CODE = 2
# The loggers an entry point shows: the project's, and the libraries' it builds on.
PROJECT_LOGGERS = ("regionspot", "detectron2", "fvcore")

CONSOLE_FORMAT = "[%(asctime)s %(name)s]: %(message)s"
FILE_FORMAT = "[%(asctime)s] %(name)s %(levelname)s: %(message)s"
DATE_FORMAT = "%m/%d %H:%M:%S"

logger = logging.getLogger("regionspot")


class _Console(logging.StreamHandler):
    """The console handler :func:`setup_logging` adds: it writes to whatever ``sys.stdout`` is
    when a line is emitted (so a redirected or captured stdout gets the lines)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ / setStream: always the current stdout
        pass


class _ConsoleFormatter(logging.Formatter):
    """``[time name]: message``, with ``WARNING`` / ``ERROR`` in front of those levels (as
    Detectron2's console shows them), so a problem stands out in a plain log."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return f"{record.levelname} {line}" if record.levelno >= logging.WARNING else line


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, _Console) or getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def _rank() -> int:
    from detectron2.utils import comm

    return comm.get_rank()


def log_file_of(output: str, rank: int) -> str:
    """The log file of ``output``: itself when it ends in ``.txt`` or ``.log``, else
    ``<output>/log.txt``; ``.rank<N>`` appended for ranks other than 0 (Detectron2's naming)."""
    path = output if output.endswith((".txt", ".log")) else os.path.join(output, "log.txt")
    return path if rank == 0 else f"{path}.rank{rank}"


def _open_log_stream(path: str):
    """An append stream to ``path``, the same object Detectron2's ``setup_logger`` writes to."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        from detectron2.utils.logger import _cached_log_stream  # shared with Detectron2's handlers

        return _cached_log_stream(path)
    except ImportError:  # pragma: no cover - every Detectron2 since 2019 has it
        return open(path, "a", buffering=1)


def setup_logging(output: Optional[str] = None, rank: Optional[int] = None,
                  names: Iterable[str] = PROJECT_LOGGERS, level: int = logging.INFO) -> None:
    """Show the INFO lines of the ``names`` loggers on the console (rank 0) and in a log file.

    Safe to call several times in a process: a logger gets at most one console handler (its own
    or Detectron2's) and one handler per log file.

    Args:
        output: a folder (the log goes to ``<folder>/log.txt``) or a ``.txt`` / ``.log`` file;
            None for the console only.
        rank: the process's rank (default: Detectron2's ``comm.get_rank()``); ranks other than
            0 write only their own log file.
        names: logger names; the default is the project's, Detectron2's and fvcore's.
        level: the console's level (the log file records DEBUG too).
    """
    rank = _rank() if rank is None else rank
    path = log_file_of(output, rank) if output else None
    for name in names:
        log = logging.getLogger(name)
        log.setLevel(logging.DEBUG)
        log.propagate = False
        streams = [h.stream for h in log.handlers if not _is_console(h) and hasattr(h, "stream")]
        if rank == 0 and not any(_is_console(h) for h in log.handlers):
            console = _Console()
            console.setLevel(level)
            console.setFormatter(_ConsoleFormatter(CONSOLE_FORMAT, DATE_FORMAT))
            log.addHandler(console)
        if path and not any(os.path.abspath(getattr(s, "name", "") or "") == os.path.abspath(path)
                            for s in streams if not isinstance(getattr(s, "name", None), int)):
            handler = logging.StreamHandler(_open_log_stream(path))
            handler.setLevel(logging.DEBUG)
            handler.setFormatter(logging.Formatter(FILE_FORMAT, DATE_FORMAT))
            log.addHandler(handler)


def _log_files(log: logging.Logger):
    return [h for h in log.handlers if not _is_console(h)]


def add_debug_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--debug``: show the full traceback of an input error instead of one line."""
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback (it is always in the log file)")
    return parser


def one_line(message: str) -> str:
    """``message`` on one line (newlines and runs of spaces become single spaces)."""
    return " ".join(str(message).split())


def report_user_error(prog: str, error: BaseException, debug: bool = False) -> int:
    """Report an input error as one line on stderr (the traceback too with ``debug``), record
    the traceback in the log files, and return :data:`USER_ERROR_EXIT_CODE`."""
    message = one_line(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename and error.strerror:  # "x: No such file or directory"
        message = f"{error.filename}: {error.strerror}"
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    record = logging.LogRecord("regionspot", logging.ERROR, __file__, 0, "%s: error: %s\n%s",
                               (prog, message, text), None)
    for handler in _log_files(logger):
        handler.handle(record)
    if debug:
        sys.stderr.write(text)
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    return USER_ERROR_EXIT_CODE


def run_entry_point(main: Callable[[], Optional[int]], prog: str, debug: bool = False) -> int:
    """Run ``main()``; an input error (:data:`USER_ERRORS`) becomes one line and exit code 2.

    Returns:
        ``main()``'s return value (0 for None), or 2 after an input error. Other exceptions
        (bugs) propagate with their traceback.
    """
    try:
        code = main()
    except USER_ERRORS as e:
        return report_user_error(prog, e, debug)
    return 0 if code is None else int(code)


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Image paths of ``--input`` (files or glob patterns, ``~`` expanded) in the order given; a
    pattern that matches nothing is kept as it is, so that reading it names it."""
    paths: List[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        paths.extend(matches if matches else [pattern])
    return paths


def read_boxes_file(path: str) -> dict:
    """The ``--boxes`` JSON object ``{image: [[x0, y0, x1, y1], ...]}`` (XYXY_ABS pixels; keys are
    image paths or file names) of the demo and the tools.

    Raises:
        InputError: the file is missing, not JSON (the message has the line), or not an object.
    """
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        raise InputError(f"--boxes file not found: {path!r}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"--boxes {path!r} is not valid JSON: {e}") from None
    if not isinstance(table, dict):
        raise InputError(f"--boxes {path!r} must hold a JSON object {{image: [[x0, y0, x1, y1], ...]}}, "
                         f"got a {type(table).__name__}")
    return table


def boxes_for(table: dict, path: str, boxes_file: str) -> Tuple[str, list]:
    """(key, boxes) of an image in a ``--boxes`` table (:func:`read_boxes_file`; keys: the path
    as given, normalised, or the file name).

    Raises:
        InputError: the table has no boxes for the image (the message names it and the file).
    """
    for key in (path, os.path.normpath(path), os.path.basename(path)):
        if key in table:
            return key, table[key]
    raise InputError(f"no boxes for image {path!r} in {boxes_file} (keys are image paths or file names)")
