"""Inference speed and memory of RegionSpot, stage by stage, on the CPU or a CUDA GPU.

    regionspot-benchmark stages [--device cpu|cuda] [--models small,bb,bl] [--num-boxes 1,10,100]
        [--repeats R] [--warmup W] [--precision P] [--attention A] [--output FILE] [--quick]

What is measured
----------------
For each model config (``--models``; ``small`` = tiny SAM + tiny CLIP, ``bb`` = SAM ViT-B +
CLIP ViT-B/16 at 224 px, ``bl`` = SAM ViT-B + CLIP ViT-L/14 at 224 px, ``bl336`` = the same
at 336 px) the model is built with RANDOM weights (``regionspot.testing.random_backbones``)
and run in eval mode under ``torch.no_grad()`` on one random uint8 test image, by default
800 x 1066 (what the test mapper makes of a 480 x 640 COCO/LVIS photo: short side 800), with
N random valid boxes for each N of ``--num-boxes``. Results are reported at the "original"
size (``--original-size``, default 480 x 640), as in evaluation. The image stays on the CPU
as the data loader gives it, so host-to-device copies count in the encoder stages.

Per stage: the model's own public recognition path (the one ``RegionSpot.forward``, the
predictor and the demo call), one method per stage, in order:

- ``sam_image_encoder``: ``model.localizer.encode`` (resize longest side to 1024, normalise, pad,
  SAM's image encoder); once per image, independent of N;
- ``clip_semantic``: ``model.semantic_encoder.encode`` (CLIP feature map); once per image;
- ``sam_mask_decoder``: ``model.prompt_boxes`` for the N boxes (prompt encoder + mask
  decoder, in chunks of ``--box-chunk-size``);
- ``head``: ``model.recognize`` with those prompts (the head and the logits);
- ``postprocess``: ``model.postprocess``: softmax over the vocabulary, top-k (box, class)
  pairs (TEST_TOPK = 900 by default), box rescaling and, unless ``--no-masks``, SAM's mask of
  each kept box pasted once at the original size (shared by the box's classes);
- ``end_to_end``: the whole ``model([input])`` call (ground-truth boxes as proposals), timed
  separately; ``images_per_second`` = 1000 / ``end_to_end_ms``. It also includes the input
  checks and the box copy, so it is slightly more than ``sum_of_stages_ms``. The last staged
  result must equal the end-to-end result (one path): the run fails otherwise.

Mask output memory (``mask_output``, once, with the first config): see
:mod:`regionspot.tools.benchmarks.mask_output`.

The encoders run at ``--precision`` (the model's ``ENCODER_PRECISION``: float32 by default
here; "auto" is float16 on CUDA, float32 on the CPU) with SAM's attention ``--attention``
(``SAM_ATTENTION``); ``settings.encoder_dtype`` records the precision used. The evaluation
loop end to end is ``regionspot-benchmark e2e`` (:mod:`regionspot.tools.benchmarks.e2e`).

Each time is the MEDIAN over ``repeats`` timed runs that follow ``warmup`` untimed runs; on
CUDA the device is synchronised before and after every stage, so a stage's time is its own.
All samples are kept in the JSON (``samples_ms``). Default repeats / warmup:

- CUDA: warmup 5, repeats 20 for every config;
- CPU: ``small`` warmup 1, repeats 5; ``bb``/``bl``/``bl336`` warmup 0, repeats 1. With warmup
  0 the stage timings include first-call costs (allocator, oneDNN primitive creation), so
  ``sum_of_stages_ms`` can exceed ``end_to_end_ms``; the end-to-end runs come after the stage
  runs and are warm.
- ``--quick`` (for the test): ``small`` only, N = 1, 10, warmup 1, repeats 2, image and
  original size 480 x 640 (and the mask-output image).
Explicit ``--repeats``/``--warmup`` apply to every config.

Text embeddings (the classifier, ``--vocabulary``, LVIS's 1203 classes by default, 81 prompt
templates each) are computed BEFORE timing, so they never count in the stages, and are timed
separately (``text_embeddings``). The full computation is C x 81 prompts through CLIP's text
tower: seconds on a GPU, hours on a CPU. ``--text-classes K`` encodes only the first K classes
(default: all on CUDA, 1 on the CPU); their time is then extrapolated linearly to C classes
(``estimated: true``; every prompt costs the same, the context is always 77 tokens), and
random unit vectors of the real shape (C, E) stand in for the classifier, so scoring and top-k
cost exactly what they cost with real embeddings. The model's disk cache is not used.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only, not the caching allocator's
reserve), reset per config: ``peak_bytes`` over the timed runs of the config, per N
``end_to_end_peak_bytes`` of the forward alone, ``weights_bytes`` after loading the model and
``text_embeddings.peak_bytes``. On the CPU there is no per-phase figure: ``peak_bytes`` is the
process's peak resident set size (``getrusage`` ``ru_maxrss``) read after the config, since the
process started, never reset; configs run smallest first, so it is mostly the current one's,
but it includes Python, the libraries and everything run before (``memory.kind`` says which).

Parameters: the trainable head and the frozen SAM (image encoder, prompt encoder, mask
decoder) and CLIP (image tower, rest = text tower and embeddings) of each config.

Output
------
A table is printed at the end; the JSON (written atomically, with the device, torch version,
threads and the load average before and after) goes to ``--output`` (default
``output/benchmark/benchmark_<device>.json``), the run's log (the project's lines) to
``<output>.log``. How to read the figures, and figures measured with it: ``docs/speed.md``.
Bad options end with one line ``benchmark.py stages: error: <message>`` and exit status 2
(``--debug``: with the traceback).
"""

import argparse
import gc
import os
import statistics
import time
from typing import Dict, List, Tuple

import torch

from regionspot.environment import peak_rss_bytes
from regionspot.testing.random_backbones import VARIANTS, random_regionspot
from regionspot.tools.benchmarks.mask_output import measure_mask_output, random_boxes
from regionspot.tools.benchmarks.report import add_run_arguments, run_header, save_progress
from regionspot.tools.benchmarks.report import format_table as format_rows
from regionspot.tools.benchmarks.timing import summary, timed, torch_threads
from regionspot.tools.common import output_path, resolve_device

SCHEMA = "regionspot-benchmark/1"
PROG = "benchmark.py stages"
SUMMARY = "inference stage by stage (encoders, decoder, head, post-processing), and mask-output memory"

# config name -> (SAM preset, CLIP preset, CLIP input size)
CONFIGS: Dict[str, Tuple[str, str, int]] = VARIANTS
DEFAULT_MODELS = "small,bb,bl"
STAGES_PER_IMAGE = ("sam_image_encoder", "clip_semantic")
STAGES_PER_BOX_SET = ("sam_mask_decoder", "head", "postprocess")


# ----------------------------------------------------------------------------- settings
def parse_size(text: str) -> Tuple[int, int]:
    """"800x1066" -> (800, 1066) as (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 800x1066, got {text!r}") from None
    if h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"image sides must be at least 16 pixels, got {text!r}")
    return h, w


def parse_int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def parse_models(text: str) -> List[str]:
    names = [v.strip().lower() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"models must be among {sorted(CONFIGS)}, got {text!r}")
    return list(dict.fromkeys(names))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This subcommand's options, added to ``p``."""
    add_run_arguments(p, output="JSON file (default output/benchmark/benchmark_<device>.json)",
                      quick="small model, N=1,10, warmup 1, repeats 2, 480x640 image (for tests)")
    p.add_argument("--models", type=parse_models, default=None, help=f"comma-separated, among "
                   f"{','.join(CONFIGS)} (default {DEFAULT_MODELS})")
    p.add_argument("--num-boxes", type=parse_int_list, default=None, help="N values (default 1,10,100)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default: per device, see above)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: per device, see above)")
    p.add_argument("--image-size", type=parse_size, default=None, help="HxW of the test image (default 800x1066)")
    p.add_argument("--original-size", type=parse_size, default=None,
                   help="HxW results are reported at (default 480x640)")
    p.add_argument("--precision", default="float32", choices=("auto", "float32", "bfloat16", "float16"),
                   help="precision of the frozen encoders (ENCODER_PRECISION; default float32)")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "official"),
                   help="SAM image-encoder attention (SAM_ATTENTION; default sdpa)")
    p.add_argument("--no-masks", action="store_true", help="mask_on=False: no mask pasting in post-processing")
    p.add_argument("--vocabulary", default="lvis", choices=("lvis", "coco", "objects365"),
                   help="classes to score against (default lvis, 1203 classes)")
    p.add_argument("--text-classes", type=int, default=None,
                   help="classes actually encoded to time the text embeddings; 0 = all "
                        "(default: all on cuda, 1 on cpu; fewer than all -> extrapolated)")
    p.add_argument("--test-topk", type=int, default=900, help="(box, class) pairs kept per image (default 900)")
    p.add_argument("--mask-image-size", type=parse_size, default=None,
                   help="HxW of the mask-output memory measurement (default 800x1333; --quick 480x640)")
    p.add_argument("--mask-pairs", type=int, default=900,
                   help="(box, class) pairs of the mask-output measurement (default 900)")
    p.add_argument("--box-chunk-size", type=int, default=64, help="boxes per mask-decoder call (default 64)")


def resolve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill the defaults: explicit flags > --quick > per-device defaults (a bad value ends in
    ``parser.error``: exit 2)."""
    args.device = resolve_device(args.device, parser)
    for name in ("repeats", "warmup", "text_classes", "test_topk", "box_chunk_size", "threads", "mask_pairs"):
        value = getattr(args, name)
        low = 1 if name in ("repeats", "test_topk", "box_chunk_size", "threads", "mask_pairs") else 0
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.quick:
        args.models = args.models or ["small"]
        args.num_boxes = args.num_boxes or [1, 10]
        args.repeats = 2 if args.repeats is None else args.repeats
        args.warmup = 1 if args.warmup is None else args.warmup
        args.image_size = args.image_size or (480, 640)
        args.original_size = args.original_size or (480, 640)
        args.mask_image_size = args.mask_image_size or (480, 640)
    args.models = args.models or parse_models(DEFAULT_MODELS)
    args.mask_image_size = args.mask_image_size or (800, 1333)
    args.num_boxes = args.num_boxes or [1, 10, 100]
    args.image_size = args.image_size or (800, 1066)
    args.original_size = args.original_size or (480, 640)
    if args.text_classes is None:
        args.text_classes = 0 if args.device == "cuda" else 1
    if args.output is None:
        args.output = output_path("benchmark", f"benchmark_{args.device}.json")
    return args


def repeats_for(config: str, args: argparse.Namespace) -> Tuple[int, int]:
    """(warmup, repeats) of a config: explicit flags, else the per-device defaults."""
    if args.device == "cuda":
        warmup, repeats = 5, 20
    elif config == "small":
        warmup, repeats = 1, 5
    else:
        warmup, repeats = 0, 1
    return (warmup if args.warmup is None else args.warmup,
            repeats if args.repeats is None else args.repeats)


# ----------------------------------------------------------------------------- helpers
def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(model) -> Dict[str, int]:
    sam, clip_model = model.localizer.sam, model.semantic_encoder.clip
    counts = {
        "head": count_params(model.head),
        "head_trainable": sum(p.numel() for p in model.head.parameters() if p.requires_grad),
        "sam_image_encoder": count_params(sam.image_encoder),
        # SAM 2 names them sam_prompt_encoder / sam_mask_decoder
        "sam_prompt_encoder": count_params(getattr(sam, "prompt_encoder", None) or sam.sam_prompt_encoder),
        "sam_mask_decoder": count_params(getattr(sam, "mask_decoder", None) or sam.sam_mask_decoder),
        "sam_total": count_params(sam),
        "clip_visual": count_params(clip_model.visual),
        "clip_total": count_params(clip_model),
    }
    counts["clip_text_and_rest"] = counts["clip_total"] - counts["clip_visual"]
    counts["frozen_total"] = counts["sam_total"] + counts["clip_total"]
    return counts


# ----------------------------------------------------------------------------- model
def build_model(config: str, args: argparse.Namespace, device: torch.device):
    from regionspot.modeling.postprocess import RecognitionProtocol

    model = random_regionspot(config, seed=args.seed, mask_on=not args.no_masks, encoder_precision=args.precision,
                              sam_attention=args.attention,
                              protocol=RecognitionProtocol(topk=args.test_topk), box_chunk_size=args.box_chunk_size)
    return model.to(device).eval()


def prepare_text_embeddings(model, class_names: List[str], args: argparse.Namespace,
                            device: torch.device) -> Dict[str, object]:
    """Compute (or, with --text-classes K < C, time K classes and stand in for) the classifier,
    and set it as the model's vocabulary."""
    from regionspot.modeling.text_embeddings import PROMPT_TEMPLATES

    names = list(class_names)
    num_classes, num_templates = len(names), len(PROMPT_TEMPLATES)
    k = num_classes if args.text_classes in (0, None) else min(args.text_classes, num_classes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if k == num_classes:
        # The model's own path (no disk cache): what computing the classifier costs.
        emb, ms = timed(lambda: model.encode_vocabulary(names), device)
        estimated, total_ms = False, ms
    else:
        _, ms = timed(lambda: model.encode_vocabulary(names[:k]), device)
        estimated, total_ms = True, ms * num_classes / k
        g = torch.Generator().manual_seed(args.seed)
        # Same shape, dtype and device as the real embeddings.
        emb = torch.nn.functional.normalize(
            torch.randn(num_classes, model.semantic_encoder.embed_dim, generator=g), dim=-1).to(device)
    model.set_vocabulary(names, text_embeddings=emb)
    assert model.text_embeddings.shape == (num_classes, model.semantic_encoder.embed_dim)
    return {
        "num_classes": num_classes, "num_templates": num_templates, "classes_encoded": k,
        "ms": ms, "estimated": estimated, "ms_all_classes": total_ms,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "note": ("all classes encoded through the model (no disk cache)" if not estimated else
                 f"first {k} classes encoded, time scaled x{num_classes / k:g} to all classes; "
                 f"random unit vectors ({num_classes}, {model.semantic_encoder.embed_dim}) used as the classifier"),
    }


# ----------------------------------------------------------------------------- measurements
def stage_pass(model, image: torch.Tensor, boxes: Dict[int, torch.Tensor], original: Tuple[int, int],
               device: torch.device) -> Tuple[Dict[str, float], Dict[int, Dict[str, float]], Dict[int, object]]:
    """One run of the recognition path stage by stage: the per-image stages once, then the
    per-box stages for every N. Returns ({stage: ms}, {N: {stage: ms}}, {N: Instances})."""
    from detectron2.structures import Boxes, Instances

    from regionspot.modeling.proposals.gt import proposals_from_ground_truth
    from regionspot.structures import ImageFeatures

    images = [image]
    with torch.no_grad():
        (embeddings, sizes), t_sam = timed(lambda: model.localizer.encode(images), device)
        semantic, t_clip = timed(lambda: model.semantic_encoder.encode(images), device)
        features = ImageFeatures.from_batch(images, embeddings, sizes, semantic)
        per_n, results = {}, {}
        for n, b in boxes.items():
            gt = Instances(tuple(image.shape[-2:]))
            gt.gt_boxes = Boxes(b)
            proposals = [proposals_from_ground_truth(gt)]
            prompts, t_dec = timed(
                lambda proposals=proposals: model.prompt_boxes(features, proposals, model.needs_sam_masks()), device)
            recognition, t_head = timed(
                lambda proposals=proposals, prompts=prompts: model.recognize(
                    features, proposals, model.text_embeddings, prompts)[0], device)
            result, t_post = timed(lambda recognition=recognition: model.postprocess(recognition, original), device)
            assert len(result) == min(model.protocol.topk, n * len(model.class_names))
            per_n[n] = {"sam_mask_decoder": t_dec, "head": t_head, "postprocess": t_post}
            results[n] = result
    return {"sam_image_encoder": t_sam, "clip_semantic": t_clip}, per_n, results


def same_detections(a, b) -> bool:
    """True when two Instances hold the same boxes, scores and classes (and masks)."""
    if len(a) != len(b) or not torch.equal(a.pred_classes, b.pred_classes):
        return False
    if not (torch.equal(a.scores, b.scores) and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)):
        return False
    if a.has("pred_masks") != b.has("pred_masks"):
        return False
    return not a.has("pred_masks") or torch.equal(a.pred_masks.tensor(), b.pred_masks.tensor())


def end_to_end_input(image: torch.Tensor, boxes: torch.Tensor, original: Tuple[int, int]) -> Dict:
    from detectron2.structures import Boxes, Instances

    instances = Instances(tuple(image.shape[-2:]))
    instances.gt_boxes = Boxes(boxes.cpu())
    return {"image": image, "instances": instances, "height": original[0], "width": original[1]}


def benchmark_config(config: str, args: argparse.Namespace, class_names: List[str],
                     device: torch.device, measure_masks: bool = False) -> Dict[str, object]:
    sam_preset, clip_preset, clip_size = CONFIGS[config]
    warmup, repeats = repeats_for(config, args)
    log = lambda msg: print(f"[{config}] {msg}", flush=True)  # noqa: E731

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = build_model(config, args, device)
    weights_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    log(f"built (SAM {sam_preset}, CLIP {clip_preset} @ {clip_size}) in {time.perf_counter() - start:.1f}s")

    text = prepare_text_embeddings(model, class_names, args, device)
    log(f"text embeddings for {text['num_classes']} classes: {text['ms_all_classes']:.0f} ms"
        + (f" (estimated from {text['classes_encoded']})" if text["estimated"] else ""))

    g = torch.Generator().manual_seed(args.seed)
    h, w = args.image_size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)  # stays on the CPU
    all_boxes = random_boxes(max(args.num_boxes), h, w, g)
    boxes = {n: all_boxes[:n].to(device) for n in args.num_boxes}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    image_samples: Dict[str, List[float]] = {s: [] for s in STAGES_PER_IMAGE}
    box_samples = {n: {s: [] for s in STAGES_PER_BOX_SET} for n in args.num_boxes}
    staged = {}
    for i in range(warmup + repeats):
        per_image, per_n, staged = stage_pass(model, image, boxes, args.original_size, device)
        if i >= warmup:
            for s, ms in per_image.items():
                image_samples[s].append(ms)
            for n, stages in per_n.items():
                for s, ms in stages.items():
                    box_samples[n][s].append(ms)
    log("stages: " + ", ".join(f"{s} {statistics.median(v):.1f} ms" for s, v in image_samples.items()))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0

    per_n_results = {}
    for n in args.num_boxes:
        inputs = [end_to_end_input(image, boxes[n], args.original_size)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        e2e = []
        with torch.no_grad():
            for i in range(warmup + repeats):
                outputs, ms = timed(lambda model=model, inputs=inputs: model(inputs), device)
                if i >= warmup:
                    e2e.append(ms)
        n_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        if not same_detections(outputs[0]["instances"], staged[n]):
            raise RuntimeError(f"[{config}] N={n}: the staged path and model.forward give different detections")
        peak = max(peak, n_peak or 0)
        row = {f"{s}_ms": statistics.median(image_samples[s]) for s in STAGES_PER_IMAGE}
        row.update({f"{s}_ms": statistics.median(box_samples[n][s]) for s in STAGES_PER_BOX_SET})
        row["sum_of_stages_ms"] = sum(row[f"{s}_ms"] for s in STAGES_PER_IMAGE + STAGES_PER_BOX_SET)
        row["end_to_end_ms"] = statistics.median(e2e)
        row["images_per_second"] = 1000.0 / row["end_to_end_ms"]
        row["end_to_end_peak_bytes"] = n_peak
        row["num_detections"] = len(outputs[0]["instances"])
        row["samples_ms"] = {**{s: box_samples[n][s] for s in STAGES_PER_BOX_SET}, "end_to_end": e2e}
        per_n_results[str(n)] = row
        log(f"N={n}: end-to-end {row['end_to_end_ms']:.1f} ms ({row['images_per_second']:.2f} img/s)")

    if device.type == "cuda":
        memory = {"kind": "cuda_max_memory_allocated", "peak_bytes": peak, "weights_bytes": weights_bytes,
                  "note": "torch.cuda.max_memory_allocated over this config's timed stage and end-to-end "
                          "runs (reset per config, text embeddings excluded; see text_embeddings.peak_bytes)"}
    else:
        memory = {"kind": "cpu_process_peak_rss", "peak_bytes": peak_rss_bytes(), "weights_bytes": None,
                  "note": "ru_maxrss of the whole benchmark process since it started, read after this "
                          "config; never reset, so it also covers earlier configs, Python and libraries"}
    result = {
        "sam": sam_preset, "clip": clip_preset, "clip_input_size": clip_size,
        "warmup": warmup, "repeats": repeats,
        "params": parameter_counts(model),
        "text_embeddings": text,
        "image_stages_ms": {s: summary(v) for s, v in image_samples.items()},
        "num_boxes": per_n_results,
        "memory": memory,
        "wall_seconds": time.perf_counter() - start,
    }
    if measure_masks:
        result["mask_output"] = measure_mask_output(model, args, device)
        log("mask output at {} pairs: ".format(args.mask_pairs) + "; ".join(
            f"{c['num_boxes']} boxes -> {c['distinct_masks']} masks, {c['mask_bytes'] / 2 ** 20:.1f} MiB "
            f"(one per pair: {c['per_pair_layout_bytes'] / 2 ** 20:.0f} MiB), "
            f"peak +{c['peak_increase_bytes'] / 2 ** 20:.0f} MiB"
            for c in result["mask_output"]["cases"]))
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- report
def format_table(report: Dict[str, object]) -> str:
    """The report as the plain-text table printed at the end: per config and N the median stage
    times, their sum, the end-to-end time, images/s and memory; then a line per config."""
    mem_kind = "peak CUDA alloc" if report["device"]["type"] == "cuda" else "process peak RSS"
    head = ("config", "N", "SAM enc", "CLIP", "decoder", "head", "post", "sum", "e2e ms", "img/s", "mem MiB")
    rows = [head]
    for config, res in report["configs"].items():
        for n, row in res["num_boxes"].items():
            mem = row["end_to_end_peak_bytes"] if row["end_to_end_peak_bytes"] is not None \
                else res["memory"]["peak_bytes"]
            rows.append((config, n) + tuple(f"{row[f'{s}_ms']:.1f}" for s in STAGES_PER_IMAGE + STAGES_PER_BOX_SET)
                        + (f"{row['sum_of_stages_ms']:.1f}", f"{row['end_to_end_ms']:.1f}",
                           f"{row['images_per_second']:.3g}", f"{mem / 2 ** 20:.0f}"))
    lines = format_rows(rows)
    s = report["settings"]
    out = [f"RegionSpot benchmark on {report['device']['name']} ({report['device']['type']}), torch "
           f"{report['torch_version']}, {report['threads']} threads, image {s['image_size'][0]}x{s['image_size'][1]}"
           f" -> original {s['original_size'][0]}x{s['original_size'][1]}, encoders {s['encoder_dtype']} "
           f"({s['sam_attention']} attention), "
           f"masks {s['mask_on']}, {s['num_classes']} classes, top-k {s['test_topk']}",
           "times: median ms (SAM enc/CLIP per image; decoder/head/post for N boxes); "
           f"mem: {mem_kind} (MiB); RANDOM weights: speed only", ""] + lines + [""]
    for config, res in report["configs"].items():
        p, t = res["params"], res["text_embeddings"]
        out.append(f"{config}: warmup {res['warmup']}, repeats {res['repeats']}; params head {p['head']:,} "
                   f"(trainable), frozen SAM {p['sam_total']:,} + CLIP {p['clip_total']:,}; text embeddings "
                   f"for {t['num_classes']} classes x {t['num_templates']} templates: "
                   f"{t['ms_all_classes'] / 1000:.2f} s{' (estimated)' if t['estimated'] else ''}")
    return "\n".join(out)


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``regionspot-benchmark stages``: resolve the defaults, log to ``<output>.log`` and run;
    returns the exit status (2 for bad options, in one ``benchmark.py stages:`` error line; the
    traceback too with ``--debug``)."""
    from regionspot.cli import run_entry_point, setup_logging

    setup_logging()  # the console; the log file next to the JSON once its path is resolved
    args = resolve_settings(args, parser)
    setup_logging(args.output + ".log")
    with torch_threads(args.threads):  # main() may be called in-process (tests): threads restored
        return run_entry_point(lambda: run_benchmark(args), PROG, args.debug)


def run_benchmark(args: argparse.Namespace) -> int:
    """The stage-by-stage benchmark of ``args.models`` (see the module docstring); writes the JSON."""
    device = torch.device(args.device)
    from regionspot.modeling.precision import resolve_encoder_precision

    encoder_dtype = str(resolve_encoder_precision(args.precision, device)).replace("torch.", "")
    from regionspot.data.vocabularies import get_vocabulary

    class_names = get_vocabulary(args.vocabulary)
    report: Dict[str, object] = {
        **run_header(SCHEMA, device),
        "settings": {
            "image_size": list(args.image_size), "original_size": list(args.original_size),
            "num_boxes": list(args.num_boxes), "models": list(args.models),
            "repeats": args.repeats, "warmup": args.warmup,
            "repeats_note": "null = per-device default; the values used are in each config",
            "precision": args.precision, "encoder_dtype": encoder_dtype, "sam_attention": args.attention,
            "mask_on": not args.no_masks, "vocabulary": args.vocabulary, "num_classes": len(class_names),
            "mask_image_size": list(args.mask_image_size), "mask_pairs": args.mask_pairs,
            "test_topk": args.test_topk, "box_chunk_size": args.box_chunk_size, "seed": args.seed,
            "quick": bool(args.quick),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "timing": "median over `repeats` runs after `warmup` untimed runs, time.perf_counter, device "
                      "synchronised before and after each stage; model in eval mode under torch.no_grad",
            "weights": "random (regionspot.testing.random_backbones): speed is representative, accuracy is not",
        },
        "configs": {},
    }
    for i, config in enumerate(args.models):
        report["configs"][config] = benchmark_config(config, args, class_names, device,
                                                     measure_masks=(i == 0 and not args.no_masks))
        save_progress(args.output, report)  # partial results survive a later failure
    print("\n" + format_table(report), flush=True)
    print(f"\nwrote {os.path.abspath(args.output)}", flush=True)
    return 0

