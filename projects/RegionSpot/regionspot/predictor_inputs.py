"""The inputs of :meth:`regionspot.predictor.RegionSpotPredictor.predict` besides boxes: the
proposal sources the predictor computes itself, the region tokens of a click / mask prompt, and
the checks of clicks (points and their labels), each failing with one
:class:`~regionspot.data.validation.InputError`."""

import numpy as np
import torch

from .data.validation import InputError

PREDICTOR_SOURCES = ("sam_auto", "rpn")
REGION_TOKENS = ("mask_box", "prompt")


def check_points(points, image_size) -> torch.Tensor:
    """Clicks as an (K, 2) float32 tensor of XY pixels inside the image.

    Raises:
        InputError: not (K, 2), K = 0, not finite, or outside [0, W] x [0, H].
    """
    try:
        t = torch.as_tensor(np.asarray(points, dtype=np.float32))
    except (TypeError, ValueError):
        raise InputError(f"points must be a (K, 2) array of XY pixels, got {str(points)[:80]}") from None
    if t.dim() != 2 or t.shape[1] != 2 or t.shape[0] == 0:
        raise InputError(f"points must be a non-empty (K, 2) array of XY pixels, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError("points contain NaN or infinite values")
    h, w = image_size
    outside = (t[:, 0] < 0) | (t[:, 0] > w) | (t[:, 1] < 0) | (t[:, 1] > h)
    if outside.any():
        i = int(outside.nonzero()[0])
        raise InputError(f"point {i} {t[i].tolist()} is outside the {w}x{h} (WxH) image")
    return t


def check_point_labels(labels, count: int) -> torch.Tensor:
    """(K,) int64 labels of the clicks (1 positive, 0 negative; default all 1).

    Raises:
        InputError: not K values of 0 or 1.
    """
    if labels is None:
        return torch.ones(count, dtype=torch.int64)
    t = torch.as_tensor(np.asarray(labels)).flatten()
    if t.shape[0] != count or not bool(((t == 0) | (t == 1)).all()):
        raise InputError(f"point_labels must be {count} values of 1 (positive click) or 0 (negative click), got "
                         f"{t.tolist()}")
    return t.to(torch.int64)
