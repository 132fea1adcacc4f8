"""The images of an Open Images split for ``regionspot-convert-openimages``
(:mod:`regionspot.tools.convert_openimages`): found on disk by ImageID (:func:`scan_images`),
and their displayed sizes read from the file headers, in worker processes
(:func:`read_image_sizes`)."""

import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from regionspot.tools.openimages.csv_files import ConversionError, progress

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def scan_images(folder: str) -> Tuple[Dict[str, int], List[str], List[str]]:
    """Find the images under ``folder`` (recursively).

    Returns:
        ``(index, dirs, exts)``: ``index[ImageID] = dir_index * 8 + ext_index``, where ``dirs``
        holds folder paths relative to ``folder`` ("" for the folder itself) and ``exts`` the
        file extensions as found.

    Raises:
        ConversionError: ``folder`` is not a folder; two files have the same ImageID.
    """
    if not os.path.isdir(folder):
        raise ConversionError(f"image folder not found: {folder}")
    index: Dict[str, int] = {}
    dirs: List[str] = []
    exts: List[str] = []
    ext_index: Dict[str, int] = {}
    stack = [""]
    with progress(desc="scanning images", unit=" files") as bar:
        while stack:
            rel = stack.pop()
            dir_index = len(dirs)
            dirs.append(rel)
            with os.scandir(os.path.join(folder, rel)) as entries:
                for entry in entries:
                    if entry.is_dir():
                        stack.append(os.path.join(rel, entry.name))
                        continue
                    stem, ext = os.path.splitext(entry.name)
                    if ext.lower() not in IMAGE_EXTENSIONS:
                        continue
                    if ext not in ext_index:
                        if len(exts) == 8:
                            raise ConversionError(f"{folder}: too many image file extensions ({', '.join(exts)}, "
                                                  f"{ext})")
                        ext_index[ext] = len(exts)
                        exts.append(ext)
                    if stem in index:
                        other = index[stem]
                        raise ConversionError(f"{folder}: image {stem} is there twice: "
                                              f"{os.path.join(dirs[other >> 3], stem + exts[other & 7])} and "
                                              f"{os.path.join(rel, entry.name)}")
                    index[stem] = dir_index * 8 + ext_index[ext]
                    bar.update(1)
    return index, dirs, exts


def image_size(path: str) -> Tuple[int, int, int, Optional[str]]:
    """``(width, height, turned, error)`` of an image file from its header, without decoding.

    ``turned`` is 1 when the JPEG's EXIF orientation (5-8) turns it by 90 degrees: width and
    height are then those of the image as displayed. ``error`` is None, "missing", or the reason
    it cannot be read.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                orientation = 0
                if im.format == "JPEG":  # EXIF is in the header (other formats may need decoding)
                    try:
                        orientation = int(im.getexif().get(0x0112, 0) or 0)
                    except Exception:  # a broken EXIF block: the image reads without orientation
                        orientation = 0
    except FileNotFoundError:
        return 0, 0, 0, "missing"
    except Exception as e:  # not an image, truncated header, permissions
        return 0, 0, 0, f"{type(e).__name__}: {e}"
    if orientation in (5, 6, 7, 8):
        return h, w, 1, None
    return w, h, 0, None


def read_image_sizes(paths: Sequence[str], workers: int) -> List[Tuple[int, int, int, Optional[str]]]:
    """:func:`image_size` of every path, in order, in ``workers`` processes (serially for few)."""
    with progress(total=len(paths), desc="reading image sizes", unit=" images") as bar:
        if workers <= 1 or len(paths) < 256:
            results = []
            for p in paths:
                results.append(image_size(p))
                bar.update(1)
            return results
        import multiprocessing

        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        results = []
        with ctx.Pool(workers) as pool:
            for result in pool.imap(image_size, paths, chunksize=256):
                results.append(result)
                bar.update(1)
        return results
