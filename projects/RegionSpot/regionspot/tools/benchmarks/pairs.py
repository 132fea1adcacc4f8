"""The pairs table: what each foundation model costs RegionSpot per image (``regionspot-benchmark pairs``).

For every supported localizer and vision-language model, at the input size RegionSpot runs it
(SAM / SAM-HQ / SAM 2.1: their 1024-px input; CLIP: ``CLIP_INPUT_SIZE``), the image encoder's

- time per image: our localizer's / semantic encoder's ``encode`` of one 800 x 1066 photo-sized
  image (resize and normalisation included), median of ``--repeats`` after a warm-up, float32 on
  the chosen device;
- FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over the same call (matmuls,
  convolutions and attention; 2 FLOPs per multiply-add). The counter does not see inside the
  fused CPU attention kernels, so that pass runs attention on PyTorch's math path;
- parameters of the image encoder.

Models are randomly initialised at the real architectures (no weights are needed: cost does not
depend on the values). SAM-HQ's image encoder is SAM's ViT (its HQ decoder adds a few convolutions
on the prompt side), so its rows equal SAM's of the same size; they are listed as such.

From the FLOPs, ``--schedule-images`` (RegionSpot's stage 1: 450k iterations x 16 images) and
``--cache-images`` (the training set whose image and flip go through the localizer once for the
SAM-token cache), the table gives each pair's *FLOP-bound* training cost in GPU-hours at
``--sustained-tflops`` (default 400: 40% of an H100's dense bfloat16 peak). That is an estimate
from counted FLOPs, not a measurement; the GPU check (tools/gpu/check.sh) measures BL's real
training images/s with the token cache, which calibrates it.

Writes ``--output`` (JSON, default output/benchmark/pairs_<device>.json) and a Markdown table
next to it (``.md``), and prints the table.
"""

import argparse
import os
import statistics
from typing import Callable, Dict, List

import torch

from regionspot.tools.benchmarks.report import run_header
from regionspot.tools.benchmarks.timing import timed, torch_threads

PROG = "benchmark.py pairs"
SUMMARY = "each localizer's and vision-language model's cost per image, and each pair's FLOP-bound GPU-hours"

# name -> (family, builder key): localizers at their own input size
LOCALIZERS = {
    "SAM ViT-B": ("sam", "vit_b"), "SAM ViT-L": ("sam", "vit_l"), "SAM ViT-H": ("sam", "vit_h"),
    "SAM 2.1 Hiera-T": ("sam2", "hiera_t"), "SAM 2.1 Hiera-S": ("sam2", "hiera_s"),
    "SAM 2.1 Hiera-B+": ("sam2", "hiera_b+"), "SAM 2.1 Hiera-L": ("sam2", "hiera_l"),
}
# SAM-HQ's image encoder is SAM's ViT of the same size (module docstring).
SAM_HQ_ROWS = {"SAM-HQ ViT-B": "SAM ViT-B", "SAM-HQ ViT-L": "SAM ViT-L", "SAM-HQ ViT-H": "SAM ViT-H"}
# name -> (family, architecture, CLIP_INPUT_SIZE)
VL_MODELS = {
    "OpenAI CLIP ViT-B/16": ("openai_clip", "ViT-B/16", 224),
    "OpenAI CLIP ViT-L/14": ("openai_clip", "ViT-L/14", 224),
    "OpenAI CLIP ViT-L/14@336": ("openai_clip", "ViT-L/14@336px", 336),
    "OpenCLIP ViT-L-14 (DFN-2B / DataComp / MetaCLIP)": ("open_clip", "ViT-L-14", 224),
    "OpenCLIP ViT-H-14 (DFN-5B / LAION-2B / MetaCLIP)": ("open_clip", "ViT-H-14", 224),
    "OpenCLIP EVA02-L-14 (timm Eva)": ("open_clip", "EVA02-L-14", 224),
    "OpenCLIP ViT-SO400M-14-SigLIP (timm ViT)": ("open_clip", "ViT-SO400M-14-SigLIP", 224),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This subcommand's options, added to ``p``."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--localizers", default=",".join(LOCALIZERS),
                   help="comma-separated, among: " + ", ".join(LOCALIZERS))
    p.add_argument("--vl-models", default=",".join(VL_MODELS),
                   help="comma-separated, among: " + ", ".join(VL_MODELS))
    p.add_argument("--repeats", type=int, default=2, help="timed runs per model (median reported)")
    p.add_argument("--schedule-images", type=float, default=450_000 * 16,
                   help="images seen by training (stage 1: 450k iterations x 16)")
    p.add_argument("--cache-images", type=float, default=608_606,
                   help="training images whose image + flip fill the SAM-token cache (Objects365 v1 train)")
    p.add_argument("--sustained-tflops", type=float, default=400.0, help="assumed sustained GPU throughput")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None)
    p.add_argument("--debug", action="store_true")


def _names(text: str, known: Dict[str, object], option: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"{option}: unknown {unknown or 'none given'}; known: {', '.join(known)}")
    return names


def build_localizer(family: str, key: str):
    """Our localizer module around a random model of that architecture (float32, eval)."""
    from regionspot.modeling.position_tokens import SamPositionTokens
    from regionspot.testing.random_backbones import random_sam, random_sam2

    if family == "sam":
        return SamPositionTokens(random_sam(key), precision="float32")
    from regionspot.modeling.sam2_localizer import Sam2PositionTokens

    return Sam2PositionTokens(random_sam2(key), precision="float32")


def build_semantic_encoder(family: str, arch: str, size: int):
    """Our semantic encoder around a random VL model of that architecture (float32, eval)."""
    from regionspot.testing.random_backbones import random_vl_model

    spec = arch if family == "openai_clip" else f"open_clip:{arch}"
    return random_vl_model(spec, size, precision="float32", with_text=False)[0]


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> Dict[str, float]:
    """Median seconds of ``fn`` after one warm-up call, and its FLOPs (counted once)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        # FlopCounterMode sees no FLOPs in the fused CPU attention kernels (scaled_dot_product_attention's
        # flash path, nn.MultiheadAttention's batch-first fast path): count on the math path, whose matmuls it sees
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with counter, sdpa_kernel(SDPBackend.MATH):
                fn()  # also the warm-up
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        times = [timed(fn, device)[1] / 1000.0 for _ in range(repeats)]
    return {"seconds": statistics.median(times), "gflops": counter.get_total_flops() / 1e9}


def run(args: argparse.Namespace) -> int:
    """Measure every model of ``--localizers`` and ``--vl-models``, price every pair, write the
    JSON and the Markdown table next to it; returns 0.

    Raises:
        ValueError: an unknown model name.
    """
    from regionspot.environment import load_average
    from regionspot.io import atomic_write, write_json_atomic

    device = torch.device(args.device)
    load_before = load_average()
    localizers = _names(args.localizers, LOCALIZERS, "--localizers")
    vl_models = _names(args.vl_models, VL_MODELS, "--vl-models")
    image = torch.randint(0, 256, (3, 800, 1066), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows: Dict[str, Dict[str, object]] = {}
    for name in localizers:
        family, key = LOCALIZERS[name]
        localizer = build_localizer(family, key).to(device)
        figures = measure(lambda loc=localizer: loc.encode([image]), device, args.repeats)
        params = sum(p.numel() for p in localizer.sam.image_encoder.parameters())
        rows[name] = dict(kind="localizer", family=family, input_px=localizer.input_size, params_m=params / 1e6,
                          **figures)
        print(f"{name}: {figures['seconds']:.2f} s, {figures['gflops']:.0f} GFLOPs per image", flush=True)
        del localizer
    for hq, sam in SAM_HQ_ROWS.items():
        if sam in rows:
            rows[hq] = dict(rows[sam], family="sam_hq", same_encoder_as=sam)
    for name in vl_models:
        family, arch, size = VL_MODELS[name]
        encoder = build_semantic_encoder(family, arch, size).to(device)
        figures = measure(lambda enc=encoder: enc.encode([image]), device, args.repeats)
        params = sum(p.numel() for p in encoder.clip.visual.parameters())
        rows[name] = dict(kind="vl_model", family=family, input_px=size, params_m=params / 1e6, **figures)
        print(f"{name}: {figures['seconds']:.2f} s, {figures['gflops']:.0f} GFLOPs per image", flush=True)
        del encoder
    rate = args.sustained_tflops * 1e12
    pairs = []
    for loc in [n for n, r in rows.items() if r["kind"] == "localizer"]:
        for vl in [n for n, r in rows.items() if r["kind"] == "vl_model"]:
            cache = 2 * args.cache_images * rows[loc]["gflops"] * 1e9 / rate / 3600
            train = args.schedule_images * rows[vl]["gflops"] * 1e9 / rate / 3600
            pairs.append(dict(localizer=loc, vl_model=vl, cache_gpu_hours=cache, train_gpu_hours=train,
                              total_gpu_hours=cache + train))
    report = {
        **run_header(None, device),
        "load_average_before": load_before, "load_average_after": load_average(),
        "settings": {"image": [800, 1066], "dtype": "float32", "repeats": args.repeats,
                     "schedule_images": args.schedule_images, "cache_images": args.cache_images,
                     "sustained_tflops": args.sustained_tflops,
                     "note": "random weights at the real architectures; GPU-hours are FLOP-bound estimates, "
                             "not measurements"},
        "models": rows, "pairs": pairs,
    }
    output = args.output or os.path.join("output", "benchmark", f"pairs_{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_json_atomic(output, report)
    table = format_table(report)
    atomic_write(os.path.splitext(output)[0] + ".md", lambda f: f.write(table + "\n"), mode="w")
    print(table)
    print(f"wrote {output}")
    return 0


def format_table(report: Dict[str, object]) -> str:
    """The report as Markdown: models (time, GFLOPs, parameters) and pairs (GPU-hours)."""
    device = report["device"]
    lines = [f"Image encoders per image ({device['name']}, {report['threads']} threads, float32, 800 x 1066 "
             f"input resized by each model; random weights at the real architectures; load average "
             f"{report['load_average_before']} before, {report['load_average_after']} after):", "",
             "| model | family | input px | params (M) | GFLOPs | seconds |", "|---|---|---|---|---|---|"]
    for name, r in report["models"].items():
        same = f" (= {r['same_encoder_as']})" if r.get("same_encoder_as") else ""
        lines.append(f"| {name}{same} | {r['family']} | {r['input_px']} | {r['params_m']:.0f} | {r['gflops']:.0f} | "
                     f"{r['seconds']:.2f} |")
    s = report["settings"]
    lines += ["", f"FLOP-bound training cost of each pair at {s['sustained_tflops']:.0f} TFLOP/s sustained "
              f"(estimate): the SAM-token cache ({s['cache_images']:,.0f} images + flips through the localizer, "
              f"once) and training ({s['schedule_images']:,.0f} images through the VL model; the head's "
              "share is small):", "",
              "| localizer | vision-language model | cache GPU-h | training GPU-h | total GPU-h |",
              "|---|---|---|---|---|"]
    for p in report["pairs"]:
        lines.append(f"| {p['localizer']} | {p['vl_model']} | {p['cache_gpu_hours']:.2f} | "
                     f"{p['train_gpu_hours']:.2f} | {p['total_gpu_hours']:.2f} |")
    return "\n".join(lines)


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``regionspot-benchmark pairs``: returns the exit status (2 with one error line for bad options)."""
    from regionspot.cli import run_entry_point, setup_logging

    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    setup_logging()
    with torch_threads(args.threads):
        return run_entry_point(lambda: run(args), PROG, args.debug)
