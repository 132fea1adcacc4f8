"""What the command-line tools share: one error type, the project's device policy and config
loader seen from a command line, the repository's folders, and the CUDA synchronisation the
benchmarks time with.

Errors follow :mod:`regionspot.cli`: :class:`ToolError` is a ``ValueError``, hence one of
:data:`regionspot.cli.USER_ERRORS`, so :func:`run_tool` (``run_entry_point``) prints it as one
``<prog>: error: <message>`` line with exit code 2 (the traceback with ``--debug`` and in the log).
"""

import argparse
import os
from typing import Callable, Optional, Sequence

# Nothing heavy at import (torch, Detectron2, SAM, CLIP): a tool imports this module first and
# may import the rest under its own warning filters.

# The tools' default outputs go under ``./output`` in the current folder (never into the installed
# package); the configs are the package's bundled ones (regionspot.model_zoo), also found by name.
OUTPUT_ROOT = "output"
# This package's own folder: the benchmarks record the git commit it was checked out at (None
# for an installed wheel). Nothing looks outside the package.
SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))


class ToolError(ValueError):
    """A problem with a tool's input (a bad option, a missing or malformed input, an output that
    would overwrite an input); printed as one ``<prog>: error:`` line with exit status 2."""


def output_path(*parts: str) -> str:
    """``output/<parts...>`` under the current folder: where the tools write by default."""
    return os.path.join(OUTPUT_ROOT, *parts)


def synchronize(device) -> None:
    """Wait for the work queued on ``device`` (a ``torch.device`` or a string); a no-op off CUDA."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(value: Optional[str], parser: Optional[argparse.ArgumentParser] = None,
                   option: str = "--device") -> str:
    """A ``--device`` value through the project's one device policy
    (:func:`regionspot.config.resolve_device`): None or "auto" is CUDA when available, else the CPU.

    Args:
        value: None, "auto", "cpu", "cuda" or "cuda:N".
        parser: if given, a bad value ends in ``parser.error`` (exit 2, the usage line) rather
            than :class:`ToolError`.
        option: the option's name in the message.

    Returns:
        "cpu", "cuda" or "cuda:N".

    Raises:
        ToolError: an unknown device or a CUDA device this machine does not have (without ``parser``).
    """
    from regionspot.config import ConfigError
    from regionspot.config import resolve_device as resolve

    try:
        return resolve("auto" if value in (None, "") else str(value).strip())
    except ConfigError as e:
        message = f"{option} {value}: {e}"
        if parser is not None:
            parser.error(message)
        raise ToolError(message) from None


def load_config(config_file: str, opts: Sequence[str] = (), cpu_fallback: bool = False):
    """The config of a tool, through :func:`regionspot.config.load_config_for_tool` (the one loader).

    Args:
        config_file: the yaml file.
        opts: ``KEY VALUE`` overrides.
        cpu_fallback: if the config's ``MODEL.DEVICE`` is not usable on this machine, load it
            again with ``MODEL.DEVICE cpu`` (and log a note) instead of failing: for tools whose
            output does not depend on the device.

    Returns:
        The checked config (``CfgNode``).

    Raises:
        ToolError: the loader's message (a missing file, an unknown key, a bad value).
    """
    from regionspot.config import ConfigError, load_config_for_tool

    try:
        return load_config_for_tool(config_file, opts)
    except ConfigError as e:
        message = str(e)
        if cpu_fallback and "MODEL.DEVICE" in message:
            try:
                cfg = load_config_for_tool(config_file, list(opts) + ["MODEL.DEVICE", "cpu"])
            except ConfigError:
                pass
            else:
                print(f"note: {message}; running on the CPU", flush=True)
                return cfg
        raise ToolError(message) from e


def run_tool(run: Callable[[], Optional[int]], prog: str, debug: bool = False) -> int:
    """Show the project's log lines on the console (:func:`regionspot.cli.setup_logging`) and run
    ``run()`` through :func:`regionspot.cli.run_entry_point`: an input error becomes one line and
    exit code 2. The tool adds its log file with ``setup_logging(path)`` once its output is known.

    Returns:
        ``run()``'s exit code (0 for None), or 2 after an input error.
    """
    from regionspot.cli import run_entry_point, setup_logging

    setup_logging()
    return run_entry_point(run, prog, debug)
