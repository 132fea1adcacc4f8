"""Detectron2's ``LVISEvaluator`` (and ``COCOEvaluator``, for COCO-format datasets) for
RegionSpot's outputs (box AP and SAM-mask AP).

RegionSpot keeps up to ``TEST_TOPK`` (box, class) pairs per image and a box may carry many
classes, each a detection with the same mask (:class:`~regionspot.modeling.postprocess.SharedMasks`).
Detectron2's evaluator would RLE-encode the mask once per detection; here each distinct mask
is encoded once and its RLE shared by the detections of that box, so neither time nor memory
grows with the number of classes a box carries. Everything else (gathering across ranks, the
LVIS API's AP, APr/APc/APf, the 300-detections cap) is Detectron2's and the LVIS API's own.
The protocol the numbers were made with is logged right before the evaluator's AP tables.
"""

import logging
from typing import List, Optional

import numpy as np
import torch

from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json

from ..modeling.postprocess import SharedMasks

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
    """``LVISEvaluator`` that encodes each kept box's mask once and states the protocol.

    Args:
        dataset_name, tasks, distributed, output_dir, max_dets_per_image: as Detectron2's
            ``LVISEvaluator`` (``max_dets_per_image``: LVIS's 300 by default).
        protocol: the one-line protocol description, logged before the AP tables.
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 max_dets_per_image: Optional[int] = None, protocol: str = ""):
        super().__init__(dataset_name, tasks, distributed, output_dir, max_dets_per_image=max_dets_per_image)
        self.protocol = protocol


class RegionSpotCOCOEvaluator(_RegionSpotOutputs, COCOEvaluator):
    """``COCOEvaluator`` (COCO-format datasets: AP, AP50, AP75, APs/m/l; no APr/APc/APf, which
    need LVIS's category frequencies) with the same mask handling and protocol line.

    Args:
        dataset_name, tasks, distributed, output_dir, max_dets_per_image: as Detectron2's
            ``COCOEvaluator``.
        protocol: the one-line protocol description, logged before the AP tables.
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 max_dets_per_image: Optional[int] = None, protocol: str = ""):
        super().__init__(dataset_name, tasks, distributed, output_dir, max_dets_per_image=max_dets_per_image)
        self.protocol = protocol
