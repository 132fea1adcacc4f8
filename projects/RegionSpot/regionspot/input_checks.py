"""Checks of what a user hands a predictor, in numpy only (no torch), so that the PyTorch
predictor (:mod:`regionspot.predictor`, through :mod:`regionspot.data.validation`) and the ONNX
Runtime one (:mod:`regionspot.deploy`, which runs where torch is not installed) refuse the same
inputs with the same one-line :class:`InputError`."""

from typing import Tuple

import numpy as np

# A box may overhang the image by this many pixels (rounding in annotation tools); it is clipped.
BOX_TOLERANCE_PX = 1.0


class InputError(ValueError):
    """An image or box given to RegionSpot is not usable; the message names it."""


def check_box_array(boxes, image_size: Tuple[int, int], what: str = "boxes") -> np.ndarray:
    """Validate region boxes and return them clipped to the image.

    Args:
        boxes: (N, 4) array-like, XYXY_ABS pixels of an image of ``image_size`` = (H, W).
        what: how to name the boxes in errors (e.g. ``"boxes of 'cat.jpg'"``).

    Returns:
        (N, 4) float32 array (a new one), clipped to [0, W] x [0, H].

    Raises:
        InputError: wrong shape; NaN or infinite values; zero or negative width/height;
            a box reaching more than :data:`BOX_TOLERANCE_PX` outside the image. The message
            names the first offending box by index.
    """
    try:
        b = np.array(boxes, dtype=np.float32)
    except (TypeError, ValueError):
        shown = repr(boxes) if len(repr(boxes)) <= 80 else repr(boxes)[:77] + "..."
        raise InputError(f"{what} must be an (N, 4) array of XYXY pixel boxes, got {shown}") from None
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise InputError(f"{what} must be an (N, 4) array of XYXY pixel boxes, got shape {tuple(b.shape)}")
    h, w = image_size
    bad = ~np.isfinite(b).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{what}: box {i} {b[i].tolist()} contains NaN or infinity")
    empty = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise InputError(f"{what}: box {i} {b[i].tolist()} has zero area (expected XYXY with x1 > x0, y1 > y0)")
    tol = BOX_TOLERANCE_PX
    outside = (b[:, 0] < -tol) | (b[:, 1] < -tol) | (b[:, 2] > w + tol) | (b[:, 3] > h + tol)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise InputError(f"{what}: box {i} {b[i].tolist()} lies outside the {w}x{h} (WxH) image")
    b[:, 0::2] = b[:, 0::2].clip(0, w)
    b[:, 1::2] = b[:, 1::2].clip(0, h)
    return b


def check_image_array(image, image_format: str = "RGB") -> np.ndarray:
    """A predictor's ``set_image`` input as a C-contiguous (H, W, 3) uint8 RGB array.

    Args:
        image: (H, W, 3) uint8 array; image_format: "RGB" or "BGR" (OpenCV's order).

    Raises:
        InputError: not an (H, W, 3) uint8 array, or an unknown ``image_format``.
    """
    if image_format not in ("RGB", "BGR"):
        raise InputError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"image must be an (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
    return np.ascontiguousarray(image[..., ::-1] if image_format == "BGR" else image)
