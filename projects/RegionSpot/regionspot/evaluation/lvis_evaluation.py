"""Detectron2's ``LVISEvaluator`` (and ``COCOEvaluator``, for COCO-format datasets) for
RegionSpot's outputs (box AP and SAM-mask AP).

RegionSpot keeps up to ``TEST_TOPK`` (box, class) pairs per image and a box may carry many
classes, each a detection with the same mask (:class:`~regionspot.structures.SharedMasks`).
Detectron2's evaluator would RLE-encode the mask once per detection; here each distinct mask
is encoded once and its RLE shared by the detections of that box, so neither time nor memory
grows with the number of classes a box carries. Everything else (gathering across ranks, the
LVIS API's AP, APr/APc/APf, the 300-detections cap) is Detectron2's and the LVIS API's own.
The protocol the numbers were made with is logged right before the evaluator's AP tables.

Datasets without instance masks (most box datasets): mask AP ("segm") is skipped with one log
line and box AP is evaluated and reported as usual; the skipped task and why is in the
evaluator's ``skipped_tasks`` (written to ``metrics.json``). A dataset where only some
annotations have masks is still evaluated for masks, each annotation without one taking its box
as its mask (see :mod:`.mask_annotations`). Annotations without an ``area`` get their box's.

The LVIS evaluator has two backends (``TEST.EVALUATOR_BACKEND``): "lvis" (default, the
reference: Detectron2's ``LVISEvaluator`` running the LVIS API, unchanged) and
"faster_coco_eval" (:mod:`.fast_lvis`: the same numbers from faster-coco-eval's C++ LVIS
mode, in seconds instead of minutes on LVIS v1 val).
"""

import itertools
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.file_io import PathManager

from ..io import atomic_opens, atomic_write, dumps_strict_json
from ..structures import SharedMasks
from .fast_lvis import LVISFormatError, check_evaluator_backend, check_lvis_format, evaluate_predictions_on_lvis_fast
from .mask_annotations import fill_missing_masks_with_boxes, mask_annotation_counts, no_masks_message

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


def fill_missing_areas(annotations: Sequence[dict]) -> int:
    """Give every annotation without an ``area`` its box's area (``w * h`` of its XYWH
    ``bbox``), in place (the AP code reads ``area`` for its size ranges and the LVIS API for its
    ``0 < area`` filter; box datasets often omit it). Returns how many were filled."""
    filled = 0
    for ann in annotations:
        if "area" not in ann and isinstance(ann.get("bbox"), (list, tuple)) and len(ann["bbox"]) == 4:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
            filled += 1
    return filled


class _RegionSpotOutputs:
    """``process``, ``evaluate`` and the task selection shared by the LVIS and COCO evaluators:
    each distinct mask encoded once; the protocol logged before the AP tables; mask AP only on
    ground truth that has masks.

    Attributes:
        skipped_tasks: {task: reason} of the requested tasks the last ``evaluate`` skipped
            (``{"segm": ...}`` when the dataset has no mask annotations); empty otherwise.
    """

    protocol = ""

    def _inspect_ground_truth(self, dataset_name: str, dataset: dict) -> None:
        """Count the ground truth's masks (once, at construction) and fill missing areas.

        Raises:
            ValueError: only mask AP (``tasks == ("segm",)``) requested on a dataset with
                annotations, none of which has a mask.
        """
        self._dataset_name = dataset_name
        self._gt_annotations = dataset.get("annotations") or []
        self._mask_counts = mask_annotation_counts(self._gt_annotations)
        self._masks_filled = False
        self.skipped_tasks: Dict[str, str] = {}
        with_mask, total = self._mask_counts
        if self._tasks is not None and tuple(self._tasks) == ("segm",) and total and not with_mask:
            raise ValueError(f"evaluation tasks ('segm',) (mask AP only) on dataset {dataset_name!r}, which has no "
                             f"mask annotations (none of its {total} annotations in {self._json_file()} has a "
                             f"'segmentation'); evaluate 'bbox' (box AP) instead")
        filled = fill_missing_areas(self._gt_annotations)
        if filled:
            logger.info("%s: %d of %d annotations have no 'area'; their box's area (w * h) is used", dataset_name,
                        filled, total)

    def _json_file(self) -> str:
        return str(self._metadata.get("json_file", "") or "")

    def _evaluable_tasks(self, tasks: Sequence[str]) -> Tuple[str, ...]:
        """``tasks`` less those the ground truth cannot evaluate: "segm" when no annotation has
        a mask (one log line says so, and ``skipped_tasks`` records it). When only some have
        one, those without get their box as their mask (one warning counts them)."""
        tasks = tuple(tasks)
        self.skipped_tasks = {}
        with_mask, total = self._mask_counts
        if "segm" not in tasks or total == 0 or with_mask == total:
            return tasks
        if with_mask == 0:
            logger.warning(no_masks_message(self._dataset_name, total, self._json_file()))
            self.skipped_tasks["segm"] = (f"the dataset has no mask annotations (none of its {total} annotations "
                                          f"has a 'segmentation')")
            return tuple(t for t in tasks if t != "segm")
        if not self._masks_filled:
            filled = fill_missing_masks_with_boxes(self._gt_annotations)
            self._masks_filled = True
            logger.warning("%s: %d of %d annotations have no mask ('segmentation'); for mask AP each of them takes "
                           "its box as its mask", self._dataset_name, len(filled), total)
        return tasks

    def _eval_predictions(self, predictions, *args, **kwargs):
        # Detectron2's _eval_predictions evaluates ``self._tasks or <tasks of the predictions>``:
        # narrowed here to what the ground truth supports, for this call only.
        requested = self._tasks or self._tasks_from_predictions(
            list(itertools.chain.from_iterable(p["instances"] for p in predictions)))
        tasks = self._evaluable_tasks(requested)
        saved, self._tasks = self._tasks, tasks
        try:
            return self._eval_predictions_for_tasks(predictions, *args, **kwargs)
        finally:
            self._tasks = saved

    def _eval_predictions_for_tasks(self, predictions, *args, **kwargs):
        """Detectron2's ``_eval_predictions`` for ``self._tasks`` (set by ``_eval_predictions``)."""
        return super()._eval_predictions(predictions, *args, **kwargs)

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
        """Detectron2's ``evaluate``, with its output files (``instances_predictions.pth``, the
        results JSON) written atomically: never a partial file under the final name, and a
        full disk is one :class:`~regionspot.io.DiskFullError` naming the folder."""
        if self.protocol:
            logger.info("Evaluating with protocol: %s", self.protocol)
        with atomic_opens(PathManager, self._output_dir):
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

    Mask AP ("segm") is evaluated only on ground truth with masks: on a dataset without any,
    it is skipped (one log line; ``skipped_tasks`` says so) and box AP is returned alone.

    Raises:
        ValueError: an unknown ``backend`` (the message names ``TEST.EVALUATOR_BACKEND``);
            ``tasks`` ("segm",) alone on a dataset without mask annotations.
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
        self._inspect_ground_truth(dataset_name, self._lvis_api.dataset)

    def evaluate(self):
        logger.info("LVIS evaluation backend (TEST.EVALUATOR_BACKEND): %s", self.backend)
        return super().evaluate()

    def _eval_predictions_for_tasks(self, predictions):
        if self.backend == "lvis":
            return super()._eval_predictions_for_tasks(predictions)
        # What Detectron2's LVISEvaluator._eval_predictions does (dataset category ids back,
        # the results file, then AP per task), with the fast AP and an atomic results file.
        lvis_results = list(itertools.chain.from_iterable(p["instances"] for p in predictions))
        tasks = self._tasks  # set by _eval_predictions: what the ground truth supports
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
            text = dumps_strict_json(lvis_results)  # strict JSON (a NaN as null)
            atomic_write(path, lambda f: f.write(text), "w")  # never a half-written file
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

    Mask AP ("segm") is evaluated only on ground truth with masks, as in
    :class:`RegionSpotLVISEvaluator`.

    Raises:
        ValueError: an unknown ``backend`` (the message names ``TEST.EVALUATOR_BACKEND``);
            ``tasks`` ("segm",) alone on a dataset without mask annotations.
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
        self._inspect_ground_truth(dataset_name, self._coco_api.dataset)
