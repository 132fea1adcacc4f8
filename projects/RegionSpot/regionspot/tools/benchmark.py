"""Speed and memory of RegionSpot: one command, one subcommand per benchmark.

    regionspot-benchmark SUBCOMMAND [options]     (or: python tools/benchmark.py SUBCOMMAND ...)

Subcommands (``regionspot-benchmark SUBCOMMAND --help`` for each one's options and figures):

- ``stages``: inference stage by stage (encoders, mask decoder, head, post-processing, end to
  end) and the memory of mask output (:mod:`regionspot.tools.benchmarks.stages`);
- ``e2e``: the evaluation loop end to end (loader, model, evaluator), plain vs fast paths in one
  process, with their deviations (:mod:`regionspot.tools.benchmarks.e2e`);
- ``eval``: the two LVIS evaluator backends on a synthetic LVIS-val-sized set
  (:mod:`regionspot.tools.benchmarks.evaluator`);
- ``text``: the plain and fast CLIP text-embedding paths (:mod:`regionspot.tools.benchmarks.text`);
- ``train``: training iterations/s with and without the SAM-token cache
  (:mod:`regionspot.tools.benchmarks.train`);
- ``pairs``: each localizer's and vision-language model's cost per image and the FLOP-bound
  GPU-hours of each pair (:mod:`regionspot.tools.benchmarks.pairs`);
- ``app``: the web app's handlers and the cost of recording attention
  (:mod:`regionspot.tools.benchmarks.app`);
- ``onnx``: the exported model on ONNX Runtime vs the PyTorch CPU path (float32 and bfloat16),
  and the export's time (:mod:`regionspot.tools.benchmarks.onnx_speed`).

Each writes its figures to a JSON file (``--output``) as it goes; how to read them:
``docs/speed.md``. Bad options end with one line ``benchmark.py SUBCOMMAND: error: <message>``
and exit status 2 (``--debug``, where a subcommand has it: with the traceback).

The subcommands share :mod:`regionspot.tools.benchmarks.timing` (timers, memory) and
:mod:`regionspot.tools.benchmarks.report` (JSON header, atomic writes, tables); none imports
this dispatcher or another subcommand.
"""

import argparse
import importlib
import sys
from typing import Optional, Sequence

PROG = "benchmark.py"
# subcommand -> its module in regionspot.tools.benchmarks (each has SUMMARY, add_arguments(parser)
# and run_command(args, parser) -> int)
SUBCOMMANDS = {
    "stages": "stages",
    "e2e": "e2e",
    "eval": "evaluator",
    "text": "text",
    "train": "train",
    "pairs": "pairs",
    "app": "app",
    "onnx": "onnx_speed",
}


def subcommand_module(name: str):
    """The module of subcommand ``name`` (a key of :data:`SUBCOMMANDS`).

    Raises:
        KeyError: an unknown subcommand.
    """
    return importlib.import_module(f"regionspot.tools.benchmarks.{SUBCOMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: one sub-parser per subcommand, with that subcommand's options
    (its module's ``add_arguments``) and its module docstring as the description."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name in SUBCOMMANDS:
        module = subcommand_module(name)
        sub = commands.add_parser(name, help=module.SUMMARY, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(subparser=sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the subcommand the command line names; returns its exit status (2 for bad options,
    in one ``benchmark.py SUBCOMMAND: error:`` line)."""
    from regionspot.tools.benchmarks.report import quiet_dependency_warnings

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    with quiet_dependency_warnings():
        return subcommand_module(args.command).run_command(args, args.subparser)


if __name__ == "__main__":
    sys.exit(main())
