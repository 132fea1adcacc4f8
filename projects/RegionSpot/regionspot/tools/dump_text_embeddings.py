"""Compute the CLIP text embeddings of a vocabulary ahead of time (fills the text-embedding cache).

    python tools/dump_text_embeddings.py --config-file configs/regionspot_bl.yaml \\
        --vocabulary {lvis,coco,objects365,custom,DATASET} [--custom-vocabulary "a,b,c"] \\
        [--register NAME JSON IMAGE_ROOT] [--output FILE.pt] [--batch-size N] [--opts KEY VALUE ...]

Only CLIP is loaded (``MODEL.REGIONSPOT.CLIP_WEIGHTS``), never SAM. The embeddings (the prompt
ensemble of ``regionspot.modeling.text_embeddings``: 81 templates per class name, mean of the
unnormalised features, L2-normalised) are computed with ``load_or_compute_text_embeddings``
into the config's ``MODEL.REGIONSPOT.TEXT_CACHE_DIR`` under the same key the model uses (the
CLIP weights' fingerprint, the class names, the templates), so a later training, evaluation or
demo run with this config and vocabulary reads them from the cache instead of encoding
C x 81 prompts at start-up. An existing valid cache entry is reused.

``--output`` also writes a standalone file (``torch.save``, atomically) holding
``{"class_names": [C str], "templates": [81 str], "weights_id": str, "embeddings": (C, E)
float32}``, readable with ``torch.load(path, weights_only=True)``; it refuses to write over
an input (the config file or a config it inherits from, the CLIP or SAM weights file).

CLIP runs on ``MODEL.DEVICE`` when that device is usable here, else on the CPU (said on
stdout), in float32 like the model's own text encoding. ``--custom-vocabulary`` defaults to
the config's ``MODEL.REGIONSPOT.CUSTOM_VOCABULARY``; ``--batch-size`` to
``MODEL.REGIONSPOT.TEXT_BATCH_SIZE``.

The project's log lines (CLIP loaded, cache hit or miss, encoding progress) are shown on the
console and written to ``OUT.log`` with ``--output OUT``, else to
``<TEXT_CACHE_DIR>/dump_text_embeddings.log``. Errors (unknown vocabulary, missing config or
weights, bad ``--opts``, an output that would overwrite an input, nothing to write) print one
line ``dump_text_embeddings.py: error: <message>`` and exit with status 2; ``--debug`` prints
the traceback too (it is also in the log file when the error comes after the output checks).
"""

import argparse
import os
import sys
import time
import warnings
from typing import List, Optional, Sequence

from regionspot.tools.common import ToolError, load_config, run_tool

VOCABULARIES = ("lvis", "coco", "objects365", "custom")
PROG = "dump_text_embeddings.py"
CACHE_LOG = "dump_text_embeddings.log"  # the log file in the cache folder when there is no --output


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    from regionspot.cli import add_debug_argument

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="RegionSpot config (yaml)")
    parser.add_argument("--vocabulary", required=True,
                        help=f"class names to encode: {', '.join(VOCABULARIES)}, or the name of a registered dataset "
                             f"(e.g. with --register) to encode its categories")
    parser.add_argument("--custom-vocabulary", default=None,
                        help='class names "a,b,c" for --vocabulary custom (default: the config\'s '
                             "MODEL.REGIONSPOT.CUSTOM_VOCABULARY)")
    parser.add_argument("--output", default=None,
                        help="also write a standalone .pt file (the log goes to OUTPUT.log then)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts per text-tower batch (default: MODEL.REGIONSPOT.TEXT_BATCH_SIZE)")
    from regionspot.data.datasets.user import add_register_argument

    add_register_argument(parser)
    add_debug_argument(parser)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides KEY VALUE ... (must come last)")
    return parser


def config_chain(config_file: str) -> List[str]:
    """Real paths of ``config_file`` and of the configs it inherits from (``_BASE_``, recursively)."""
    import yaml

    from regionspot.model_zoo import resolve_config_file

    try:
        config_file = resolve_config_file(config_file)  # a bundled config's name: its file
    except FileNotFoundError:
        return []
    chain, todo = [], [config_file]
    while todo:
        path = os.path.realpath(todo.pop())
        if path in chain or not os.path.isfile(path):
            continue
        chain.append(path)
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        base = data.get("_BASE_") if isinstance(data, dict) else None
        if isinstance(base, str):
            base = os.path.expanduser(base)
            todo.append(base if os.path.isabs(base) or base.startswith(("http://", "https://"))
                        else os.path.join(os.path.dirname(path), base))
    return chain


def check_output(output: str, protected: Sequence[str]) -> None:
    """Raise :class:`ToolError` if ``output`` is a directory or one of the ``protected`` files."""
    if os.path.isdir(output):
        raise ToolError(f"--output {output} is a directory; give a file name")
    real = os.path.realpath(output)
    for path in protected:
        if path and os.path.exists(path) and os.path.realpath(path) == real:
            raise ToolError(f"refusing to write {output}: it is an input file ({path})")


def run(args: argparse.Namespace) -> int:
    """Compute (or find in the cache) the embeddings and write them; returns the exit status.

    Raises:
        ToolError: see the module docstring.
    """
    import torch

    from regionspot.cli import setup_logging
    from regionspot.config import ConfigError
    from regionspot.data.datasets.user import register_from_args
    from regionspot.data.vocabularies import vocabulary_by_name
    from regionspot.io import atomic_write
    from regionspot.modeling.backbones import build_vl_model
    from regionspot.modeling.weights import WeightsError

    # the text embeddings are the same on any device: a MODEL.DEVICE this machine lacks means the CPU
    cfg = load_config(args.config_file, args.opts, cpu_fallback=True)
    rs = cfg.MODEL.REGIONSPOT
    clip_path = rs.CLIP_WEIGHTS
    inputs = config_chain(args.config_file) + [os.path.expanduser(clip_path), os.path.expanduser(rs.SAM_WEIGHTS)]
    if args.output:
        check_output(args.output, inputs)
    cache_dir = rs.TEXT_CACHE_DIR or None
    if cache_dir is None and not args.output:
        raise ToolError("MODEL.REGIONSPOT.TEXT_CACHE_DIR is empty (cache disabled) and no --output given: "
                        "nothing would be written")
    batch_size = args.batch_size if args.batch_size is not None else int(rs.TEXT_BATCH_SIZE)
    if batch_size < 1:
        raise ToolError(f"--batch-size must be positive, got {batch_size}")
    log_file = args.output + ".log" if args.output else os.path.join(os.path.expanduser(cache_dir), CACHE_LOG)
    check_output(log_file, inputs)
    setup_logging(log_file)  # from here on the project's lines (and an error's traceback) are in the log file

    custom = None
    if args.vocabulary == "custom":
        custom = args.custom_vocabulary if args.custom_vocabulary is not None else rs.CUSTOM_VOCABULARY
    elif args.custom_vocabulary is not None:
        raise ToolError("--custom-vocabulary is only used with --vocabulary custom")
    try:
        register_from_args(args.register)
        names = vocabulary_by_name(args.vocabulary, custom)
    except (ValueError, TypeError) as e:
        raise ToolError(str(e)) from e

    device = torch.device(cfg.MODEL.DEVICE)  # resolved by the loader (regionspot.config.resolve_device)
    try:
        # the model's own text classifier (VL_MODEL): the same texts, templates, tokenizer, weights
        # identity and cache key as the model's
        classifier = build_vl_model(cfg).text_classifier
    except (WeightsError, ConfigError, FileNotFoundError, IsADirectoryError) as e:
        raise ToolError(str(e)) from e
    classifier.to(device)
    templates = classifier.templates
    print(f"vocabulary {args.vocabulary}: {len(names)} classes x {len(templates)} templates = "
          f"{len(names) * len(templates)} prompts; CLIP {clip_path} on {device}")
    cache_file = classifier.cache_path(names)
    if cache_file is not None:
        print(f"cache file: {cache_file} ({'exists' if os.path.exists(cache_file) else 'new'})")
    start = time.perf_counter()
    emb = classifier.embed(names, batch_size=batch_size)
    weights_id = classifier.weights_id
    print(f"embeddings {tuple(emb.shape)} float32 in {time.perf_counter() - start:.1f} s")
    if args.output:
        entry = {"class_names": names, "templates": templates, "weights_id": weights_id,
                 "embeddings": emb.detach().float().cpu().contiguous()}
        atomic_write(args.output, lambda f: torch.save(entry, f))
        print(f"wrote {args.output}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status (2 for bad input, with one
    ``dump_text_embeddings.py: error:`` line on stderr; the traceback too with ``--debug``)."""
    with warnings.catch_warnings():  # import-time deprecation noise of dependencies
        for message in (".*torch.jit.script.*deprecated.*", ".*torch.jit.load.*deprecated.*",
                        ".*pkg_resources is deprecated.*"):
            warnings.filterwarnings("ignore", message=message)
        args = build_parser().parse_args(argv)
        return run_tool(lambda: run(args), PROG, args.debug)  # the log file once the output is known (run)


if __name__ == "__main__":
    sys.exit(main())
