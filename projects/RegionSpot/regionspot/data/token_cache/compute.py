"""What the SAM-token cache holds, computed (docs/token_cache.md, "What is cached"): the boxes
of a dataset dict as the mapper sees them and the localizer's tokens of an image and of its
horizontal flip. :func:`compute_image_tokens` is the function the cache is defined by."""

from typing import Any, Dict, Mapping

import torch

from ...transforms import annotation_boxes_xyxy, flip_boxes
from ..validation import check_boxes


def annotation_boxes(record: Mapping[str, Any]) -> torch.Tensor:
    """The boxes of a dataset dict that the cache keys its tokens by, as the mapper computes them.

    The ``iscrowd == 0`` annotations in dataset-dict order, ``bbox`` converted from its
    ``bbox_mode`` to XYXY_ABS (``BoxMode.convert``, as float32), then
    :func:`~regionspot.data.validation.check_boxes` with the image size (``height``,
    ``width`` of the dict): clipped to [0, W] x [0, H].

    Returns:
        (N, 4) float32 CPU tensor, XYXY_ABS pixels of the original image (N may be 0).

    Raises:
        InputError: a NaN, empty or out-of-image box (named by index and file name).
        KeyError: the dict lacks ``height``/``width``.
    """
    annos = [a for a in record.get("annotations", []) if a.get("iscrowd", 0) == 0]
    if not annos:
        return torch.zeros(0, 4, dtype=torch.float32)
    xyxy = annotation_boxes_xyxy(annos)
    size = (int(record["height"]), int(record["width"]))
    return check_boxes(xyxy, size, f"boxes of {record.get('file_name', '<no file_name>')!r}").contiguous()


@torch.no_grad()
def compute_tokens(position, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """One orientation: SAM's tokens of ``boxes`` on ``image`` at its own size, through the
    localizer's one token extraction (``Localizer.extract_tokens``, float32).

    Args:
        position: the localizer, a ``regionspot.modeling.localizer.Localizer`` (frozen SAM).
        image: (3, H, W) uint8 RGB.
        boxes: (N, 4) XYXY_ABS pixels of ``image``.

    Returns:
        (N, T) float32 CPU tensor.
    """
    return position.extract_tokens([image], [boxes.float()])[0].cpu()


def compute_image_tokens(position, image: torch.Tensor, boxes: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Both cache entries of one image: its tokens and those of its horizontal flip.

    This is the function the cache is defined by; the training path can call it online and get
    the tokens the cache holds (float32 cache: bit-identical with the same SAM, device and number
    of threads; other thread counts or GPU kernels change the last float bits, ~1e-6 relative).

    Args:
        position: a ``regionspot.modeling.localizer.Localizer``.
        image: (3, H, W) uint8 RGB, the original image.
        boxes: (N, 4) XYXY_ABS pixels of ``image`` (e.g. :func:`annotation_boxes`).

    Returns:
        dict of float32 CPU tensors: ``tokens`` (N, T), ``tokens_flip`` (N, T) (computed on
        ``image.flip(-1)`` with ``boxes_flip``), ``boxes`` (N, 4), ``boxes_flip`` (N, 4)
        (:func:`flip_boxes` with W = ``image.shape[-1]``).
    """
    boxes = boxes.detach().float().cpu().contiguous()
    boxes_flip = flip_boxes(boxes, image.shape[-1])
    with torch.no_grad():
        tokens, tokens_flip = position.extract_tokens([image, image.flip(-1)], [boxes, boxes_flip])
    return {"tokens": tokens.cpu(), "tokens_flip": tokens_flip.cpu(), "boxes": boxes, "boxes_flip": boxes_flip}

