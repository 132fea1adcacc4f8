"""ONNX Runtime vs the PyTorch path on the CPU, side by side in one run; the export's time.

    regionspot-benchmark onnx [--variant small|bb|bl] [--boxes 100] [--repeats 5] [--threads 2]
                              [--output output/benchmark_onnx.json]

With RANDOM weights in the official formats at the variant's real sizes (``small``: the sample's
tiny SAM and CLIP; ``bb``: SAM ViT-B + CLIP ViT-B/16; ``bl``: SAM ViT-B + CLIP ViT-L/14; written
once under ``--weights-dir``), on a bundled photo (scikit-image's astronaut, 512 x 512), the
config's test resize (``configs/regionspot_sample_cpu.yaml``: short side 448):

1. ``regionspot-export onnx``'s work (:func:`regionspot.onnx_export.export_onnx`), timed per part;
2. per image (``set_image``: both image encoders) and per ``--boxes`` boxes (``predict`` with an
   8-class vocabulary: prompt decoder, head, masks), medians of ``--repeats`` calls, the paths
   taking turns within each repeat, for:
   the PyTorch predictor in float32 (exact), the PyTorch predictor with ``ENCODER_PRECISION
   bfloat16``, and :class:`regionspot.deploy.OnnxRegionSpotPredictor` on ONNX Runtime's CPU
   provider (and on every GPU provider the installed onnxruntime has, with ``--gpu-providers``);
3. the deviation of each from the float32 PyTorch path (largest probability difference, top-1
   agreement) on those boxes.

torch and ONNX Runtime get the same thread count (``--threads``). docs/speed.md quotes the table.
"""

import argparse
import os
import statistics
import tempfile
import time
from typing import Dict

SUMMARY = "ONNX Runtime (regionspot.deploy) vs the PyTorch CPU path, float32 and bfloat16, and the export time"

VARIANTS = {"small": ("tiny", "tiny"), "bb": ("vit_b", "ViT-B/16"), "bl": ("vit_b", "ViT-L/14")}
VOCABULARY = ["person", "cat", "dog", "cup", "rocket", "motorcycle", "flower", "building"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options, added to ``parser``."""
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="small",
                        help="model sizes (random weights): small (the sample's), bb or bl")
    parser.add_argument("--boxes", type=int, default=100, help="boxes per predict() call (default 100)")
    parser.add_argument("--repeats", type=int, default=5, help="calls per measurement (medians)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of torch and of ONNX Runtime")
    parser.add_argument("--gpu-providers", action="store_true",
                        help="also time the GPU execution providers the installed onnxruntime has")
    parser.add_argument("--weights-dir", default=os.path.join("output", "benchmark_onnx_weights"),
                        help="where the random weights are written once (default under the current folder)")
    parser.add_argument("--output", default=os.path.join("output", "benchmark_onnx.json"),
                        help="JSON file for the figures")


def _predictor(args, precision: str):
    import torch

    from regionspot.config import load_config
    from regionspot.model_zoo import get_config_file
    from regionspot.predictor import RegionSpotPredictor
    from regionspot.testing.random_backbones import write_random_clip, write_random_sam

    sam_preset, clip_preset = VARIANTS[args.variant]
    folder = os.path.join(args.weights_dir, args.variant)
    os.makedirs(folder, exist_ok=True)
    sam = os.path.join(folder, "sam.pth")
    clip = os.path.join(folder, "clip.pt")
    if not os.path.exists(sam):
        write_random_sam(sam, sam_preset, seed=args.seed)
    if not os.path.exists(clip):
        write_random_clip(clip, clip_preset, seed=args.seed)
    size = 256 if sam_preset == "tiny" else 1024
    cfg = load_config(get_config_file("regionspot_sample_cpu.yaml"), [
        "MODEL.REGIONSPOT.SAM_WEIGHTS", sam, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip,
        "MODEL.REGIONSPOT.SAM_INPUT_SIZE", str(size), "MODEL.REGIONSPOT.TEXT_CACHE_DIR", os.path.join(folder, "text"),
        "MODEL.REGIONSPOT.ENCODER_PRECISION", precision, "MODEL.DEVICE", "cpu"])
    torch.manual_seed(args.seed)
    return RegionSpotPredictor.from_config(cfg, allow_untrained_head=True)


def _interleaved(paths, image, boxes, repeats: int) -> Dict[str, Dict[str, float]]:
    """Medians of ``set_image`` and ``predict`` per path, the paths taking turns within every
    repeat (so that a change of the machine's load falls on all of them alike); one warm-up call
    each first (first-call allocations, ONNX Runtime's graph preparation)."""
    samples = {name: {"set_image_ms": [], "predict_ms": []} for name, _ in paths}
    for repeat in range(repeats + 1):
        for name, predictor in paths:
            for key, call in (("set_image_ms", lambda p=predictor: p.set_image(image)),
                              ("predict_ms", lambda p=predictor: p.predict(boxes, vocabulary=VOCABULARY))):
                start = time.perf_counter()
                call()
                if repeat:
                    samples[name][key].append((time.perf_counter() - start) * 1000.0)
    return {name: {key: round(statistics.median(values), 2) for key, values in figures.items()}
            for name, figures in samples.items()}


def run(args) -> int:
    """Export, then time each path; writes the JSON report and prints a table."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from regionspot.data.datasets.regionspot_sample import load_sample_image
    from regionspot.deploy import OnnxRegionSpotPredictor
    from regionspot.onnx_export import export_onnx
    from regionspot.tools.benchmarks.report import format_table, run_header, save_progress

    torch.set_num_threads(args.threads)
    report = run_header("regionspot-benchmark-onnx/1", "cpu")
    report.update({"variant": args.variant, "boxes": args.boxes, "repeats": args.repeats,
                   "onnxruntime_version": ort.__version__, "paths": {}})
    image = np.ascontiguousarray(load_sample_image("skimage.data.astronaut"))
    rng = np.random.default_rng(args.seed)
    x0, y0 = rng.uniform(0, 400, args.boxes), rng.uniform(0, 400, args.boxes)
    boxes = np.stack([x0, y0, x0 + rng.uniform(8, 112, args.boxes), y0 + rng.uniform(8, 112, args.boxes)], 1)
    exact = _predictor(args, "float32")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = export_onnx(exact, os.path.join(tmp, "onnx"))
        report["export_s"] = round(time.perf_counter() - start, 2)
        report["export_parts_s"] = manifest["export_seconds"]
        report["exporters"] = manifest["exporters"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        providers = [["CPUExecutionProvider"]]
        if args.gpu_providers:
            providers += [[p, "CPUExecutionProvider"] for p in ort.get_available_providers()
                          if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
        paths = [("pytorch float32", exact), ("pytorch bfloat16", _predictor(args, "bfloat16"))]
        paths += [(f"onnxruntime {p[0].replace('ExecutionProvider', '')}",
                   OnnxRegionSpotPredictor(os.path.join(tmp, "onnx"), providers=p, session_options=options))
                  for p in providers]
        exact.set_image(image)
        reference = exact.predict(boxes, vocabulary=VOCABULARY)
        timings = _interleaved(paths, image, boxes, args.repeats)
        for name, predictor in paths:
            figures = timings[name]
            predictor.set_image(image)
            out = predictor.predict(boxes, vocabulary=VOCABULARY)
            probabilities = np.asarray(out.probabilities, dtype=np.float32)
            figures["max_probability_difference"] = float(np.abs(probabilities - reference.probabilities.numpy()).max())
            figures["top1_agreement"] = float(np.mean(np.asarray(out.classes) == reference.classes.numpy()))
            report["paths"][name] = figures
        save_progress(args.output, report)
    rows = [["path", "set_image ms", f"predict {args.boxes} boxes ms", "max |dp|", "top-1 agree"]]
    rows += [[name, f["set_image_ms"], f["predict_ms"], f"{f['max_probability_difference']:.1e}",
              f"{f['top1_agreement']:.3f}"] for name, f in report["paths"].items()]
    print(f"variant {args.variant}, {args.threads} threads, export {report['export_s']} s")
    print("\n".join(format_table(rows)))
    print(f"wrote {args.output}")
    return 0


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``regionspot-benchmark onnx``: returns the exit status (2 for a bad option)."""
    if args.repeats < 1 or args.boxes < 1 or args.threads < 1:
        parser.error("--repeats, --boxes and --threads must be at least 1")
    args.seed = 0
    return run(args)
