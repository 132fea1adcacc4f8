"""Pixel formats that are not 8-bit RGB are read by their meaning or refused, never clipped."""

import numpy as np
import pytest
from PIL import Image

from regionspot.data.validation import InputError, read_image


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 40 * 50).reshape(40, 50).astype(np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    image = read_image(str(path))
    assert image.shape == (40, 50, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], np.round(values / 257.0).astype(np.uint8))
    assert image.min() == 0 and image.max() == 255 and 120 < image.mean() < 135  # not near-white


def test_float_tiff_in_unit_range_is_scaled_and_other_ranges_refused(tmp_path):
    values = np.random.RandomState(0).rand(20, 30).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "unit.tif")
    image = read_image(str(tmp_path / "unit.tif"))
    np.testing.assert_array_equal(image[..., 1], np.round(values * 255).astype(np.uint8))
    Image.fromarray(values * 1000).save(tmp_path / "radiance.tif")
    with pytest.raises(InputError,
                       match=r"radiance.tif.*floating point with values in \[.*\]; expected values in \[0, 1\]"):
        read_image(str(tmp_path / "radiance.tif"))


def test_transparency_is_composited_over_white(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[:, :6, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    image = read_image(str(tmp_path / "cutout.png"))
    assert (image[:, :6] == [200, 0, 0]).all() and (image[:, 6:] == 255).all()
    palette = Image.fromarray(np.repeat(np.arange(12, dtype=np.uint8)[None] * 20, 10, axis=0)).convert("P")
    palette.save(tmp_path / "palette.png", transparency=0)  # palette index 0 is transparent
    image = read_image(str(tmp_path / "palette.png"))
    assert image.shape == (10, 12, 3) and (image[:, 0] == 255).all()


def test_8_bit_images_and_bgr(tmp_path):
    rgb = (np.random.RandomState(1).rand(9, 7, 3) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "photo.png")), rgb)
    np.testing.assert_array_equal(read_image(str(tmp_path / "photo.png"), "BGR"), rgb[..., ::-1])
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "grey.png")), np.repeat(rgb[..., :1], 3, axis=2))


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(InputError, match="cannot read image .*notes.jpg"):
        read_image(str(tmp_path / "notes.jpg"))
    with pytest.raises(InputError, match="not found.*absent.png"):
        read_image(str(tmp_path / "absent.png"))
