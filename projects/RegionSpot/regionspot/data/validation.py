"""Checks of user and dataset input, with errors that name the input and what was expected."""

from typing import Tuple

import numpy as np
import torch

# A box may overhang the image by this many pixels (rounding in annotation tools); it is clipped.
BOX_TOLERANCE_PX = 1.0


class InputError(ValueError):
    """An image or box given to RegionSpot is not usable; the message names it."""


def check_boxes(boxes, image_size: Tuple[int, int], what: str = "boxes") -> torch.Tensor:
    """Validate region boxes and return them as a tensor clipped to the image.

    Args:
        boxes: (N, 4) array-like, XYXY_ABS pixels of an image of ``image_size`` = (H, W).
        what: how to name the boxes in errors (e.g. ``"boxes of 'cat.jpg'"``).

    Returns:
        (N, 4) float32 tensor, clipped to [0, W] x [0, H].

    Raises:
        InputError: wrong shape; NaN or infinite values; zero or negative width/height;
            a box reaching more than :data:`BOX_TOLERANCE_PX` outside the image. The message
            names the first offending box by index.
    """
    t = torch.as_tensor(np.asarray(boxes, dtype=np.float32) if not torch.is_tensor(boxes) else boxes)
    t = t.float()
    if t.numel() == 0:
        return t.reshape(0, 4)
    if t.dim() != 2 or t.shape[1] != 4:
        raise InputError(f"{what} must be an (N, 4) array of XYXY pixel boxes, got shape {tuple(t.shape)}")
    h, w = image_size
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise InputError(f"{what}: box {i} {t[i].tolist()} contains NaN or infinity")
    empty = (t[:, 2] <= t[:, 0]) | (t[:, 3] <= t[:, 1])
    if empty.any():
        i = int(empty.nonzero()[0])
        raise InputError(f"{what}: box {i} {t[i].tolist()} has zero area (expected XYXY with x1 > x0, y1 > y0)")
    tol = BOX_TOLERANCE_PX
    outside = (t[:, 0] < -tol) | (t[:, 1] < -tol) | (t[:, 2] > w + tol) | (t[:, 3] > h + tol)
    if outside.any():
        i = int(outside.nonzero()[0])
        raise InputError(f"{what}: box {i} {t[i].tolist()} lies outside the {w}x{h} (WxH) image")
    t[:, 0::2] = t[:, 0::2].clamp(0, w)
    t[:, 1::2] = t[:, 1::2].clamp(0, h)
    return t


def read_image(file_name: str, image_format: str = "RGB") -> np.ndarray:
    """Read an image file with Detectron2's reader (EXIF orientation applied).

    Returns:
        (H, W, 3) uint8 array in ``image_format``.

    Raises:
        InputError: the file is missing, unreadable or not an image; the message names it.
    """
    from detectron2.data import detection_utils as utils

    try:
        image = utils.read_image(file_name, format=image_format)
    except FileNotFoundError as e:
        raise InputError(f"image file not found: {file_name!r}") from e
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, permissions
        raise InputError(f"cannot read image {file_name!r}: {type(e).__name__}: {e}") from e
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image {file_name!r} has shape {image.shape}, expected (H, W, 3)")
    return image
