"""Training speed of RegionSpot: iterations and images per second, with and without the SAM-token
cache, on the CPU or a CUDA GPU.

    regionspot-benchmark train [--device cpu|cuda] [--models small,bb,bl] [--batch 2]
        [--boxes 12] [--precision float32|bfloat16|float16] [--iters 3] [--warmup 1]
        [--output FILE] [--quick]

One training step is what ``MixedPrecisionTrainer`` / ``SimpleTrainer`` run: the model's
forward on a batch (SAM for the boxes' tokens unless they come from the cache, CLIP's feature
map, the head, the focal loss against a 365-class vocabulary), backward, full-model gradient
clipping and the AdamW step, under autocast for ``--precision`` bfloat16/float16. Inputs are
synthetic and already in memory (images of ``--image-size``, ``--boxes`` random boxes each),
so data loading is not included:

- ``online``: the mapper's output without a cache: the original image for SAM
  (``sam_image``, ``sam_boxes``) and the resized image for CLIP; SAM's image encoder and mask
  decoder run every step;
- ``cached``: ``instances.sam_tokens`` as the cache gives them: only CLIP and the head run.

Each figure is the median of ``--iters`` timed steps after ``--warmup`` steps; the JSON
(written atomically, default ``output/benchmark/train_<device>.json``) keeps every sample,
the device, torch, threads and load average. Models have RANDOM weights: the speed is
representative, nothing else is. The budget to compare with: ``docs/speed.md`` (training).

The run's log (the project's lines) goes to the console and ``<output>.log``; an error in the
input ends with one line ``benchmark.py train: error: <message>`` and exit status 2
(``--debug``: with the traceback).
"""

import argparse
import os
import statistics
import warnings
from typing import Dict, List

import torch

from regionspot.testing.random_backbones import VARIANTS, random_regionspot
from regionspot.tools.benchmarks.report import run_header, save_progress
from regionspot.tools.benchmarks.timing import peak_memory, timed, torch_threads
from regionspot.tools.common import output_path, resolve_device

SCHEMA = "regionspot-train-benchmark/1"
PROG = "benchmark.py train"
SUMMARY = "training iterations/s and images/s with and without the SAM-token cache"
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This subcommand's options, added to ``p``."""
    from regionspot.cli import add_debug_argument

    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--models", default=None, help=f"comma-separated among {','.join(VARIANTS)} (default small,bb,bl)")
    p.add_argument("--modes", default="online,cached", help="online (SAM every step) and/or cached (token cache)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 2 on the CPU, 16 on CUDA)")
    p.add_argument("--boxes", type=int, default=12, help="annotated boxes per image (LVIS/Objects365-like: ~12)")
    p.add_argument("--classes", type=int, default=365, help="vocabulary size of the loss (Objects365: 365)")
    p.add_argument("--image-size", default="800x1066", help="HxW of the CLIP/mapper image (SAM sees 480x640 originals)")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="autocast of the step (default float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 3 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--output", default=None, help="JSON file (default output/benchmark/train_<device>.json); "
                                                  "the log goes to OUTPUT.log")
    p.add_argument("--quick", action="store_true", help="small model, batch 2, 2 timed steps, small images (tests)")
    add_debug_argument(p)


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Defaults: explicit flags > --quick > per-device."""
    args.device = resolve_device(args.device, parser)
    cuda = torch.device(args.device).type == "cuda"
    if args.quick:
        args.models = args.models or "small"
        args.image_size = "240x320" if args.image_size == "800x1066" else args.image_size
        args.iters = args.iters or 2
    args.models = [m.strip() for m in (args.models or "small,bb,bl").split(",") if m.strip()]
    unknown = [m for m in args.models if m not in VARIANTS]
    if unknown:
        parser.error(f"--models must be among {sorted(VARIANTS)}, got {unknown}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in ("online", "cached") for m in args.modes):
        parser.error(f"--modes must be online and/or cached, got {args.modes}")
    try:
        args.image_size = tuple(int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        parser.error(f"--image-size must be HxW, got {args.image_size!r}")
    args.batch = args.batch or (16 if cuda else 2)
    args.precision = args.precision or ("bfloat16" if cuda else "float32")
    if args.precision == "float16" and not cuda:
        parser.error("--precision float16 needs CUDA (use bfloat16 on the CPU)")
    args.iters = args.iters or (20 if cuda else 3)
    args.warmup = 1 if args.warmup is None and not cuda else (5 if args.warmup is None else args.warmup)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    for name in ("batch", "boxes", "classes", "iters"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    args.output = args.output or output_path("benchmark", f"train_{args.device}.json")
    return args


def synthetic_batch(args, model, mode: str, generator: torch.Generator) -> List[Dict]:
    """``args.batch`` mapped inputs: CLIP image, boxes, classes, and the SAM side of ``mode``."""
    from detectron2.structures import Boxes, Instances

    h, w = args.image_size
    oh, ow = 480, 640  # the original photo the mapper resized (COCO-like)
    batch = []
    for _ in range(args.batch):
        xy = torch.rand(args.boxes, 2, generator=generator) * torch.tensor([ow * 0.7, oh * 0.7])
        wh = (torch.rand(args.boxes, 2, generator=generator) * 0.3 + 0.05) * torch.tensor([ow, oh])
        original = torch.cat([xy, xy + wh], dim=1)
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(original * torch.tensor([w / ow, h / oh, w / ow, h / oh]))
        instances.gt_classes = torch.randint(0, args.classes, (args.boxes,), generator=generator)
        x = {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator),
             "instances": instances, "dataset": "benchmark"}
        if mode == "cached":
            instances.sam_tokens = torch.randn(args.boxes, model.localizer.token_dim, generator=generator)
        else:
            instances.sam_boxes = Boxes(original)
            x["sam_image"] = torch.randint(0, 256, (3, oh, ow), dtype=torch.uint8, generator=generator)
        batch.append(x)
    return batch


def benchmark(variant: str, args, device: torch.device) -> Dict[str, object]:
    """Median step time of one variant in each mode."""
    from regionspot.engine.trainer import with_full_model_clipping

    model = random_regionspot(variant, seed=0).to(device).train()
    emb = torch.nn.functional.normalize(torch.randn(args.classes, model.semantic_encoder.embed_dim), dim=-1)
    model.set_vocabulary([f"class {i}" for i in range(args.classes)], emb, dataset="benchmark")
    optimizer = with_full_model_clipping(torch.optim.AdamW, 1.0)(
        [p for p in model.parameters() if p.requires_grad], lr=2.5e-5, weight_decay=1e-4)
    dtype = PRECISIONS[args.precision]
    scaler = torch.amp.GradScaler("cuda") if args.precision == "float16" else None
    generator = torch.Generator().manual_seed(0)
    result = {"sam": VARIANTS[variant][0], "clip": VARIANTS[variant][1], "clip_input_size": VARIANTS[variant][2],
              "head_parameters": sum(p.numel() for p in model.head.parameters()), "modes": {}}

    def step(batch) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(batch)["loss_region_focal"]
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        return loss

    for mode in args.modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        samples = []
        for i in range(args.warmup + args.iters):
            batch = synthetic_batch(args, model, mode, generator)
            loss, ms = timed(lambda batch=batch: step(batch), device)
            if i >= args.warmup:
                samples.append(ms / 1000.0)
            if not torch.isfinite(loss):
                raise RuntimeError(f"[{variant}/{mode}] the loss is not finite: {loss.item()}")
        seconds = statistics.median(samples)
        result["modes"][mode] = {
            "seconds_per_iteration": seconds, "iterations_per_second": 1.0 / seconds,
            "images_per_second": args.batch / seconds, "samples_s": samples,
            "peak_bytes": peak_memory(device),
            "peak_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_process_peak_rss",
        }
        print(f"[{variant}] {mode}: {seconds:.3f} s/it, {args.batch / seconds:.2f} images/s", flush=True)
    if set(args.modes) == {"online", "cached"}:
        result["cache_speedup"] = (result["modes"]["online"]["seconds_per_iteration"]
                                   / result["modes"]["cached"]["seconds_per_iteration"])
    return result


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``regionspot-benchmark train``: returns the exit status (2 for an input error, in one
    ``benchmark.py train: error:`` line; the traceback too with ``--debug``)."""
    from regionspot.cli import run_entry_point, setup_logging

    setup_logging()  # the console; the log file next to the JSON once its path is resolved
    args = resolve(args, parser)
    setup_logging(args.output + ".log")
    with torch_threads(args.threads):
        return run_entry_point(lambda: run(args), PROG, args.debug)


def run(args: argparse.Namespace) -> int:
    """Benchmark every model of ``args.models`` and write the JSON (see the module docstring)."""
    device = torch.device(args.device)
    report = {
        **run_header(SCHEMA, device),
        "settings": {"batch": args.batch, "boxes_per_image": args.boxes, "classes": args.classes,
                     "image_size": list(args.image_size), "original_size": [480, 640], "precision": args.precision,
                     "iters": args.iters, "warmup": args.warmup, "modes": args.modes,
                     "what": "one training step (forward, focal loss, backward, clipping, AdamW) on synthetic "
                             "in-memory inputs; data loading excluded; RANDOM weights: speed only"},
        "models": {},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for variant in args.models:
            report["models"][variant] = benchmark(variant, args, device)
            save_progress(args.output, report)  # what is done survives a later failure
    print(f"wrote {os.path.abspath(args.output)}")
    return 0
