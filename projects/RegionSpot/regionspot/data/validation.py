"""Checks of user and dataset input, with errors that name the input and what was expected."""

from typing import Dict, List, Tuple

import numpy as np
import torch

from ..input_checks import BOX_TOLERANCE_PX, InputError, check_box_array  # noqa: F401  (re-exported)


def check_boxes(boxes, image_size: Tuple[int, int], what: str = "boxes") -> torch.Tensor:
    """Validate region boxes and return them as a tensor clipped to the image
    (:func:`~regionspot.input_checks.check_box_array`, which the ONNX Runtime predictor shares).

    Args:
        boxes: (N, 4) array-like or tensor, XYXY_ABS pixels of an image of ``image_size`` = (H, W).
        what: how to name the boxes in errors (e.g. ``"boxes of 'cat.jpg'"``).

    Returns:
        (N, 4) float32 tensor (on the device of a tensor ``boxes``), clipped to [0, W] x [0, H].

    Raises:
        InputError: wrong shape; NaN or infinite values; zero or negative width/height;
            a box reaching more than :data:`BOX_TOLERANCE_PX` outside the image. The message
            names the first offending box by index.
    """
    if torch.is_tensor(boxes):
        checked = check_box_array(boxes.detach().float().cpu().numpy(), image_size, what)
        return torch.from_numpy(checked).to(boxes.device)
    return torch.from_numpy(check_box_array(boxes, image_size, what))


def image_size(file_name: str) -> Tuple[int, int]:
    """(H, W) in pixels of an image file as :func:`read_image` returns it (EXIF orientation
    applied), read from the file's header without decoding the pixels.

    Raises:
        InputError: the file is missing, unreadable or not an image; the message names it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file_name) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
    except FileNotFoundError:
        raise InputError(f"image file not found: {file_name!r}") from None
    except IsADirectoryError:
        raise InputError(f"{file_name!r} is a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read image {file_name!r}: {type(e).__name__}: {e}") from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def read_image(file_name: str, image_format: str = "RGB") -> np.ndarray:
    """Read an image file as an 8-bit photo, EXIF orientation applied (as Detectron2 does).

    Pixel formats that are not 8-bit RGB are converted by their meaning, not clipped
    (:func:`to_rgb_uint8`): 16-bit greyscale is scaled to 8 bits, transparency is composited
    over white, palettes are expanded; a floating-point image must hold values in [0, 1].

    Returns:
        (H, W, 3) uint8 array in ``image_format`` ("RGB" or "BGR").

    Raises:
        InputError: the file is missing, unreadable, not an image, or in a pixel format that
            cannot be read as a photo; the message names it.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if image_format not in ("RGB", "BGR"):
        raise InputError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    try:
        with Image.open(file_name) as image:
            image = ImageOps.exif_transpose(image)
            array = to_rgb_uint8(image, file_name)
    except FileNotFoundError as e:
        raise InputError(f"image file not found: {file_name!r}") from e
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # not an image, truncated, permissions
        raise InputError(f"cannot read image {file_name!r}: {type(e).__name__}: {e}") from e
    return np.ascontiguousarray(array[:, :, ::-1]) if image_format == "BGR" else array


def to_rgb_uint8(image, name: str = "image") -> np.ndarray:
    """A PIL image as an (H, W, 3) uint8 RGB array, converted by what its pixels mean.

    - 8-bit modes (RGB, L, 1, CMYK, YCbCr, palettes without transparency): PIL's conversion;
    - with transparency (RGBA, LA, PA, palettes with a transparent colour): composited over
      white, as an image viewer shows it;
    - 16-bit greyscale ("I;16*", and "I" with values in [0, 65535]): divided by 257, rounded;
    - floating point ("F") with values in [0, 1]: multiplied by 255, rounded.

    Raises:
        InputError: an "I" image with values outside [0, 65535], an "F" image with values
            outside [0, 1] or NaN, or an unknown mode; the message names ``name`` and the range.
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8).copy()
    if mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InputError(f"image {name!r} has {mode} pixels in [{values.min()}, {values.max()}]; expected "
                             f"16-bit values in [0, 65535] (convert it to an 8-bit photo first)")
        gray = np.round(values / 257.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and (np.isnan(values).any() or values.min() < 0 or values.max() > 1):
            raise InputError(f"image {name!r} is floating point with values in [{np.nanmin(values):g}, "
                             f"{np.nanmax(values):g}]{' and NaN' if np.isnan(values).any() else ''}; expected "
                             f"values in [0, 1] (convert it to an 8-bit photo first)")
        gray = np.round(values * 255.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    raise InputError(f"image {name!r} has pixel mode {mode!r}, which cannot be read as a photo; "
                     "convert it to 8-bit RGB")


def check_images(batched_inputs: List[Dict]) -> List[torch.Tensor]:
    """Each input's ``"image"`` as a (3, H, W) uint8 RGB tensor (``RegionSpot.forward``'s check).

    Accepts uint8, and floating-point images with values in [0, 255] (what Detectron2's
    ``DefaultPredictor``, its test-time augmentation and many mappers hand a model); those
    are cast to uint8 as the released implementation does, so a uint8 image given as float
    gives exactly the same result.

    Raises:
        ValueError: not a (3, H, W) tensor, another dtype, NaN / infinite values or values
            outside [0, 255] (the message names the image).
    """
    images = []
    for x in batched_inputs:
        image = x.get("image")
        name = x.get("file_name", "?")
        if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3:
            got = f"shape {tuple(image.shape)}" if torch.is_tensor(image) else type(image).__name__
            raise ValueError(f"image {name!r} must be a (3, H, W) RGB tensor (uint8, or float in 0-255), got {got}")
        if image.is_floating_point():
            if not bool(torch.isfinite(image).all()):
                raise ValueError(f"image {name!r} holds NaN or infinite values")
            low, high = float(image.min()), float(image.max())
            if low < 0 or high > 255:
                raise ValueError(f"image {name!r} must hold values in 0-255 (float or uint8), got "
                                 f"{low:g} to {high:g}")
            image = image.to(torch.uint8)
        elif image.dtype != torch.uint8:
            raise ValueError(f"image {name!r} must be uint8 or float in 0-255, got {image.dtype}")
        images.append(image)
    return images
