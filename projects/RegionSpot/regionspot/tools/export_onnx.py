"""Export a RegionSpot model for deployment: ``regionspot-export onnx``.

    regionspot-export onnx --config-file configs/regionspot_bl.yaml --output out/regionspot_onnx \\
        --opts MODEL.WEIGHTS regionspot_bl.pth
    python tools/export_onnx.py onnx --config-file ... --output ... --opts ...

writes a new folder (refused if it exists; written under a temporary name and renamed when
complete) with the localizer's image encoder and prompt path, the semantic encoder, the head
and the text tower as ONNX files (opset 18, ``torch.onnx.export``, each checked with
``onnx.checker``), the text tokenizer (``tokenizer.json``), the text embeddings of the config's
vocabulary (or ``--vocabulary``) and ``manifest.json`` (:mod:`regionspot.onnx_export`).
:class:`regionspot.deploy.OnnxRegionSpotPredictor` runs it on ONNX Runtime, without torch.
What cannot be exported is refused in one line naming the part and the reason (exit status 2).
"""

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from regionspot.tools.common import ToolError, load_config, run_tool

PROG = "regionspot-export"
logger = logging.getLogger("regionspot.export_onnx")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (one subcommand, ``onnx``)."""
    from regionspot.cli import add_debug_argument

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="format", required=True)
    onnx = sub.add_parser("onnx", help="ONNX files for ONNX Runtime (regionspot.deploy)")
    onnx.add_argument("--config-file", required=True, help="RegionSpot config (yaml)")
    onnx.add_argument("--output", required=True, help="the folder to write (must not exist)")
    onnx.add_argument("--vocabulary", help='class names whose text embeddings are written ("a,b,c"; default: '
                                           "the config's vocabulary)")
    onnx.add_argument("--untrained-head", action="store_true",
                      help="allow an empty MODEL.WEIGHTS (a randomly initialised head, on purpose)")
    onnx.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    add_debug_argument(onnx)
    return parser


def run(args) -> int:
    """Build the predictor of the config on the CPU and export it."""
    from regionspot.onnx_export import export_onnx
    from regionspot.predictor import RegionSpotPredictor

    if os.path.exists(args.output):  # refused before any model is built (export_onnx checks again)
        raise ToolError(f"the output folder {os.path.abspath(args.output)} exists: choose a new one (nothing is "
                        f"overwritten)")
    cfg = load_config(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
    vocabulary = None
    if args.vocabulary is not None:
        vocabulary = [n.strip() for n in args.vocabulary.split(",") if n.strip()]
        if not vocabulary:
            raise ToolError(f"--vocabulary {args.vocabulary!r} names no class")
    predictor = RegionSpotPredictor.from_config(cfg, allow_untrained_head=args.untrained_head)
    manifest = export_onnx(predictor, args.output, vocabulary=vocabulary, log=logger.info)
    seconds = sum(manifest["export_seconds"].values())
    print(f"{PROG}: wrote {args.output} (pair {manifest['pair']}, export {seconds:.1f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status (2 for bad input or a refused part, with one error line)."""
    args = build_parser().parse_args(argv)
    return run_tool(lambda: run(args), PROG, args.debug)


if __name__ == "__main__":
    sys.exit(main())
