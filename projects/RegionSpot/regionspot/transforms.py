"""Image and box transforms shared by the data mapper, the SAM-token cache and the encoders.

One implementation of each, so that the data loader, the cache and the model cannot drift:

- :func:`resize_for_sam`: SAM's resize (``SamPredictor.set_image``), made by the mapper in
  the data-loader workers or by :class:`~regionspot.modeling.localizer.Localizer`;
- :func:`resize_for_clip`: the released CLIP input resize, made by the mapper or by
  :class:`~regionspot.modeling.semantic_features.ClipSemanticFeatures`;
- :func:`flip_boxes`: XYXY_ABS boxes of an image mirrored left-right (Detectron2's
  ``HFlipTransform``), used by the mapper's SAM inputs and the SAM-token cache;
- :func:`annotation_boxes_xyxy`: the ``bbox`` of dataset-dict annotations (any ``bbox_mode``,
  COCO's XYWH_ABS included) as XYXY_ABS pixels, used by the mapper and the token cache.

This module imports neither ``regionspot.modeling`` nor ``regionspot.data``.
"""

from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resize_for_sam", "resize_for_clip", "flip_boxes", "annotation_boxes_xyxy"]


def resize_for_sam(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """SAM's resize of one image, as ``SamPredictor.set_image`` does it (CPU, uint8).

    ``ResizeLongestSide.apply_image`` (long side -> ``long_side``, PIL bilinear on uint8).
    Cheap enough for a data-loader worker, where the test mapper calls it.

    Args:
        image: (3, H, W) uint8 RGB tensor (any device; copied to the CPU).
        long_side: SAM's input side S (1024 for the official models).

    Returns:
        (3, h, w) uint8 CPU tensor with max(h, w) == ``long_side``.
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    array = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    resized = ResizeLongestSide(long_side).apply_image(array)
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def resize_for_clip(image: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """The released CLIP input resize of one image: /255, bilinear (align_corners False) to
    ``size`` x ``size`` (aspect not kept), optionally antialiased; not normalised.

    Args:
        image: (3, H, W) uint8 RGB, any device (the result stays there).
        size: S, CLIP's input side in pixels.

    Returns:
        (3, S, S) float32 in [0, 1].
    """
    x = image.float()[None] / 255.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)[0]


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes of an image mirrored left-right: ``x0' = W - x1, x1' = W - x0`` (y unchanged).

    Args:
        boxes: (N, 4) XYXY_ABS pixels of an image ``width`` pixels wide (tensor or array).

    Returns:
        (N, 4) float32 tensor (on the same device for a tensor), in the flipped image's frame.
    """
    b = torch.as_tensor(boxes).float()
    return torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)


def annotation_boxes_xyxy(annotations: Iterable[Mapping]) -> np.ndarray:
    """The ``bbox`` of each annotation converted from its ``bbox_mode`` to XYXY_ABS.

    Args:
        annotations: Detectron2 annotation dicts (``bbox``, ``bbox_mode``: e.g. COCO's
            ``BoxMode.XYWH_ABS``).

    Returns:
        (N, 4) float32 array (N may be 0); not validated or clipped
        (:func:`regionspot.data.validation.check_boxes` does that).
    """
    from detectron2.structures import BoxMode

    xyxy = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
    return np.array(xyxy, dtype=np.float32).reshape(-1, 4)
