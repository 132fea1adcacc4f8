"""Measure the plain and the fast CLIP text-embedding paths on the CPU (LVIS vocabulary).

    regionspot-benchmark text [--towers tiny ViT-B/16 ViT-L/14] [--classes K]
        [--tiny-classes K] [--threads N] [--batch-size B]
        [--output output/benchmark/text_embeddings_cpu.json] [--quick]

For each randomly initialised CLIP text tower (``regionspot.testing.random_backbones``:
"tiny", and the full-size text towers of "ViT-B/16" and "ViT-L/14"; random weights have the
real architecture, so the timings are those of the real towers), both paths of
``regionspot.modeling.text_embeddings.encode_class_names`` encode the first K LVIS class
names (``get_vocabulary("lvis")``, 1203 names) x the 81 prompt templates, in this process,
one after the other (each after a one-class warm-up):

* ``plain``: ``clip_model.encode_text`` on full 77-token sequences (the reference);
* ``fast``: sequences cut after the end-of-text token, prompts batched by length.

The JSON (written atomically, and again after every tower, so an interrupted run keeps the
towers done) holds per tower: the prompts encoded, seconds and prompts/s of both paths, the
speed-up, the largest absolute difference between the two paths' L2-normalised embeddings,
the mean tokens per prompt before (77) and after truncation, and the figures for all 1203
classes. Figures measured on all classes say ``"measured"``; with K < 1203 those for all
classes are ``"estimated"``: the plain time scales with the number of prompts (every prompt
runs 77 positions), the fast time with the number of tokens run (prompt lengths of all 1203
classes counted by tokenizing them; ``--quick`` scales by prompts instead). The run's
environment (torch version, threads, CPU, load average before and after) is recorded too.

Defaults: K = all 1203 classes for "tiny" (``--tiny-classes``), K = 100 for the full-size
towers (``--classes``; the plain path runs ~20 prompts/s for ViT-B/16 on 2 cores, ~1.4 h for
all of LVIS). ``--quick`` (for tests): tiny tower, 8 classes.

The project's log lines are shown on the console and written to ``<output>.log`` next to the
JSON. Bad options print one line ``benchmark.py text: error: <message>`` and exit with status
2 (``--debug``: with the traceback).
"""

import argparse
import os
import platform
import time
from typing import Dict, List, Optional, Sequence

from regionspot.environment import device_name, load_average
from regionspot.tools.common import run_tool

TOWERS = ("tiny", "ViT-B/16", "ViT-L/14")
DEFAULT_OUTPUT = os.path.join("output", "benchmark", "text_embeddings_cpu.json")
QUICK_CLASSES = 8
PROG = "benchmark.py text"
SUMMARY = "the plain and fast CLIP text-embedding paths on the LVIS vocabulary (CPU)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options, added to ``parser``."""
    from regionspot.cli import add_debug_argument

    parser.add_argument("--towers", nargs="+", default=None, choices=TOWERS,
                        help=f"text towers to measure (default: {' '.join(TOWERS)})")
    parser.add_argument("--classes", type=int, default=100,
                        help="first K LVIS classes for the full-size towers (0: all 1203; default 100)")
    parser.add_argument("--tiny-classes", type=int, default=0,
                        help="first K LVIS classes for the tiny tower (0: all 1203; default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per text-tower batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random towers")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"JSON file (default {DEFAULT_OUTPUT}); the log goes to OUTPUT.log")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny tower only, first {QUICK_CLASSES} classes (for tests)")
    add_debug_argument(parser)


def vocabulary_token_stats(names: Sequence[str], templates: Sequence[str], context_length: int = 77) -> dict:
    """Prompts and tokens (up to the end-of-text token) of the whole vocabulary, by tokenizing it."""
    from regionspot.modeling import text_embeddings as te

    cleaned = [te.clean_class_name(n) for n in names]
    _, lengths, _ = te._tokenize_ragged(cleaned, list(templates), context_length)
    return {"prompts": int(lengths.numel()), "tokens": int(lengths.sum()),
            "mean_prompt_tokens": float(lengths.double().mean())}


def measure_tower(tower: str, names: List[str], k: int, args: argparse.Namespace,
                  all_tokens: Optional[dict]) -> Dict[str, object]:
    """Both paths on the first ``k`` of ``names`` with a random ``tower``; see the module docstring."""
    from regionspot.modeling import text_embeddings as te
    from regionspot.testing.random_backbones import CLIP_PRESETS, random_clip

    templates = list(te.PROMPT_TEMPLATES)
    model = random_clip(tower, seed=args.seed)
    preset = CLIP_PRESETS[tower]
    subset = names[:k]
    print(f"[{tower}] {k} classes x {len(templates)} templates = {k * len(templates)} prompts", flush=True)

    # warm-up (one class, both paths): allocator, thread pool, first-call overheads
    for fast in (False, True):
        te._encode_with_stats(model, names[:1], templates, args.batch_size, fast=fast, progress=False)
    plain_emb, plain = te._encode_with_stats(model, subset, templates, args.batch_size, fast=False)
    print(f"[{tower}] plain: {plain['seconds']:.1f} s ({plain['prompts_per_s']:.1f} prompts/s)", flush=True)
    fast_emb, fast = te._encode_with_stats(model, subset, templates, args.batch_size, fast=True)
    print(f"[{tower}] fast:  {fast['seconds']:.1f} s ({fast['prompts_per_s']:.1f} prompts/s)", flush=True)
    assert fast["path"] == "fast" and plain["path"] == "plain", (fast["path"], plain["path"])
    max_diff = float((plain_emb - fast_emb).abs().max())
    cos = float((plain_emb * fast_emb).sum(-1).min())

    n_all = len(names) * len(templates)
    measured_all = k == len(names)
    prompts_factor = n_all / plain["prompts"]
    if measured_all:
        fast_all, fast_method = fast["seconds"], "measured"
    elif all_tokens is not None:
        tokens_measured = fast["mean_prompt_tokens"] * fast["prompts"]
        fast_all = fast["seconds"] * all_tokens["tokens"] / tokens_measured
        fast_method = (f"estimated: measured seconds x (tokens of all {len(names)} classes "
                       f"{all_tokens['tokens']} / tokens of the first {k} {tokens_measured:.0f})")
    else:
        fast_all = fast["seconds"] * prompts_factor
        fast_method = f"estimated: measured seconds x prompts ratio {prompts_factor:.4g}"
    plain_all = plain["seconds"] * prompts_factor
    plain_method = "measured" if measured_all else f"estimated: measured seconds x prompts ratio {prompts_factor:.4g}"

    del model
    return {
        "tower": tower,
        "text_width": preset["transformer_width"],
        "text_layers": preset["transformer_layers"],
        "text_heads": preset["transformer_heads"],
        "embed_dim": preset["embed_dim"],
        "measured": {
            "classes": k,
            "class_names": f"first {k} of the LVIS vocabulary",
            "templates": len(templates),
            "prompts": plain["prompts"],
            "batch_size": args.batch_size,
            "plain": {"seconds": plain["seconds"], "prompts_per_s": plain["prompts_per_s"],
                      "mean_tokens_per_prompt": plain["mean_tokens_run"], "batches": plain["batches"]},
            "fast": {"seconds": fast["seconds"], "prompts_per_s": fast["prompts_per_s"],
                     "mean_tokens_per_prompt": fast["mean_tokens_run"],
                     "mean_prompt_tokens_to_end_of_text": fast["mean_prompt_tokens"], "batches": fast["batches"]},
            "speedup": plain["seconds"] / fast["seconds"],
            "max_abs_diff": max_diff,
            "min_cosine_plain_fast": cos,
            "mean_tokens_per_prompt": {"before": plain["mean_tokens_run"],
                                       "after_truncation": fast["mean_tokens_run"]},
        },
        "all_classes": {
            "classes": len(names),
            "prompts": n_all,
            "plain_seconds": plain_all,
            "plain": plain_method,
            "fast_seconds": fast_all,
            "fast": fast_method,
            "speedup": plain_all / fast_all,
        },
    }


def run(args: argparse.Namespace) -> int:
    """Measure the towers and write the JSON; returns the exit status.

    Raises:
        ValueError: a bad option value.
    """
    import torch

    from regionspot.cli import setup_logging
    from regionspot.data.vocabularies import get_vocabulary
    from regionspot.io import write_json_atomic
    from regionspot.modeling import text_embeddings as te

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.classes < 0 or args.tiny_classes < 0:
        raise ValueError(f"--batch-size must be positive and --classes / --tiny-classes not negative, got "
                         f"{args.batch_size} / {args.classes} / {args.tiny_classes}")
    setup_logging(args.output + ".log")
    towers = ["tiny"] if args.quick else list(args.towers or TOWERS)
    names = get_vocabulary("lvis")
    templates = list(te.PROMPT_TEMPLATES)

    def classes_for(tower: str) -> int:
        k = QUICK_CLASSES if args.quick else (args.tiny_classes if tower == "tiny" else args.classes)
        return len(names) if k in (0, None) else min(k, len(names))

    need_tokens = not args.quick and any(classes_for(t) < len(names) for t in towers)
    all_tokens = vocabulary_token_stats(names, templates) if need_tokens else None
    result = {
        "what": "CLIP text embeddings of the LVIS vocabulary (81 templates): plain encode_text on 77 tokens "
                "vs the fast path (sequences cut after the end-of-text token, batched by length); "
                "random text towers of the real sizes, CPU",
        "vocabulary": "lvis",
        "classes": len(names),
        "templates": len(templates),
        "vocabulary_tokens": all_tokens,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": device_name(),
            "python": platform.python_version(),
            "load_average_before": load_average(),
            "load_average_after": None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "notes": "'measured' figures come from encoding the first K classes; 'all_classes' figures are "
                 "measured when K = all classes, else estimated as each figure's text says",
        "towers": {},
    }
    for tower in towers:
        result["towers"][tower] = measure_tower(tower, names, classes_for(tower), args, all_tokens)
        result["environment"]["load_average_after"] = load_average()
        write_json_atomic(args.output, result)
    for tower, r in result["towers"].items():
        m, a = r["measured"], r["all_classes"]
        print(f"{tower:9s} {m['prompts']:6d} prompts: plain {m['plain']['seconds']:8.1f} s  fast "
              f"{m['fast']['seconds']:7.1f} s  x{m['speedup']:.2f}  max|diff| {m['max_abs_diff']:.2e}  "
              f"tokens {m['mean_tokens_per_prompt']['before']:.0f} -> "
              f"{m['mean_tokens_per_prompt']['after_truncation']:.2f}; all {a['classes']} classes: plain "
              f"{a['plain_seconds']:.0f} s, fast {a['fast_seconds']:.0f} s "
              f"({'measured' if a['plain'] == 'measured' else 'estimated'})")
    print(f"wrote {args.output}")
    return 0


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``regionspot-benchmark text``: returns the exit status (2 for a bad option, in one line)."""
    return run_tool(lambda: run(args), PROG, args.debug)  # the log file next to the JSON (run)
