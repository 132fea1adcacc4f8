"""The evaluation loop end to end (``regionspot-benchmark e2e``): plain vs fast paths in one process.

    regionspot-benchmark e2e [--models bb] [--images 16] [--boxes-per-image 10]
        [--batch-size 4] [--runs plain,fast,fast_bf16] [--compile|--no-compile] [--dataset NAME]
        [--device cpu|cuda] [--workers W] [--find-max-batch] [--output FILE] [--quick]

What runs
---------
A workload of ``--images`` images: by default synthetic LVIS-val-like JPEG photos (COCO-like
sizes, smooth random content, ``--boxes-per-image`` ground-truth boxes each, LVIS v1's 1203
categories with their r/c/f frequencies), written once under ``--data-dir`` and registered as
an LVIS-format dataset; or any registered dataset (``--dataset regionspot_sample``: the
bundled real photos). Every run goes through what ``train_net.py --eval-only`` runs:
:func:`~regionspot.data.build.build_batched_test_loader` with the test mapper and
``--workers`` workers, the model (random weights of ``--models``; ground-truth boxes as
proposals, box AP, ``MASK_ON`` off), the RegionSpot LVIS evaluator and Detectron2's
``inference_on_dataset``. No model method is replaced: the model runs as built, and the
figures come from the profiler, hooks (:class:`~.e2e_probes.Recorder`) and wrappers of the loader and the
evaluator. The runs share the process, the images, the weights (same seed) and
the text embeddings (random unit vectors of the vocabulary's shape), so their ratios hold on a
noisy machine; each run builds its own model.

Runs (``--runs``), each a set of switches:

- ``plain``: batch 1, float32, official SAM attention, SAM's and CLIP's resizes inside the
  model: the path before these switches existed;
- ``sdpa``, ``batched``, ``compile``, ``bf16``, ``fp16``: ``plain`` with one switch (SAM
  attention through SDPA; ``--batch-size`` images per batch with the resizes in the loader
  workers; ``torch.compile`` of the encoders; encoders in bfloat16 / float16);
- ``fast``: all exact switches together (batch, SDPA, worker resizes, and ``torch.compile``
  unless ``--no-compile``), float32;
- ``fast_bf16``, ``fast_fp16``: ``fast`` with the encoders in bfloat16 / float16.

Defaults: CPU ``plain,fast,fast_bf16``; CUDA ``plain,fast,fast_bf16,fast_fp16``.

Figures per run (JSON, written atomically after every run)
----------------------------------------------------------
- ``images_per_second``: timed images / wall time of the timed loop (data loading, model,
  evaluator ``process``; the final ``evaluate`` is timed apart as ``evaluate_s``);
- ``warmup_s``: an untimed pass over the first batch of the run's size first (allocator,
  oneDNN/cuDNN set-up, and the compilation of ``torch.compile`` runs);
- ``stages_s``: seconds in each stage summed over all images. The model's stages (SAM image
  encoder, CLIP, proposals, SAM prompt encoder + decoder, head, post-processing) come from a
  second, profiled pass over the same images: ``torch.profiler`` totals of the
  ``record_function`` labels the model emits (``regionspot.modeling.meta_arch.STAGE_LABELS``;
  CPU time on the CPU, device time on CUDA), so the timed loop runs unprofiled. Data wait and
  the evaluator's ``process`` are measured around the loader and the evaluator in the timed
  loop. ``profiled_pass_s`` is the profiled pass's wall time (profiler overhead included);
- ``peak_memory_bytes`` (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS so far);
- ``results``: the evaluator's AP table (random weights: NOT accuracy; compared between runs);
- ``deviation`` against the first run (``plain``): the largest absolute change in the
  position-aware tokens and in the logits over all boxes (recorded in the profiled pass by a
  forward hook on the head), the top-1 label changes (count of
  boxes), and the largest change in the AP figures;
- ``speedup``: images/s over the first run's.

On CUDA, ``--find-max-batch`` also doubles the batch of the ``fast`` run until it does not fit
(or ``--max-batch``) and records the largest that fits with its peak memory and images/s.
"""

import argparse
import logging
import os
import time
from typing import Dict, Sequence

import torch

from regionspot.testing.random_backbones import VARIANTS
from regionspot.tools.benchmarks.e2e_probes import Clock, Recorder, TimedEvaluator, TimedLoader, profile_stages
from regionspot.tools.benchmarks.e2e_workload import write_synthetic_lvis
from regionspot.tools.benchmarks.report import add_run_arguments, format_table, run_header, save_progress
from regionspot.tools.benchmarks.timing import peak_memory, timed, torch_threads
from regionspot.tools.common import load_config, output_path, resolve_device, synchronize

SCHEMA = "regionspot-benchmark-e2e/1"
PROG = "benchmark.py e2e"
SUMMARY = "the evaluation loop end to end (loader, model, evaluator), plain vs fast paths, with deviations"

# Run presets: switches on top of "plain".
PLAIN = dict(batch=1, precision="float32", attention="official", compile=False, worker_resize=False)
RUN_SWITCHES: Dict[str, Dict[str, object]] = {
    "plain": {},
    "sdpa": dict(attention="sdpa"),
    "batched": dict(batch=None, worker_resize=True),
    "compile": dict(compile=True),
    "bf16": dict(precision="bfloat16"),
    "fp16": dict(precision="float16"),
    "fast": dict(batch=None, attention="sdpa", worker_resize=True, compile=None),
    "fast_bf16": dict(batch=None, attention="sdpa", worker_resize=True, compile=None,
                      precision="bfloat16"),
    "fast_fp16": dict(batch=None, attention="sdpa", worker_resize=True, compile=None,
                      precision="float16"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This subcommand's options, added to ``p``."""
    add_run_arguments(p, output="JSON file (default output/benchmark/benchmark_e2e_<model>_<device>.json)",
                      quick="small model, 4 images, batch 2, no torch.compile (for tests)")
    p.add_argument("--models", default=None,
                   help=f"the one model variant to run, among {','.join(VARIANTS)} (default: bb; --quick small)")
    p.add_argument("--images", type=int, default=None, help="images of the workload (default: CPU 8, CUDA 1024)")
    p.add_argument("--boxes-per-image", type=int, default=10, help="ground-truth boxes per synthetic image (10)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="TEST.IMS_PER_BATCH of the batched runs "
                        "(default: CPU 1, as TEST.IMS_PER_BATCH 0 gives there, CUDA 32)")
    p.add_argument("--runs", default=None, help="comma-separated runs (default: CPU plain,fast,fast_bf16; CUDA "
                                                "plain,fast,fast_bf16,fast_fp16); see above")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the encoders in the fast runs (default; the compilation is in the "
                        "untimed warm-up)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--dataset", default=None, help="a registered dataset instead of the synthetic one "
                                                   "(e.g. regionspot_sample)")
    p.add_argument("--workers", type=int, default=None, help="data-loader workers (default: CPU 1, CUDA 8)")
    p.add_argument("--data-dir", default=None, help="where the synthetic workload is written (and reused)")
    p.add_argument("--find-max-batch", action="store_true", help="CUDA: the largest fast batch that fits")
    p.add_argument("--max-batch", type=int, default=512, help="upper bound of --find-max-batch")
    p.add_argument("--quiet", action="store_true", help="no per-batch progress lines from Detectron2")


def resolve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill the defaults: explicit flags > --quick > per device (a bad value ends in
    ``parser.error``: exit 2)."""
    args.device = resolve_device(args.device, parser)
    cuda = args.device == "cuda"
    models = [m.strip().lower() for m in (args.models or ("small" if args.quick else "bb")).split(",") if m.strip()]
    if len(models) != 1:
        parser.error("e2e measures one model per run: give one of --models")
    if models[0] not in VARIANTS:
        parser.error(f"models must be among {sorted(VARIANTS)}, got {args.models!r}")
    args.model = models[0]
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.quick:
        args.images = args.images or 4
        args.batch_size = args.batch_size or 2
        args.compile = False if args.compile is None else args.compile
    args.images = args.images or (1024 if cuda else 8)
    args.batch_size = args.batch_size or (32 if cuda else 1)
    args.workers = (8 if cuda else 1) if args.workers is None else args.workers
    args.compile = True if args.compile is None else args.compile
    runs = args.runs or ("plain,fast,fast_bf16,fast_fp16" if cuda else "plain,fast,fast_bf16")
    args.runs = [r.strip() for r in runs.split(",") if r.strip()]
    for name in args.runs:
        if name not in RUN_SWITCHES:
            parser.error(f"--runs: unknown run {name!r}; runs: {', '.join(RUN_SWITCHES)}")
    for name in ("images", "batch_size", "boxes_per_image"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    args.data_dir = args.data_dir or output_path("benchmark", "e2e_data")
    if args.output is None:
        args.output = output_path("benchmark", f"benchmark_e2e_{args.model}_{args.device}.json")
    return args


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``regionspot-benchmark e2e``: resolve the defaults, log to ``<output>.log`` (the project's
    and Detectron2's lines) and run; returns the exit status (2 for bad options, in one
    ``benchmark.py e2e:`` error line; the traceback too with ``--debug``)."""
    from regionspot.cli import run_entry_point, setup_logging

    setup_logging()  # the console; the log file next to the JSON once its path is resolved
    args = resolve_settings(args, parser)
    setup_logging(args.output + ".log")
    with torch_threads(args.threads):  # main() may be called in-process (tests): threads restored
        return run_entry_point(lambda: run_end_to_end(args), PROG, args.debug)


def run_settings(name: str, batch_size: int, compile_default: bool) -> Dict[str, object]:
    """The switches of a named run (see the module docstring).

    Raises:
        ValueError: an unknown run name.
    """
    if name not in RUN_SWITCHES:
        raise ValueError(f"unknown run {name!r}; runs: {', '.join(RUN_SWITCHES)}")
    settings = dict(PLAIN)
    for key, value in RUN_SWITCHES[name].items():
        if value is None:
            value = batch_size if key == "batch" else compile_default
        settings[key] = value
    return settings


# ----------------------------------------------------------------------------- runs
def build_cfg(variant: str, settings: Dict[str, object], device: str, workers: int, output_dir: str):
    """A RegionSpot config for a run: ``configs/Base-RegionSpot.yaml`` with the variant's SAM
    and CLIP input sizes and the run's switches as overrides, through the project's one config
    loader (checked; ``MODEL.MASK_ON`` off: box AP, SAM's masks are not decoded).

    Raises:
        ToolError: a switch the config refuses.
    """
    from regionspot.testing.random_backbones import SAM_PRESETS, VARIANTS, localizer_family

    localizer_spec, _, clip_size = VARIANTS[variant]
    family, sam_preset = localizer_family(localizer_spec)
    # the loader's SAM resize (long side): SAM's and SAM-HQ's input; SAM 2 squashes to its square itself
    sam_input = int(SAM_PRESETS[sam_preset].get("img_size", 1024)) if family != "sam2" else 1024
    return load_config("Base-RegionSpot.yaml", [
        "MODEL.REGIONSPOT.CLIP_INPUT_SIZE", int(clip_size),
        "MODEL.REGIONSPOT.ENCODER_PRECISION", settings["precision"],
        "MODEL.REGIONSPOT.SAM_ATTENTION", settings["attention"],
        "MODEL.REGIONSPOT.COMPILE", bool(settings["compile"]),
        "MODEL.REGIONSPOT.LOADER_RESIZE", bool(settings["worker_resize"]),
        "MODEL.REGIONSPOT.SAM_INPUT_SIZE", sam_input,
        "MODEL.MASK_ON", False,
        "MODEL.DEVICE", device,
        "TEST.IMS_PER_BATCH", int(settings["batch"]),
        "DATALOADER.NUM_WORKERS", int(workers),
        "OUTPUT_DIR", output_dir,
    ])


def build_model(cfg, variant: str, seed: int, text_embeddings: torch.Tensor, class_names: Sequence[str]):
    """The variant with random weights (same seed, same weights in every run), the run's
    switches (all in ``cfg``: ``MODEL.MASK_ON`` is off, so SAM decodes no masks for box AP), and
    the given vocabulary ((C, E) ``text_embeddings`` for ``class_names``)."""
    from regionspot.modeling.postprocess import RecognitionProtocol
    from regionspot.testing.random_backbones import random_regionspot

    rs = cfg.MODEL.REGIONSPOT
    model = random_regionspot(variant, seed=seed, mask_on=False, protocol=RecognitionProtocol.from_config(cfg),
                              encoder_precision=rs.ENCODER_PRECISION, sam_attention=rs.SAM_ATTENTION,
                              box_chunk_size=rs.BOX_CHUNK_SIZE)
    model = model.to(cfg.MODEL.DEVICE).eval()
    if rs.COMPILE:
        model.compile_encoders()
    model.set_vocabulary(class_names, text_embeddings=text_embeddings, allow_duplicates=True)
    return model


def run_once(name: str, settings: Dict[str, object], args, dataset: str, class_names: Sequence[str],
             text_embeddings: torch.Tensor, work_dir: str):
    """One run: an untimed warm-up batch, the timed pass through ``inference_on_dataset`` (no
    profiler), the evaluation, then a profiled pass over the same images for the stage times and
    the recorded tokens and logits.

    Returns:
        (the run's figures (see the module docstring), its :class:`Recorder`).
    """
    from detectron2.data import get_detection_dataset_dicts
    from detectron2.evaluation import inference_on_dataset

    from regionspot.data.build import build_batched_test_loader
    from regionspot.data.mapper import RegionSpotDatasetMapper
    from regionspot.engine.trainer import RegionSpotTrainer

    device = torch.device(args.device)
    cfg = build_cfg(args.model, settings, args.device, args.workers, os.path.join(work_dir, name))
    built = time.perf_counter()
    model = build_model(cfg, args.model, args.seed, text_embeddings, class_names)
    build_s = time.perf_counter() - built
    dicts = get_detection_dataset_dicts([dataset], filter_empty=False)[:args.images]
    mapper = RegionSpotDatasetMapper(cfg, False)

    # Warm-up: the first images, untimed (compilation happens here).
    warmup_images = min(int(settings["batch"]), len(dicts))  # one batch of the run's size
    start = time.perf_counter()
    with torch.no_grad():
        for batch in build_batched_test_loader(cfg, dicts[:warmup_images], mapper):
            model(batch)
    synchronize(device)
    warmup_s = time.perf_counter() - start

    # The timed pass: what train_net.py --eval-only runs, with no profiler and no hooks.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = Clock(device)
    loader = TimedLoader(build_batched_test_loader(cfg, dicts, mapper), clock)
    evaluator = TimedEvaluator(
        RegionSpotTrainer.build_evaluator(cfg, dataset, output_folder=os.path.join(work_dir, name)), clock)
    quiet = logging.getLogger("detectron2.evaluation.evaluator")
    level = quiet.level
    quiet.setLevel(logging.WARNING if args.quiet else level)
    try:
        start = time.perf_counter()
        results = inference_on_dataset(model, loader, evaluator)
    finally:
        quiet.setLevel(level)
    loop_s = evaluator.loop_end - start
    peak = peak_memory(device)

    # The profiled pass: the model's stage labels, and the tokens and logits for the deviations.
    recorder = Recorder(model.text_embeddings)
    profiled = profile_stages(model, build_batched_test_loader(cfg, dicts, mapper), device, recorder)
    profiled_pass_s = profiled.pop("profiled_pass_s")
    stages = {"data_wait": clock.totals.get("data_wait", 0.0), **profiled,
              "evaluator_process": clock.totals.get("evaluator_process", 0.0)}
    out = {
        "settings": settings,
        "images": len(dicts),
        "build_s": build_s,
        "warmup_images": warmup_images,
        "warmup_s": warmup_s,
        "loop_s": loop_s,
        "images_per_second": len(dicts) / loop_s,
        "evaluate_s": evaluator.evaluate_s,
        "stages_s": stages,
        "stages_ms_per_image": {k: 1000.0 * v / len(dicts) for k, v in stages.items()},
        "stages_source": {"data_wait": "timed pass", "evaluator_process": "timed pass",
                          **{k: "profiled pass (torch.profiler, record_function labels)" for k in profiled}},
        "profiled_pass_s": profiled_pass_s,
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda_max_memory_allocated (timed loop)" if device.type == "cuda" else
                            "cpu_process_peak_rss (whole process so far)",
        "results": {task: {k: v for k, v in metrics.items()} for task, metrics in results.items()},
    }
    del model
    return out, recorder


def deviation(reference: Recorder, other: Recorder, ref_results: Dict, results: Dict) -> Dict[str, object]:
    """Largest changes of ``other`` against ``reference`` over all boxes of all images."""
    ids = sorted(reference.tokens)
    if sorted(other.tokens) != ids:
        raise RuntimeError("the runs did not see the same images")
    tokens = max((float((other.tokens[i] - reference.tokens[i]).abs().max()) if reference.tokens[i].numel() else 0.0)
                 for i in ids)
    logits = max((float((other.logits[i] - reference.logits[i]).abs().max()) if reference.logits[i].numel() else 0.0)
                 for i in ids)
    changed = sum(int((other.logits[i].argmax(1) != reference.logits[i].argmax(1)).sum()) for i in ids)
    boxes = sum(reference.logits[i].shape[0] for i in ids)
    ap = {}
    for task, metrics in ref_results.items():
        for key, value in metrics.items():
            other_value = results.get(task, {}).get(key)
            if isinstance(value, (int, float)) and isinstance(other_value, (int, float)):
                both_nan = value != value and other_value != other_value
                ap[f"{task}/{key}"] = 0.0 if both_nan else abs(other_value - value)
    token_scale = max(float(reference.tokens[i].abs().max()) for i in ids if reference.tokens[i].numel())
    logit_scale = max(float(reference.logits[i].abs().max()) for i in ids if reference.logits[i].numel())
    return {"tokens_max_abs": tokens, "tokens_max_abs_reference": token_scale,
            "logits_max_abs": logits, "logits_max_abs_reference": logit_scale,
            "top1_changed": changed, "boxes": boxes,
            "ap_max_abs": max(ap.values()) if ap else 0.0, "ap_abs": ap}


def find_max_batch(args, dataset, class_names, text_embeddings, work_dir) -> Dict[str, object]:
    """CUDA: the largest ``fast`` batch that fits, doubling from ``--batch-size``."""
    from detectron2.data import get_detection_dataset_dicts

    from regionspot.data.build import build_batched_test_loader
    from regionspot.data.mapper import RegionSpotDatasetMapper

    device = torch.device(args.device)
    tried, batch = [], args.batch_size
    dicts = get_detection_dataset_dicts([dataset], filter_empty=False)
    while batch <= args.max_batch:
        settings = run_settings("fast", batch, args.compile)
        cfg = build_cfg(args.model, settings, args.device, args.workers, os.path.join(work_dir, f"batch{batch}"))
        model = build_model(cfg, args.model, args.seed, text_embeddings, class_names)
        chosen = (dicts * ((2 * batch) // max(len(dicts), 1) + 1))[:2 * batch]
        loader = build_batched_test_loader(cfg, chosen, RegionSpotDatasetMapper(cfg, False))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.no_grad():
                times = []
                for inputs in loader:
                    _, ms = timed(lambda inputs=inputs, model=model: model(inputs), device)
                    times.append(ms / 1000.0)
            tried.append({"batch": batch, "fits": True, "peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                          "images_per_second_model_only": batch / times[-1]})
        except torch.cuda.OutOfMemoryError:
            tried.append({"batch": batch, "fits": False})
            del model
            torch.cuda.empty_cache()
            break
        del model
        batch *= 2
    fitting = [t for t in tried if t["fits"]]
    return {"tried": tried, "largest_batch_that_fits": fitting[-1]["batch"] if fitting else None,
            "note": "two batches of the fast run per size; model time of the second (warm) batch"}


def run_end_to_end(args: argparse.Namespace) -> int:
    """The runs of ``args.runs`` one after the other (see the module docstring), the JSON written
    after each; returns 0.

    Raises:
        ToolError, ValueError: a bad dataset or switch (one error line through ``run_command``).
    """
    from regionspot.data.datasets.user import register_dataset
    from regionspot.data.vocabularies import vocabulary_by_name
    from regionspot.testing.random_backbones import random_vl_model

    device = torch.device(args.device)
    json_path = None
    if args.dataset:
        dataset = args.dataset
    else:
        json_path = write_synthetic_lvis(args.data_dir, args.images, args.boxes_per_image, args.seed)
        dataset = f"regionspot_e2e_synthetic_{args.images}x{args.boxes_per_image}"
        from detectron2.data import DatasetCatalog

        if dataset not in DatasetCatalog.list():
            register_dataset(dataset, json_path, os.path.join(args.data_dir, "images"))
    class_names = vocabulary_by_name(dataset)
    g = torch.Generator().manual_seed(args.seed)
    _, vl_spec, clip_size = VARIANTS[args.model]
    embed_dim = random_vl_model(vl_spec, clip_size, with_text=False)[0].embed_dim
    text_embeddings = torch.nn.functional.normalize(torch.randn(len(class_names), embed_dim, generator=g), dim=-1)

    report = {
        **run_header(SCHEMA, device),
        "settings": {"model": args.model, "dataset": dataset, "data_json": json_path, "images": args.images,
                     "boxes_per_image": args.boxes_per_image if not args.dataset else None,
                     "num_classes": len(class_names), "batch_size": args.batch_size, "workers": args.workers,
                     "warmup": "one batch of each run's size, untimed", "compile": args.compile,
                     "runs": list(args.runs),
                     "seed": args.seed,
                     "weights": "random (regionspot.testing.random_backbones): speed is representative; AP "
                                "figures are NOT accuracy, only compared between runs"},
        "runs": {},
    }
    reference = None
    work_dir = os.path.join(os.path.dirname(os.path.abspath(args.output)), "e2e_runs")
    for name in args.runs:
        settings = run_settings(name, args.batch_size, args.compile)
        print(f"[e2e {args.model}] run {name}: {settings}", flush=True)
        result, recorder = run_once(name, settings, args, dataset, class_names, text_embeddings, work_dir)
        if reference is None:
            reference = (name, recorder, result)
        else:
            result["deviation"] = deviation(reference[1], recorder, reference[2]["results"], result["results"])
            result["deviation"]["against"] = reference[0]
            result["speedup"] = result["images_per_second"] / reference[2]["images_per_second"]
        report["runs"][name] = result
        save_progress(args.output, report)
        extra = ""
        if "speedup" in result:
            d = result["deviation"]
            extra = (f", x{result['speedup']:.2f} vs {reference[0]}; max |d tokens| {d['tokens_max_abs']:.2e}, "
                     f"|d logits| {d['logits_max_abs']:.2e}, top-1 changed {d['top1_changed']}/{d['boxes']}")
        print(f"[e2e {args.model}] {name}: {result['images_per_second']:.3f} images/s "
              f"(warm-up {result['warmup_s']:.1f}s){extra}", flush=True)
    if args.find_max_batch and device.type == "cuda":
        report["max_batch"] = find_max_batch(args, dataset, class_names, text_embeddings, work_dir)
        save_progress(args.output, report)
    print(format_e2e_table(report), flush=True)
    print(f"\nwrote {os.path.abspath(args.output)}", flush=True)
    return 0


def format_e2e_table(report: Dict[str, object]) -> str:
    """A plain-text table of the runs."""
    head = ["run", "batch", "dtype", "attn", "compile", "img/s", "speedup", "SAM enc ms", "CLIP ms",
            "decoder ms", "data ms", "|d tok|", "|d logit|", "top-1 chg"]
    rows = [head]
    for name, r in report["runs"].items():
        s, per, d = r["settings"], r["stages_ms_per_image"], r.get("deviation")
        rows.append([name, s["batch"], s["precision"], s["attention"],
                     s["compile"], f"{r['images_per_second']:.3g}", f"{r.get('speedup', 1.0):.2f}",
                     f"{per['sam_image_encoder']:.0f}", f"{per['clip_semantic']:.0f}",
                     f"{per['sam_prompt_decoder']:.0f}", f"{per['data_wait']:.0f}",
                     f"{d['tokens_max_abs']:.1e}" if d else "-", f"{d['logits_max_abs']:.1e}" if d else "-",
                     f"{d['top1_changed']}/{d['boxes']}" if d else "-"])
    lines = format_table(rows)
    s = report["settings"]
    return "\n".join([f"\nRegionSpot end to end: {s['model']} on {report['device']['name']}, {s['images']} images of "
                      f"{s['dataset']}, {s['num_classes']} classes (RANDOM weights: speed only)", *lines])
