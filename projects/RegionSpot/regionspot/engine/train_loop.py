"""The training step in mixed precision, and the progress line.

``MixedPrecisionTrainer`` is Detectron2's ``SimpleTrainer`` step under ``torch.autocast``:
bfloat16 needs no loss scaling (and also runs on CPUs); float16 scales the loss
(``torch.amp.GradScaler``) and unscales the gradients before the optimizer step, so that
full-model gradient clipping (inside the optimizer's ``step``) sees true gradients, which
Detectron2 0.6's ``AMPTrainer`` does not do. Only the head trains; the frozen encoders keep
their own precision (``ENCODER_PRECISION``).

``ProgressWriter`` logs one line per period: iteration, iterations/s, images/s, ETA, the losses
and the learning rate, in Detectron2's event storage style.
"""

import datetime
import logging
import time

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventWriter, get_event_storage

PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class MixedPrecisionTrainer(SimpleTrainer):
    """One training step under autocast (see the module docstring).

    Args:
        model, data_loader, optimizer: as Detectron2's ``SimpleTrainer``.
        precision: "bfloat16" or "float16" (``SOLVER.AMP.PRECISION``).

    Raises:
        ValueError: an unknown precision, or float16 on a model that is not on CUDA.
    """

    def __init__(self, model, data_loader, optimizer, precision: str = "bfloat16"):
        if precision not in PRECISIONS:
            raise ValueError(f"SOLVER.AMP.PRECISION must be one of {tuple(PRECISIONS)}, got {precision!r}")
        super().__init__(model, data_loader, optimizer)
        self.device_type = next(model.parameters()).device.type
        if precision == "float16" and self.device_type != "cuda":
            raise ValueError("SOLVER.AMP.PRECISION float16 needs a CUDA device; use bfloat16 on the CPU")
        self.dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler("cuda") if precision == "float16" else None

    def run_step(self):
        assert self.model.training, "[MixedPrecisionTrainer] the model was switched to eval mode"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        if self.scaler is None:
            losses.backward()
            self._write_metrics(loss_dict, data_time)
            self.optimizer.step()
            return
        self.scaler.scale(losses).backward()
        self.scaler.unscale_(self.optimizer)  # clipping in optimizer.step sees unscaled gradients
        self._write_metrics(loss_dict, data_time)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state_dict(self):
        state = super().state_dict()
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.scaler is not None and "grad_scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["grad_scaler"])


class ProgressWriter(EventWriter):
    """Log ``iter i/N  it/s  images/s  ETA  losses  lr`` from Detectron2's event storage.

    Args:
        max_iter: the last iteration.
        images_per_iteration: images of one iteration over all processes (``SOLVER.IMS_PER_BATCH``).
        window: iterations the rates are averaged over.
    """

    def __init__(self, max_iter: int, images_per_iteration: int, window: int = 20):
        self.logger = logging.getLogger("regionspot.train")
        self.max_iter, self.images, self.window = max_iter, images_per_iteration, window

    def write(self):
        storage = get_event_storage()
        iteration = storage.iter
        if iteration == self.max_iter:
            return
        try:
            seconds = storage.history("time").median(self.window)  # IterationTimer's per-step time
        except KeyError:  # the first iterations are not timed
            return
        rate = 1.0 / seconds if seconds > 0 else float("inf")
        eta = datetime.timedelta(seconds=int(seconds * (self.max_iter - iteration - 1)))
        losses = "  ".join(f"{k}: {v.median(self.window):.4g}" for k, v in storage.histories().items() if "loss" in k)
        try:
            lr = f"lr: {storage.history('lr').latest():.3g}"
        except KeyError:
            lr = ""
        self.logger.info(f"iter {iteration + 1}/{self.max_iter}  {rate:.2f} it/s  {rate * self.images:.1f} images/s  "
                         f"ETA {eta}  {losses}  {lr}")
