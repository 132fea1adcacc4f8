"""End-to-end mode of ``tools/benchmark.py`` (``--end-to-end``): the real evaluation loop.

    python tools/benchmark.py --end-to-end [--models bb] [--images 16] [--boxes-per-image 10]
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
figures come from the profiler, hooks (:class:`Recorder`) and wrappers of the loader and the
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

import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from regionspot.tools.common import CONFIGS, REPO, load_config, synchronize

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

# Image sizes (H, W) of COCO/LVIS val photos: the common ones.
PHOTO_SIZES = [(480, 640), (427, 640), (640, 480), (640, 427), (375, 500), (500, 375), (424, 640),
               (612, 612), (480, 640), (427, 640)]

STAGES = ("data_wait", "sam_image_encoder", "clip_semantic", "proposals", "sam_prompt_decoder", "head",
          "postprocess", "evaluator_process")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``benchmark.py --end-to-end ARGS`` (this mode's options are :mod:`regionspot.tools.benchmark`'s);
    returns the exit status."""
    import sys

    from regionspot.tools import benchmark

    argv = list(sys.argv[1:] if argv is None else argv)
    return benchmark.main(["--end-to-end"] + [a for a in argv if a != "--end-to-end"])


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


# ----------------------------------------------------------------------------- workload
def synthetic_photo(rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: smooth colour fields plus mild noise, so JPEG sizes and decoding cost are
    those of photos rather than of white noise."""
    low = rng.rand(max(2, height // 32), max(2, width // 32), 3).astype(np.float32)
    field = torch.nn.functional.interpolate(torch.from_numpy(low).permute(2, 0, 1)[None], size=(height, width),
                                            mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    noise = rng.randn(height, width, 3).astype(np.float32) * 0.04
    return (np.clip(field + noise, 0, 1) * 255).astype(np.uint8)


def random_xywh(rng: np.random.RandomState, height: int, width: int, n: int) -> List[List[float]]:
    """n boxes [x, y, w, h] inside the image, each side >= 8 px, sizes spread like LVIS's."""
    out = []
    for _ in range(n):
        w = float(np.clip(width * rng.beta(1.2, 3.0), 8, width))
        h = float(np.clip(height * rng.beta(1.2, 3.0), 8, height))
        x = float(rng.uniform(0, width - w))
        y = float(rng.uniform(0, height - h))
        out.append([round(x, 2), round(y, 2), round(w, 2), round(h, 2)])
    return out


def write_synthetic_lvis(folder: str, num_images: int, boxes_per_image: int, seed: int = 0) -> str:
    """Write (or reuse) the synthetic LVIS-val-like workload: ``folder/images/*.jpg`` and
    ``folder/lvis_synthetic.json`` (LVIS format: 1203 categories with frequencies, per-image
    ``neg_category_ids``/``not_exhaustive_category_ids``). Reused when a manifest says the same
    size, boxes and seed. Returns the json path."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
    from PIL import Image

    from regionspot.data.vocabularies import get_vocabulary
    from regionspot.io import write_json_atomic

    json_path = os.path.join(folder, "lvis_synthetic.json")
    manifest_path = os.path.join(folder, "manifest.json")
    manifest = {"num_images": num_images, "boxes_per_image": boxes_per_image, "seed": seed, "version": 2}
    if os.path.isfile(json_path) and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            if json.load(f) == manifest:
                return json_path
    names = get_vocabulary("lvis")  # LVIS v1's names in category-id order (ids 1..1203)
    frequencies = [c["frequency"] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]
    rng = np.random.RandomState(seed)
    categories = [{"id": i + 1, "name": n, "frequency": f, "synset": n, "image_count": 1, "instance_count": 1}
                  for i, (n, f) in enumerate(zip(names, frequencies))]
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        h, w = PHOTO_SIZES[rng.randint(len(PHOTO_SIZES))]
        file_name = f"{i + 1:012d}.jpg"
        Image.fromarray(synthetic_photo(rng, h, w)).save(os.path.join(folder, "images", file_name), quality=90)
        cats = rng.randint(1, len(names) + 1, size=boxes_per_image)
        negatives = sorted(set(rng.randint(1, len(names) + 1, size=8).tolist()) - set(cats.tolist()))
        images.append({"id": i + 1, "height": h, "width": w, "file_name": file_name,
                       "neg_category_ids": negatives, "not_exhaustive_category_ids": []})
        for box, cat in zip(random_xywh(rng, h, w, boxes_per_image), cats.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0,
                                "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2],
                                                  box[1] + box[3], box[0], box[1] + box[3]]]})
    write_json_atomic(json_path, {"images": images, "annotations": annotations, "categories": categories,
                                  "info": {"description": "synthetic LVIS-val-like workload (random content)"},
                                  "licenses": []})
    write_json_atomic(manifest_path, manifest)
    return json_path


# ----------------------------------------------------------------------------- instrumentation
class Clock:
    """Wall time summed per key, measured outside the model (data wait, evaluator ``process``);
    the device is synchronised around each measurement on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: Dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + seconds


class TimedLoader:
    """A data loader whose waits for the next batch are added to ``clock`` as ``data_wait``.

    Args:
        loader: an iterable of batches with ``len``.
        clock: where the waits go (None: not timed).
        limit: at most this many batches.
    """

    def __init__(self, loader, clock: Optional[Clock], limit: Optional[int] = None):
        self.loader, self.clock, self.limit = loader, clock, limit

    def __len__(self):
        return len(self.loader) if self.limit is None else min(self.limit, len(self.loader))

    def __iter__(self):
        iterator = iter(self.loader)
        for _ in range(len(self)):
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            if self.clock is not None:
                self.clock.add("data_wait", time.perf_counter() - start)
            yield batch


class TimedEvaluator:
    """A Detectron2 ``DatasetEvaluator`` around another: ``process`` time goes to ``clock`` as
    ``evaluator_process``; ``loop_end`` is when ``evaluate`` was called (the end of the timed loop)
    and ``evaluate_s`` how long it took. (A wrapper object: nothing of the evaluator is replaced.)"""

    def __init__(self, evaluator, clock: Clock):
        self.evaluator, self.clock = evaluator, clock
        self.loop_end: Optional[float] = None
        self.evaluate_s: Optional[float] = None

    def reset(self):
        self.evaluator.reset()

    def process(self, inputs, outputs):
        synchronize(self.clock.device)
        start = time.perf_counter()
        self.evaluator.process(inputs, outputs)
        synchronize(self.clock.device)
        self.clock.add("evaluator_process", time.perf_counter() - start)

    def evaluate(self):
        synchronize(self.clock.device)
        self.loop_end = time.perf_counter()
        result = self.evaluator.evaluate()
        self.evaluate_s = time.perf_counter() - self.loop_end
        return result


class Recorder:
    """Per image (by ``image_id``): the position-aware tokens (N, T) and the logits (N, C) of its
    boxes, taken with hooks (nothing of the model is replaced):

    - a forward pre-hook on the model notes the batch's image ids;
    - a forward hook on ``model.head`` (called as ``head(tokens (B, N, T), semantic (B, L, D),
      padding_mask (B, N) bool or None)``, returning (B, N, E) region embeddings) takes each
      image's tokens and turns its embeddings into logits with
      :func:`regionspot.modeling.head.region_logits` and ``model.logit_scale``.

    The head sees only the images that have boxes: when a batch has fewer head rows than
    images, the rows are matched to the images whose ``instances`` are not empty.

    Args:
        text_embeddings: (C, E) the vocabulary's text embeddings the model was given.
    """

    def __init__(self, text_embeddings: torch.Tensor):
        self.text_embeddings = text_embeddings
        self.tokens: Dict[int, torch.Tensor] = {}
        self.logits: Dict[int, torch.Tensor] = {}
        self._ids: List[int] = []
        self._with_boxes: List[int] = []

    def attach(self, model) -> List:
        """Register the hooks on ``model``; returns their handles (``remove()`` each when done)."""
        from regionspot.modeling.head import region_logits

        def note_images(module, args):
            batched_inputs = args[0]
            self._ids = [x["image_id"] for x in batched_inputs]
            self._with_boxes = [x["image_id"] for x in batched_inputs
                                if "instances" not in x or len(x["instances"]) > 0]

        def record_head(module, args, output):
            tokens, padding_mask = args[0], (args[2] if len(args) > 2 else None)
            ids = self._ids if output.shape[0] == len(self._ids) else self._with_boxes
            if len(ids) != output.shape[0]:
                raise RuntimeError(f"the head ran on {output.shape[0]} images of a batch of {len(self._ids)} "
                                   f"({len(self._with_boxes)} with boxes): cannot tell which is which")
            for b, image_id in enumerate(ids):
                n = tokens.shape[1] if padding_mask is None else int((~padding_mask[b]).sum())
                embeddings = output[b, :n].detach().float()
                self.tokens[image_id] = tokens[b, :n].detach().float().cpu()
                self.logits[image_id] = region_logits(
                    embeddings, self.text_embeddings.to(embeddings.device), model.logit_scale).cpu()

        return [model.register_forward_pre_hook(note_images), model.head.register_forward_hook(record_head)]


def _event_seconds(event, device: torch.device) -> float:
    """An averaged profiler event's total time in seconds: the device's on CUDA (the stage's
    kernels), else the CPU's (inclusive of everything under the label)."""
    if device.type == "cuda":
        us = getattr(event, "device_time_total", None)
        us = getattr(event, "cuda_time_total", 0.0) if us is None else us
        if us:
            return us / 1e6
    return event.cpu_time_total / 1e6


def profile_stages(model, loader, device: torch.device, recorder: Optional[Recorder] = None) -> Dict[str, float]:
    """Seconds spent in each model stage over one pass of ``loader``, from the ``record_function``
    labels the model emits (:data:`regionspot.modeling.meta_arch.STAGE_LABELS`), measured with
    ``torch.profiler.profile``; the recorder's hooks record tokens and logits during the pass.

    Returns:
        ``{stage: seconds}`` for every stage of ``STAGE_LABELS`` (0.0 for a stage that did not
        run) and ``"profiled_pass_s"``: the pass's wall time (profiler overhead included).
    """
    from torch.profiler import ProfilerActivity, profile

    from regionspot.modeling.profiling import STAGE_LABELS

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    handles = recorder.attach(model) if recorder is not None else []
    try:
        synchronize(device)
        start = time.perf_counter()
        with profile(activities=activities) as prof, torch.no_grad():
            for batch in loader:
                model(batch)
            synchronize(device)
        wall = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    events = {e.key: e for e in prof.key_averages()}
    stages = {stage: _event_seconds(events[label], device) if label in events else 0.0
              for stage, label in STAGE_LABELS.items()}
    stages["profiled_pass_s"] = wall
    return stages


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
    return load_config(os.path.join(CONFIGS, "Base-RegionSpot.yaml"), [
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


def peak_memory(device: torch.device) -> int:
    from regionspot.environment import peak_rss_bytes

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()


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
                    synchronize(device)
                    start = time.perf_counter()
                    model(inputs)
                    synchronize(device)
                    times.append(time.perf_counter() - start)
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


def run_end_to_end(args) -> int:
    """Entry point of ``tools/benchmark.py --end-to-end`` (arguments parsed there)."""
    import datetime
    import platform

    from regionspot.data.datasets.user import register_dataset
    from regionspot.data.vocabularies import vocabulary_by_name
    from regionspot.environment import device_name, git_commit, load_average
    from regionspot.io import write_json_atomic

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
    from regionspot.testing.random_backbones import VARIANTS, random_vl_model

    _, vl_spec, clip_size = VARIANTS[args.model]
    embed_dim = random_vl_model(vl_spec, clip_size, with_text=False)[0].embed_dim
    text_embeddings = torch.nn.functional.normalize(torch.randn(len(class_names), embed_dim, generator=g), dim=-1)

    report = {
        "schema": "regionspot-benchmark-e2e/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": device_name(device), "cpu_count": os.cpu_count(),
                   "cuda_version": torch.version.cuda if device.type == "cuda" else None},
        "torch_version": torch.__version__, "python_version": platform.python_version(),
        "git_commit": git_commit(REPO), "threads": torch.get_num_threads(),
        "load_average_before": load_average(),
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
        report["load_average_after"] = load_average()
        write_json_atomic(args.output, report)
        extra = ""
        if "speedup" in result:
            d = result["deviation"]
            extra = (f", x{result['speedup']:.2f} vs {reference[0]}; max |d tokens| {d['tokens_max_abs']:.2e}, "
                     f"|d logits| {d['logits_max_abs']:.2e}, top-1 changed {d['top1_changed']}/{d['boxes']}")
        print(f"[e2e {args.model}] {name}: {result['images_per_second']:.3f} images/s "
              f"(warm-up {result['warmup_s']:.1f}s){extra}", flush=True)
    if args.find_max_batch and device.type == "cuda":
        report["max_batch"] = find_max_batch(args, dataset, class_names, text_embeddings, work_dir)
        write_json_atomic(args.output, report)
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
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = report["settings"]
    return "\n".join([f"\nRegionSpot end to end: {s['model']} on {report['device']['name']}, {s['images']} images of "
                      f"{s['dataset']}, {s['num_classes']} classes (RANDOM weights: speed only)", *lines])
