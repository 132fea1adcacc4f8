"""``sam_auto`` proposals: SAM's automatic mask generator ("recognise everything").

No detector and no box file: SAM is prompted with a regular grid of points over the image
(``segment_anything.SamAutomaticMaskGenerator``, imported, not copied); its de-duplicated
masks give the regions. Each region becomes a proposal whose

- box is the tight box around its mask (XYXY_ABS pixels of the image the model sees),
- score is SAM's predicted IoU (clipped to [0, 1]) times its stability score,
- mask is the generator's mask, used as RegionSpot's mask output for that region.

The region is then recognised like any other box: its position-aware token comes from SAM
prompted with that box (the prompt RegionSpot was trained with). The image embedding the
model computed already is handed to the generator, so SAM's image encoder runs once per
image (crops, with ``CROP_N_LAYERS`` > 0, are encoded by SAM itself).

The generator drops masks in several steps of its own (``SAM_AUTO.PRED_IOU_THRESH`` 0.88 and
``STABILITY_SCORE_THRESH`` 0.95 by default, box NMS, ...); with a photo SAM does not find
confident regions in, they can remove every mask. The generator used here
(:func:`counting_mask_generator_class`) runs SAM's steps as ``segment_anything`` does and
counts what each removed, so that an empty result says which setting emptied it
(:mod:`.filters`).
"""

from typing import Dict, Tuple

import numpy as np
import torch
from detectron2.structures import Boxes, Instances

from . import score_to_logit


def embedded_predictor(predictor_class, model, image_shape: Tuple[int, int], embedding,
                       input_size: Tuple[int, int]):
    """A ``SamPredictor`` (of ``segment_anything`` or ``segment_anything_hq``: ``predictor_class``)
    whose ``set_image`` reuses the localizer's ``embedding`` for an image of ``image_shape``.

    Args:
        embedding: (256, g, g) SAM embedding, or SAM-HQ's dict with ``"image"`` and
            ``"interm"`` (its early ViT features, read by the HQ decoder).
    """

    class EmbeddedImagePredictor(predictor_class):
        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            if tuple(image.shape[:2]) != tuple(image_shape):  # a crop: let SAM encode it
                return super().set_image(image, image_format)
            self.reset_image()
            self.original_size = tuple(image_shape)
            self.input_size = tuple(input_size)
            if isinstance(embedding, dict):  # SAM-HQ
                self.features = embedding["image"][None]
                self.interm_features = [embedding["interm"][None]]
            else:
                self.features = embedding[None]
            self.is_image_set = True
            return None

    return EmbeddedImagePredictor(model)


_SAM_AUTO_KEY = "MODEL.REGIONSPOT.SAM_AUTO."
# The counters of CountingMaskGenerator, in the order SAM applies its filters.
_SAM_FILTERS = ("pred_iou", "stability", "crop_edge", "box_nms", "crop_nms", "small_regions")


class FilterCounting:
    """Mixin for an automatic mask generator class (``segment_anything``'s, SAM-HQ's or
    ``sam2``'s, placed after this class in the bases) that counts what each of its filters removes.

    The subclass restates ``_process_batch`` with :meth:`filter_counted` at its filters and adds
    the masks it keeps to ``_batch_kept``; box NMS, NMS between crops and the small-region
    clean-up are counted around the generator's own methods. ``counts`` keys: ``generated``
    and :data:`_SAM_FILTERS`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = dict.fromkeys(("generated",) + _SAM_FILTERS, 0)
        self._batch_kept = 0  # masks that left _process_batch, all crops so far
        self._crop_kept = 0  # masks that left _process_crop (after box NMS), all crops so far

    def filter_counted(self, data, keep_mask: torch.Tensor, counter: str) -> None:
        """``data.filter(keep_mask)``, adding the masks it removes to ``counts[counter]``."""
        self.counts[counter] += int((~keep_mask).sum())
        data.filter(keep_mask)

    # ``*args``: SAM-HQ's generator passes ``multimask_output`` on to these steps
    def _process_crop(self, image, crop_box, crop_layer_idx, orig_size, *args):
        before = self._batch_kept
        data = super()._process_crop(image, crop_box, crop_layer_idx, orig_size, *args)
        self.counts["box_nms"] += (self._batch_kept - before) - len(data["rles"])
        self._crop_kept += len(data["rles"])
        return data

    def _generate_masks(self, image, *args):
        before = self._crop_kept
        data = super()._generate_masks(image, *args)
        self.counts["crop_nms"] += (self._crop_kept - before) - len(data["rles"])
        return data

    def postprocess_small_regions(self, mask_data, min_area, nms_thresh):
        before = len(mask_data["rles"])
        mask_data = super().postprocess_small_regions(mask_data, min_area, nms_thresh)
        self.counts["small_regions"] += before - len(mask_data["rles"])
        return mask_data


def counting_mask_generator_class(base=None):
    """``CountingMaskGenerator``: ``base`` (default ``segment_anything.SamAutomaticMaskGenerator``;
    SAM-HQ's generator has the same steps) counting what
    each of its filters removes (the class is built on first use: ``segment_anything`` is
    imported lazily, as everywhere in this package).

    Its ``counts`` dict holds ``generated`` (masks SAM's decoder returned: 3 per point prompt,
    every crop) and, per filter, the masks it removed: ``pred_iou`` (``pred_iou_thresh``),
    ``stability`` (``stability_score_thresh``), ``crop_edge`` (masks touching an inner crop
    edge; only with crops), ``box_nms`` (``box_nms_thresh``, within each crop), ``crop_nms``
    (duplicates between crops, ``crop_nms_thresh``), ``small_regions`` (the NMS after
    ``min_mask_region_area``'s clean-up). ``generated`` minus all removals is the number of
    regions ``generate`` returns.

    ``_process_batch`` is segment_anything 1.0's (and segment_anything_hq 0.3's, which only adds
    its ``multimask_output`` argument), step for step, with the counts added (its
    filters are inside one method, so it is restated here from the package's public
    ``utils.amg`` pieces); the other steps are counted around segment_anything's own methods.
    A test checks that the regions equal those of SAM's own generator.
    """
    from segment_anything import SamAutomaticMaskGenerator

    base = base or SamAutomaticMaskGenerator
    if base in _COUNTING_GENERATORS:
        return _COUNTING_GENERATORS[base]
    from segment_anything.utils.amg import (
        MaskData,
        batched_mask_to_box,
        calculate_stability_score,
        is_box_near_crop_edge,
        mask_to_rle_pytorch,
        uncrop_masks,
    )

    class CountingMaskGenerator(FilterCounting, base):
        def _process_batch(self, points, im_size, crop_box, orig_size, multimask_output=True):
            orig_h, orig_w = orig_size
            transformed_points = self.predictor.transform.apply_coords(points, im_size)
            in_points = torch.as_tensor(transformed_points, device=self.predictor.device)
            in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)
            masks, iou_preds, _ = self.predictor.predict_torch(
                in_points[:, None, :], in_labels[:, None], multimask_output=multimask_output, return_logits=True)
            data = MaskData(masks=masks.flatten(0, 1), iou_preds=iou_preds.flatten(0, 1),
                            points=torch.as_tensor(points.repeat(masks.shape[1], axis=0)))
            del masks
            self.counts["generated"] += len(data["iou_preds"])
            if self.pred_iou_thresh > 0.0:
                self.filter_counted(data, data["iou_preds"] > self.pred_iou_thresh, "pred_iou")
            data["stability_score"] = calculate_stability_score(
                data["masks"], self.predictor.model.mask_threshold, self.stability_score_offset)
            if self.stability_score_thresh > 0.0:
                self.filter_counted(data, data["stability_score"] >= self.stability_score_thresh, "stability")
            data["masks"] = data["masks"] > self.predictor.model.mask_threshold
            data["boxes"] = batched_mask_to_box(data["masks"])
            keep_mask = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
            if not torch.all(keep_mask):
                self.filter_counted(data, keep_mask, "crop_edge")
            data["masks"] = uncrop_masks(data["masks"], crop_box, orig_h, orig_w)
            data["rles"] = mask_to_rle_pytorch(data["masks"])
            del data["masks"]
            self._batch_kept += len(data["rles"])
            return data

    _COUNTING_GENERATORS[base] = CountingMaskGenerator
    return CountingMaskGenerator


_COUNTING_GENERATORS = {}  # generator class of segment_anything(_hq) -> its counting subclass


class SamAutoProposalGenerator:
    """Proposals from SAM's automatic mask generator, on an image already embedded by SAM.

    Args:
        localizer: the model's localizer (shared, not copied); its ``mask_generator(settings,
            image_shape, embedding, input_size)`` gives its package's generator, counting its
            filters (:class:`FilterCounting`) and reusing the image embedding.
        settings: ``SamAutomaticMaskGenerator`` keyword arguments (``points_per_side``,
            ``points_per_batch``, ``pred_iou_thresh``, ``stability_score_thresh``,
            ``box_nms_thresh``, ``crop_n_layers``, ``min_mask_region_area``), from
            ``MODEL.REGIONSPOT.SAM_AUTO``.
    """

    def __init__(self, localizer, settings: Dict[str, object]):
        self.localizer = localizer
        self.settings = dict(settings)

    @classmethod
    def settings_from_config(cls, cfg) -> Dict[str, object]:
        """``SamAutomaticMaskGenerator`` arguments from ``MODEL.REGIONSPOT.SAM_AUTO``.

        Raises:
            ValueError: a non-positive point count or a threshold outside [0, 1] (key named).
        """
        c = cfg.MODEL.REGIONSPOT.SAM_AUTO
        settings = dict(points_per_side=int(c.POINTS_PER_SIDE), points_per_batch=int(c.POINTS_PER_BATCH),
                        pred_iou_thresh=float(c.PRED_IOU_THRESH),
                        stability_score_thresh=float(c.STABILITY_SCORE_THRESH),
                        box_nms_thresh=float(c.BOX_NMS_THRESH), crop_n_layers=int(c.CROP_N_LAYERS),
                        min_mask_region_area=int(c.MIN_MASK_REGION_AREA))
        for key in ("points_per_side", "points_per_batch"):
            if settings[key] <= 0:
                raise ValueError(f"MODEL.REGIONSPOT.SAM_AUTO.{key.upper()} must be positive, got {settings[key]}")
        for key in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            if not 0 <= settings[key] <= 1:
                raise ValueError(f"MODEL.REGIONSPOT.SAM_AUTO.{key.upper()} must be in [0, 1], got {settings[key]}")
        if settings["crop_n_layers"] < 0 or settings["min_mask_region_area"] < 0:
            raise ValueError("MODEL.REGIONSPOT.SAM_AUTO.CROP_N_LAYERS and MIN_MASK_REGION_AREA must be >= 0")
        return settings

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, sam_embedding: torch.Tensor,
                 sam_input_size: Tuple[int, int], report=None) -> Instances:
        """Regions of one image.

        Args:
            image: (3, H, W) uint8 RGB, the image the model sees.
            sam_embedding: the localizer's embedding of that image (for SAM (256, g, g)).
            sam_input_size: (h, w) of the image inside SAM's padded input.
            report: optional :class:`~regionspot.filter_report.FilterReport` of
                the image: each of SAM's filters that is on records how many masks it removed
                (:meth:`record_filters`).

        Returns:
            ``Instances`` of size (H, W), sorted by decreasing score, with ``proposal_boxes``
            (XYXY_ABS), ``objectness_logits`` (logit of predicted IoU x stability score) and
            ``proposal_masks`` ((N, H, W) bool).
        """
        h, w = image.shape[-2:]
        generator = self.localizer.mask_generator(self.settings, (h, w), sam_embedding, sam_input_size)
        regions = generator.generate(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()))
        if report is not None:
            self.record_filters(generator, report)
        device = self.localizer.device
        result = Instances((h, w))
        if not regions:
            result.proposal_boxes = Boxes(torch.zeros(0, 4, device=device))
            result.objectness_logits = torch.zeros(0, device=device)
            result.proposal_masks = torch.zeros(0, h, w, dtype=torch.bool, device=device)
            return result
        xywh = torch.tensor([r["bbox"] for r in regions], dtype=torch.float32)
        # SAM's mask box spans pixel indices x0..x1 inclusive: its XYXY_ABS extent is x1 + 1.
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:] + 1], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        # SAM's IoU head can predict slightly above 1: clip it to an IoU before the product.
        scores = torch.tensor([min(max(r["predicted_iou"], 0.0), 1.0) * r["stability_score"] for r in regions])
        order = torch.argsort(scores, descending=True, stable=True)
        masks = torch.from_numpy(np.stack([regions[i]["segmentation"] for i in order.tolist()]))
        result.proposal_boxes = Boxes(boxes[order].to(device))
        result.objectness_logits = score_to_logit(scores[order]).to(device)
        result.proposal_masks = masks.to(device)
        return result

    def record_filters(self, generator, report) -> None:
        """Add the steps of SAM's generator that are on, with the masks each removed, to
        ``report`` (stage "sam_auto: ...", key ``MODEL.REGIONSPOT.SAM_AUTO.*``, unit "masks").

        Args:
            generator: a ``CountingMaskGenerator`` after ``generate``
                (:func:`counting_mask_generator_class`).
            report: the image's :class:`~regionspot.filter_report.FilterReport`.
        """
        counts, settings = generator.counts, self.settings
        crops = settings.get("crop_n_layers", 0) > 0
        steps = [  # (counter, stage, key, setting, advice, on)
            ("pred_iou", "predicted IoU", "PRED_IOU_THRESH", generator.pred_iou_thresh, "lower it",
             generator.pred_iou_thresh > 0),
            ("stability", "stability score", "STABILITY_SCORE_THRESH", generator.stability_score_thresh,
             "lower it", generator.stability_score_thresh > 0),
            ("crop_edge", "masks at crop edges", "CROP_N_LAYERS", settings.get("crop_n_layers", 0),
             "0 turns crops off", crops),
            ("box_nms", "box NMS", "BOX_NMS_THRESH", generator.box_nms_thresh, "raise it", True),
            ("crop_nms", f"NMS between crops (IoU {generator.crop_nms_thresh:g})", "CROP_N_LAYERS",
             settings.get("crop_n_layers", 0), "0 turns crops off", crops),
            ("small_regions", "NMS after small-region clean-up", "MIN_MASK_REGION_AREA",
             generator.min_mask_region_area, "0 turns it off", generator.min_mask_region_area > 0),
        ]
        left = counts["generated"]
        for counter, stage, key, setting, advice, on in steps:
            if on:
                report.add(f"sam_auto: {stage}", _SAM_AUTO_KEY + key, setting, "masks", left,
                           left - counts[counter], advice)
            left -= counts[counter]
