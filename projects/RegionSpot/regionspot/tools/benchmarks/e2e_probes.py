"""What ``regionspot-benchmark e2e`` (:mod:`regionspot.tools.benchmarks.e2e`) measures the
evaluation loop with, without replacing anything of the model: wrappers of the data loader and
the evaluator that time them, forward hooks that record the head's tokens and logits, and the
profiler totals of the model's stage labels.
"""

import time
from typing import Dict, List, Optional

import torch

from regionspot.tools.common import synchronize


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
