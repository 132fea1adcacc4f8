"""Detectron2's ``LVISEvaluator`` (and ``COCOEvaluator``, for COCO-format datasets) for
RegionSpot's outputs (box AP and SAM-mask AP).

RegionSpot keeps up to ``TEST_TOPK`` (box, class) pairs per image and a box may carry many
classes, each a detection with the same mask (:class:`~regionspot.modeling.postprocess.SharedMasks`).
Detectron2's evaluator would RLE-encode the mask once per detection; here each distinct mask
is encoded once and its RLE shared by the detections of that box, so neither time nor memory
grows with the number of classes a box carries. Everything else (gathering across ranks, the
LVIS API's AP, APr/APc/APf, the 300-detections cap) is Detectron2's and the LVIS API's own.
The protocol the numbers were made with is logged right before the evaluator's AP tables.

The LVIS evaluator has two backends (``TEST.EVALUATOR_BACKEND``): "lvis" (default, the
reference: Detectron2's ``LVISEvaluator`` running the LVIS API, unchanged) and
"faster_coco_eval" (:mod:`.fast_lvis`: the same numbers from faster-coco-eval's C++ LVIS
mode, in seconds instead of minutes on LVIS v1 val).
"""

import itertools
import json
import logging
import os
from typing import List, Optional

import numpy as np
import torch

from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json

from ..io import atomic_write
from ..modeling.postprocess import SharedMasks
from .fast_lvis import LVISFormatError, check_evaluator_backend, check_lvis_format, evaluate_predictions_on_lvis_fast

logger = logging.getLogger(__name__)


def encode_masks_once(masks) -> List[dict]:
    """COCO RLEs of K detections' masks, each distinct bitmap encoded once.

    Args:
        masks: :class:`SharedMasks` or a (K, H, W) bool tensor, on the CPU.

    Returns:
        K RLE dicts (``{"size": [H, W], "counts": str}``); detections of one box share one dict.
    """
    import pycocotools.mask as mask_util

    if not isinstance(masks, SharedMasks):
        masks = SharedMasks.from_tensor(torch.as_tensor(masks).bool())
    masks = masks.compact()
    rles = []
    for bitmap in masks.bitmaps:
        rle = mask_util.encode(np.asfortranarray(bitmap.numpy().astype(np.uint8)[:, :, None]))[0]
        rle["counts"] = rle["counts"].decode("utf-8")
        rles.append(rle)
    return [rles[i] for i in masks.index.tolist()]


class _RegionSpotOutputs:
    """``process`` and ``evaluate`` shared by the LVIS and COCO evaluators: each distinct mask
    encoded once; the protocol logged before the AP tables."""

    protocol = ""

    def process(self, inputs, outputs):
        for inp, output in zip(inputs, outputs):
            prediction = {"image_id": inp["image_id"]}
            if "instances" in output:
                instances = output["instances"].to(self._cpu_device)
                masks = instances.get("pred_masks") if instances.has("pred_masks") else None
                if masks is not None:
                    instances.remove("pred_masks")
                results = instances_to_coco_json(instances, inp["image_id"])
                if masks is not None:
                    for result, rle in zip(results, encode_masks_once(masks)):
                        result["segmentation"] = rle
                prediction["instances"] = results
            self._predictions.append(prediction)

    def evaluate(self):
        if self.protocol:
            logger.info("Evaluating with protocol: %s", self.protocol)
        return super().evaluate()


class RegionSpotLVISEvaluator(_RegionSpotOutputs, LVISEvaluator):
    """``LVISEvaluator`` that encodes each kept box's mask once and states the protocol, with a
    choice of the code that computes the AP.

    Args:
        dataset_name, tasks, distributed, output_dir, max_dets_per_image: as Detectron2's
            ``LVISEvaluator`` (``max_dets_per_image``: LVIS's 300 by default).
        protocol: the one-line protocol description, logged before the AP tables.
        backend: ``TEST.EVALUATOR_BACKEND``: "lvis" (default: the LVIS API through Detectron2,
            exactly as before) or "faster_coco_eval" (:func:`.fast_lvis.evaluate_predictions_on_lvis_fast`:
            the same AP, AP50, AP75, APs/m/l, APr/c/f in percent, much faster).

    Raises:
        ValueError: an unknown ``backend`` (the message names ``TEST.EVALUATOR_BACKEND``).
        LVISFormatError: "faster_coco_eval" on a dataset that is not LVIS-format (no category
            frequencies or no per-image negative / not-exhaustive category lists).
        ImportError: "faster_coco_eval" without the faster-coco-eval package.
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 max_dets_per_image: Optional[int] = None, protocol: str = "", backend: str = "lvis"):
        self.backend = check_evaluator_backend(backend)
        if backend == "faster_coco_eval":
            _require_faster_coco_eval()
        super().__init__(dataset_name, tasks, distributed, output_dir, max_dets_per_image=max_dets_per_image)
        self.protocol = protocol
        if backend == "faster_coco_eval":
            check_lvis_format(self._lvis_api.dataset, name=f"dataset {dataset_name!r} ({self._metadata.json_file})")

    def evaluate(self):
        logger.info("LVIS evaluation backend (TEST.EVALUATOR_BACKEND): %s", self.backend)
        return super().evaluate()

    def _eval_predictions(self, predictions):
        if self.backend == "lvis":
            return super()._eval_predictions(predictions)
        # What Detectron2's LVISEvaluator._eval_predictions does (dataset category ids back,
        # the results file, then AP per task), with the fast AP and an atomic results file.
        lvis_results = list(itertools.chain.from_iterable(p["instances"] for p in predictions))
        tasks = self._tasks or self._tasks_from_predictions(lvis_results)
        to_dataset_id = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if to_dataset_id is not None:
            to_dataset_id = {contiguous: dataset_id for dataset_id, contiguous in to_dataset_id.items()}
            for result in lvis_results:
                result["category_id"] = to_dataset_id[result["category_id"]]
        else:  # LVIS categories: contiguous index + 1
            for result in lvis_results:
                result["category_id"] += 1
        if self._output_dir:
            path = os.path.join(self._output_dir, "lvis_instances_results.json")
            logger.info("Saving results to %s", path)
            atomic_write(path, lambda f: json.dump(lvis_results, f), "w")  # never a half-written file
        if not self._do_evaluation:
            logger.info("Annotations are not available for evaluation.")
            return
        for task in sorted(tasks):
            self._results[task] = evaluate_predictions_on_lvis_fast(
                self._lvis_api, lvis_results, task, max_dets_per_image=self._max_dets_per_image,
                class_names=self._metadata.get("thing_classes"))


def _require_faster_coco_eval():
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError as e:
        raise ImportError("TEST.EVALUATOR_BACKEND 'faster_coco_eval' needs the faster-coco-eval package "
                          "(pip install faster-coco-eval); or use the default backend 'lvis'") from e


class RegionSpotCOCOEvaluator(_RegionSpotOutputs, COCOEvaluator):
    """``COCOEvaluator`` (COCO-format datasets: AP, AP50, AP75, APs/m/l; no APr/APc/APf, which
    need LVIS's category frequencies) with the same mask handling and protocol line.

    Args:
        dataset_name, tasks, distributed, output_dir, max_dets_per_image: as Detectron2's
            ``COCOEvaluator``.
        protocol: the one-line protocol description, logged before the AP tables.
        backend: ``TEST.EVALUATOR_BACKEND``; only the default "lvis" (the reference code path,
            here Detectron2's pycocotools evaluation) applies to COCO-format data.

    Raises:
        ValueError: an unknown ``backend`` (the message names ``TEST.EVALUATOR_BACKEND``).
        LVISFormatError: "faster_coco_eval", which is an LVIS backend (it needs LVIS's
            category frequencies and negative category lists).
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 max_dets_per_image: Optional[int] = None, protocol: str = "", backend: str = "lvis"):
        if check_evaluator_backend(backend) == "faster_coco_eval":
            raise LVISFormatError(
                f"TEST.EVALUATOR_BACKEND 'faster_coco_eval' computes LVIS AP and needs an LVIS-format dataset "
                f"(category frequencies, per-image negative categories); {dataset_name!r} is COCO-format "
                f"(evaluator_type 'coco'); use TEST.EVALUATOR_BACKEND lvis")
        super().__init__(dataset_name, tasks, distributed, output_dir, max_dets_per_image=max_dets_per_image)
        self.protocol = protocol
