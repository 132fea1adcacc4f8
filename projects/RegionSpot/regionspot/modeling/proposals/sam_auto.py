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
"""

from typing import Dict, Tuple

import numpy as np
import torch

from detectron2.structures import Boxes, Instances

from . import score_to_logit


def _embedded_predictor(sam, image_shape: Tuple[int, int], embedding: torch.Tensor,
                        input_size: Tuple[int, int]):
    """A ``SamPredictor`` whose ``set_image`` reuses ``embedding`` for an image of ``image_shape``."""
    from segment_anything import SamPredictor

    class EmbeddedImagePredictor(SamPredictor):
        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            if tuple(image.shape[:2]) != tuple(image_shape):  # a crop: let SAM encode it
                return super().set_image(image, image_format)
            self.reset_image()
            self.original_size = tuple(image_shape)
            self.input_size = tuple(input_size)
            self.features = embedding[None]
            self.is_image_set = True
            return None

    return EmbeddedImagePredictor(sam)


class SamAutoProposalGenerator:
    """Proposals from SAM's automatic mask generator, on an image already embedded by SAM.

    Args:
        sam: the frozen ``segment_anything`` ``Sam`` of the model (shared, not copied).
        settings: ``SamAutomaticMaskGenerator`` keyword arguments (``points_per_side``,
            ``points_per_batch``, ``pred_iou_thresh``, ``stability_score_thresh``,
            ``box_nms_thresh``, ``crop_n_layers``, ``min_mask_region_area``), from
            ``MODEL.REGIONSPOT.SAM_AUTO``.
    """

    def __init__(self, sam, settings: Dict[str, object]):
        self.sam = sam
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
                 sam_input_size: Tuple[int, int]) -> Instances:
        """Regions of one image.

        Args:
            image: (3, H, W) uint8 RGB, the image the model sees.
            sam_embedding: (256, g, g) SAM's embedding of that image.
            sam_input_size: (h, w) of the image inside SAM's padded input.

        Returns:
            ``Instances`` of size (H, W), sorted by decreasing score, with ``proposal_boxes``
            (XYXY_ABS), ``objectness_logits`` (logit of predicted IoU x stability score) and
            ``proposal_masks`` ((N, H, W) bool).
        """
        from segment_anything import SamAutomaticMaskGenerator

        h, w = image.shape[-2:]
        generator = SamAutomaticMaskGenerator(self.sam, output_mode="binary_mask", **self.settings)
        generator.predictor = _embedded_predictor(self.sam, (h, w), sam_embedding, sam_input_size)
        regions = generator.generate(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()))
        device = sam_embedding.device
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
