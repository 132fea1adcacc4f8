"""Convert the official OpenImages v6 box annotations of one split into a COCO-format json.

    python tools/convert_openimages.py \\
        --boxes oidv6-train-annotations-bbox.csv \\
        --classes class-descriptions-boxable.csv \\
        --image-labels train-annotations-human-imagelabels-boxable.csv \\
        --images datasets/openimages_v6/train \\
        --output datasets/openimages_v6/annotations/openimages_v6_train.json
        [--image-sizes SIZES.csv] [--workers N] [--skip-missing-images] [--overwrite]

Inputs (official CSV files, read row by row; see datasets/README.md for the downloads):

* ``--boxes``: ImageID, Source, LabelName, Confidence, XMin, XMax, YMin, YMax (normalised to
  [0, 1]), IsOccluded, IsTruncated, IsGroupOf, IsDepiction, IsInside (further columns, such as
  the train file's XClick*, are ignored).
* ``--classes``: LabelName (MID, e.g. ``/m/011k07``), DisplayName; the official boxable file has
  no header row (a ``LabelName,DisplayName`` header is skipped if present). Category ids are
  1..N in the file's order (601 classes in the official file).
* ``--image-labels`` (optional): the human-verified image-level labels, ImageID, Source,
  LabelName, Confidence (1: the class is present, 0: verified absent). Labels of classes that
  are not boxable (the full ``oidv6-*-human-imagelabels.csv`` covers about 20k classes) and of
  images that are neither in the box file nor in ``--images`` are skipped and counted.
* ``--images``: the folder of the split's images, searched recursively for
  ``<ImageID>.jpg`` (also .jpeg/.png), so both a flat folder and the ``train_0 .. train_f``
  sub-folders of the official archives work. Image sizes are read from the file headers (no
  decoding) in ``--workers`` processes; a JPEG whose EXIF orientation turns it by 90 degrees
  gets its displayed size, as Detectron2 and RegionSpot read images with EXIF orientation
  applied. The official image-info CSV files give no pixel size (OriginalSize is in bytes);
  ``--image-sizes`` takes an optional CSV ``ImageID,Width,Height`` (e.g. from an earlier run) to
  skip reading those headers.

Output (written atomically, streamed: the full train split, 1.7M images and 14.6M boxes, fits
in a few GB of memory):

* ``categories``: ``{"id": 1..N, "name": DisplayName, "mid": LabelName}``;
* ``images``: ``{"id": 1..I (in ImageID order), "file_name": path relative to --images
  ("<ImageID>.jpg"), "height", "width", "image_level_labels": {"positive": [category ids],
  "negative": [category ids]}}``;
* ``annotations``: ``{"id", "image_id", "category_id", "bbox": [x, y, w, h], "area",
  "iscrowd"}`` with the box in absolute pixels of the image as displayed, XYWH:
  x = XMin * width, y = YMin * height, w = (XMax - XMin) * width, h = (YMax - YMin) * height,
  rounded to 0.01 pixel; ``iscrowd`` = IsGroupOf (1 for a box around a group of objects).

Images without boxes (only image-level labels) are kept: their verified labels still tell the
loss which classes are absent. Boxes of zero width or height are skipped and counted.

Errors (a missing file, a CSV without the expected columns, a box outside [0, 1] or with
XMax < XMin or YMax < YMin, an unknown LabelName in the box file, an image of the box file that
is not in ``--images`` (unless ``--skip-missing-images``), an unreadable image, an output that
would overwrite an input, or an existing output without ``--overwrite``) print one line
``convert_openimages.py: error: <message>`` and exit with status 2 (``--debug``: with the
traceback); no output file is left behind. The run's log (the project's lines, and the
traceback of an error found once the output was checked) is written to ``<OUTPUT>.log``.
"""

import argparse
import csv
import json
import os
import sys
import warnings
from array import array
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from regionspot.tools.common import run_tool

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")
LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")
SIZE_COLUMNS = ("ImageID", "Width", "Height")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_PROGRESS_BYTES = 1 << 22
IMAGE_CHUNK = 4096  # json entries formatted before each write
BOX_CHUNK = 16384
PROG = "convert_openimages.py"


class ConversionError(ValueError):
    """Bad input; the message names the file (and row) and what was expected."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    from regionspot.cli import add_debug_argument

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boxes", required=True, help="box CSV (oidv6-train-annotations-bbox.csv, "
                                                  "validation-annotations-bbox.csv)")
    p.add_argument("--classes", required=True, help="boxable class descriptions CSV (MID, DisplayName)")
    p.add_argument("--image-labels", help="human-verified image-level labels CSV (ImageID, Source, LabelName, "
                                          "Confidence)")
    p.add_argument("--images", required=True, help="folder of the split's images (searched recursively)")
    p.add_argument("--output", required=True, help="COCO-format json to write (the log goes to OUTPUT.log)")
    p.add_argument("--image-sizes", help="optional CSV ImageID,Width,Height; images it lists are not opened")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="processes reading image headers (default: the CPU count, at most 16)")
    p.add_argument("--skip-missing-images", action="store_true",
                   help="leave out images of the box file that are missing or unreadable (and their boxes) "
                        "instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    add_debug_argument(p)
    return p


# ----------------------------------------------------------------------------- reading


def _progress(**kwargs):
    from tqdm import tqdm

    return tqdm(disable=None, dynamic_ncols=True, **kwargs)


def csv_rows(path: str, what: str) -> Iterator[Tuple[int, List[str]]]:
    """Yield ``(line number, fields)`` of a CSV file, streamed, with a progress bar in bytes.

    Blank lines are skipped. A UTF-8 byte-order mark is ignored.

    Raises:
        ConversionError: the file is missing or not UTF-8 text.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{what} not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as raw, _progress(total=size, unit="B", unit_scale=True,
                                            desc=f"reading {os.path.basename(path)}") as bar:
        def lines():
            pending = 0
            for number, line in enumerate(raw, 1):
                pending += len(line)
                if pending >= _PROGRESS_BYTES:
                    bar.update(pending)
                    pending = 0
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ConversionError(f"{path}, line {number}: not UTF-8 text ({e})") from None
                if number == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                yield text
            bar.update(pending)

        reader = csv.reader(lines())
        try:
            for row in reader:
                if row:
                    yield reader.line_num, row
        except csv.Error as e:
            raise ConversionError(f"{path}, line {reader.line_num}: not a valid CSV row ({e})") from None


def _header(rows: Iterator[Tuple[int, List[str]]], path: str, required: Sequence[str], what: str) -> Dict[str, int]:
    """Column index of each required column, from the first row; error if one is missing."""
    first = next(rows, None)
    found = [] if first is None else [c.strip() for c in first[1]]
    missing = [c for c in required if c not in found]
    if missing:
        raise ConversionError(f"{path}: expected the columns {', '.join(required)} of {what}; found "
                              f"{', '.join(found) if found else 'no header (empty file)'}")
    return {c: found.index(c) for c in required}


def read_classes(path: str) -> Tuple[List[str], List[str]]:
    """``(mids, display names)`` of the class-description CSV, in file order (id = index + 1).

    Raises:
        ConversionError: a row without exactly two fields, a LabelName that is not a MID (does not
            start with "/"), a duplicate MID, or no class at all.
    """
    mids, names, seen = [], [], {}
    for line, row in csv_rows(path, "class descriptions"):
        if not mids and not seen and [c.strip() for c in row] == ["LabelName", "DisplayName"]:
            seen[None] = line  # header row (OpenImages v7 style)
            continue
        if len(row) != 2:
            raise ConversionError(f"{path}, row {line}: expected the 2 columns LabelName, DisplayName of the class "
                                  f"descriptions, found {len(row)}: {', '.join(row)[:120]}")
        mid, name = row[0].strip(), row[1]
        if not mid.startswith("/"):
            raise ConversionError(f"{path}, row {line}: {mid!r} is not an OpenImages class MID (e.g. /m/011k07); "
                                  f"expected the columns LabelName, DisplayName")
        if mid in seen:
            raise ConversionError(f"{path}, row {line}: class {mid} is listed twice (rows {seen[mid]} and {line})")
        seen[mid] = line
        mids.append(mid)
        names.append(name)
    if not mids:
        raise ConversionError(f"{path}: no classes")
    return mids, names


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
    with _progress(desc="scanning images", unit=" files") as bar:
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


class Annotations:
    """Boxes and image-level labels of one split in compact arrays (one entry per box / label).

    Images are numbered by first appearance (``keys[i]`` is the ImageID of image ``i``); boxes
    keep normalised coordinates until the image sizes are known.
    """

    def __init__(self):
        self.index: Dict[str, int] = {}
        self.keys: List[str] = []
        self.box_image = array("i")
        self.box_category = array("i")
        self.box_coords = array("d")  # XMin, YMin, XMax, YMax per box
        self.box_crowd = array("b")
        self.label_image = array("i")
        self.label_category = array("i")
        self.label_positive = array("b")
        self.skipped: Counter = Counter()

    def image(self, key: str) -> int:
        """Index of the image ``key``, added if new."""
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.keys)
            self.keys.append(key)
        return i


def read_boxes(path: str, mid_to_id: Dict[str, int], ann: Annotations) -> None:
    """Append the boxes of the box CSV to ``ann`` (category ids 1..N).

    Raises:
        ConversionError: missing columns (the message lists the columns found); a row with fewer
            fields than the header, a coordinate that is not a number or outside [0, 1],
            XMax < XMin or YMax < YMin, or an unknown LabelName (the message names the file and
            the row's line number).
    """
    rows = csv_rows(path, "box file")
    col = _header(rows, path, BOX_COLUMNS, "an OpenImages box CSV")
    i_img, i_label, i_crowd = col["ImageID"], col["LabelName"], col["IsGroupOf"]
    i_x0, i_x1, i_y0, i_y1 = col["XMin"], col["XMax"], col["YMin"], col["YMax"]
    width = max(col.values()) + 1
    image, box_image, box_category = ann.image, ann.box_image.append, ann.box_category.append
    coords, crowd, skipped = ann.box_coords.extend, ann.box_crowd.append, ann.skipped
    for line, row in rows:
        if len(row) < width:
            raise ConversionError(f"{path}, row {line}: {len(row)} fields, expected at least {width}")
        try:
            x0, x1, y0, y1 = float(row[i_x0]), float(row[i_x1]), float(row[i_y0]), float(row[i_y1])
        except ValueError:
            raise ConversionError(f"{path}, row {line}: XMin, XMax, YMin, YMax must be numbers, got "
                                  f"{row[i_x0]!r}, {row[i_x1]!r}, {row[i_y0]!r}, {row[i_y1]!r}") from None
        if not (0.0 <= x0 <= 1.0 and 0.0 <= x1 <= 1.0 and 0.0 <= y0 <= 1.0 and 0.0 <= y1 <= 1.0):
            raise ConversionError(f"{path}, row {line}: box coordinates outside [0, 1]: XMin {row[i_x0]}, "
                                  f"XMax {row[i_x1]}, YMin {row[i_y0]}, YMax {row[i_y1]}")
        if x1 < x0 or y1 < y0:
            raise ConversionError(f"{path}, row {line}: XMax < XMin or YMax < YMin: XMin {row[i_x0]}, "
                                  f"XMax {row[i_x1]}, YMin {row[i_y0]}, YMax {row[i_y1]}")
        category = mid_to_id.get(row[i_label])
        if category is None:
            raise ConversionError(f"{path}, row {line}: unknown LabelName {row[i_label]!r} (not in the class "
                                  f"descriptions)")
        if x1 == x0 or y1 == y0:
            skipped["boxes: zero width or height"] += 1
            continue
        box_image(image(row[i_img]))
        box_category(category)
        coords((x0, y0, x1, y1))
        crowd(1 if row[i_crowd].strip() == "1" else 0)


def read_image_labels(path: str, mid_to_id: Dict[str, int], ann: Annotations, on_disk: Dict[str, int]) -> None:
    """Append the verified image-level labels of boxable classes to ``ann``.

    A label of an image that is not in the box file is kept when the image is in the image folder
    (``on_disk``): the image is added, without boxes. Skipped and counted: labels of classes that
    are not boxable, of images in neither, and with a Confidence other than 0 or 1.

    Raises:
        ConversionError: missing columns, or a row with fewer fields than the header.
    """
    rows = csv_rows(path, "image-level label file")
    col = _header(rows, path, LABEL_COLUMNS, "an OpenImages image-level label CSV")
    i_img, i_label, i_conf = col["ImageID"], col["LabelName"], col["Confidence"]
    width = max(col.values()) + 1
    index, skipped = ann.index, ann.skipped
    add_image, add_category, add_sign = ann.label_image.append, ann.label_category.append, ann.label_positive.append
    for line, row in rows:
        if len(row) < width:
            raise ConversionError(f"{path}, row {line}: {len(row)} fields, expected at least {width}")
        category = mid_to_id.get(row[i_label])
        if category is None:
            skipped["image labels: class not boxable"] += 1
            continue
        confidence = row[i_conf].strip()
        if confidence in ("1", "1.0"):
            positive = 1
        elif confidence in ("0", "0.0"):
            positive = 0
        else:
            skipped["image labels: Confidence neither 0 nor 1"] += 1
            continue
        key = row[i_img]
        image = index.get(key)
        if image is None:
            if key not in on_disk:
                skipped["image labels: image neither in the box file nor in --images"] += 1
                continue
            image = ann.image(key)
        add_image(image)
        add_category(category)
        add_sign(positive)


def read_size_table(path: str, ann: Annotations) -> Dict[int, Tuple[int, int]]:
    """``{image index: (width, height)}`` from a CSV ImageID,Width,Height, for known images.

    Raises:
        ConversionError: missing columns; a width or height that is not a positive integer.
    """
    rows = csv_rows(path, "image-size file")
    col = _header(rows, path, SIZE_COLUMNS, "an image-size CSV")
    i_img, i_w, i_h = col["ImageID"], col["Width"], col["Height"]
    width = max(col.values()) + 1
    sizes = {}
    for line, row in rows:
        if len(row) < width:
            raise ConversionError(f"{path}, row {line}: {len(row)} fields, expected at least {width}")
        image = ann.index.get(row[i_img])
        if image is None:
            continue
        try:
            w, h = int(row[i_w]), int(row[i_h])
        except ValueError:
            w = h = 0
        if w <= 0 or h <= 0:
            raise ConversionError(f"{path}, row {line}: Width and Height must be positive integers, got "
                                  f"{row[i_w]!r}, {row[i_h]!r}")
        sizes[image] = (w, h)
    return sizes


# ----------------------------------------------------------------------------- image sizes


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
    with _progress(total=len(paths), desc="reading image sizes", unit=" images") as bar:
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


# ----------------------------------------------------------------------------- writing


def _fmt(v: float) -> str:
    return repr(round(v, 2) + 0.0)


def write_json(f, ann: Annotations, keep: List[int], file_names: List[str], sizes: Dict[int, Tuple[int, int]],
               mids: List[str], names: List[str], info: dict, counts: Counter) -> None:
    """Stream the COCO json of the kept images (``keep``: image indices in id order) to ``f``."""
    import numpy as np

    n_images = len(ann.keys)
    new_id = array("i", bytes(4 * n_images))  # 0: left out
    for rank, image in enumerate(keep):
        new_id[image] = rank + 1

    label_image = np.frombuffer(ann.label_image, dtype=np.int32) if len(ann.label_image) else np.zeros(0, np.int32)
    order = np.argsort(label_image, kind="stable")
    sorted_image = label_image[order]
    starts = np.searchsorted(sorted_image, np.arange(n_images), "left")
    ends = np.searchsorted(sorted_image, np.arange(n_images), "right")
    label_category, label_positive = ann.label_category, ann.label_positive

    box_counts = np.bincount(np.frombuffer(ann.box_image, dtype=np.int32), minlength=n_images) \
        if len(ann.box_image) else np.zeros(n_images, np.int64)

    f.write('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": [\n')
    f.write(",\n".join(json.dumps({"id": i + 1, "name": name, "mid": mid})
                       for i, (mid, name) in enumerate(zip(mids, names))))
    f.write('\n], "images": [\n')
    chunk = []
    with _progress(total=len(keep), desc="writing images", unit=" images") as bar:
        for rank, image in enumerate(keep):
            positive, negative = set(), set()
            for j in order[starts[image]:ends[image]].tolist():
                (positive if label_positive[j] else negative).add(label_category[j])
            both = positive & negative
            if both:
                counts["labels both positive and negative on an image (kept as positive)"] += len(both)
                negative -= both
            counts["positive image-level labels"] += len(positive)
            counts["negative image-level labels"] += len(negative)
            counts["images with boxes" if box_counts[image] else "images without boxes"] += 1
            w, h = sizes[image]
            chunk.append(f'{{"id": {rank + 1}, "file_name": {json.dumps(file_names[image])}, "height": {h}, '
                         f'"width": {w}, "image_level_labels": {{"positive": {sorted(positive)}, '
                         f'"negative": {sorted(negative)}}}}}')
            if len(chunk) == IMAGE_CHUNK:
                f.write((",\n" if rank >= IMAGE_CHUNK else "") + ",\n".join(chunk))
                chunk = []
                bar.update(IMAGE_CHUNK)
        if chunk:
            f.write((",\n" if len(keep) > len(chunk) else "") + ",\n".join(chunk))
            bar.update(len(chunk))
    f.write('\n], "annotations": [\n')
    coords, categories, crowd, box_image = ann.box_coords, ann.box_category, ann.box_crowd, ann.box_image
    ann_id = n_crowd = 0
    with_boxes = bytearray(len(mids) + 1)
    chunk = []
    with _progress(total=len(box_image), desc="writing boxes", unit=" boxes") as bar:
        for b in range(len(box_image)):
            if b % 65536 == 65535:
                bar.update(65536)
            image_id = new_id[box_image[b]]
            if not image_id:
                continue
            w_img, h_img = sizes[box_image[b]]
            x0, y0, x1, y1 = coords[4 * b], coords[4 * b + 1], coords[4 * b + 2], coords[4 * b + 3]
            x, y = x0 * w_img, y0 * h_img
            w, h = (x1 - x0) * w_img, (y1 - y0) * h_img
            ann_id += 1
            n_crowd += crowd[b]
            with_boxes[categories[b]] = 1
            chunk.append(f'{{"id": {ann_id}, "image_id": {image_id}, "category_id": {categories[b]}, "bbox": '
                         f'[{_fmt(x)}, {_fmt(y)}, {_fmt(w)}, {_fmt(h)}], "area": {_fmt(w * h)}, '
                         f'"iscrowd": {crowd[b]}}}')
            if len(chunk) == BOX_CHUNK:
                f.write((",\n" if ann_id > BOX_CHUNK else "") + ",\n".join(chunk))
                chunk = []
        if chunk:
            f.write((",\n" if ann_id > len(chunk) else "") + ",\n".join(chunk))
        bar.update(len(box_image) % 65536)
    f.write("\n]}\n")
    counts["boxes"] = ann_id
    counts["boxes with IsGroupOf (iscrowd 1)"] = n_crowd
    counts["classes with boxes"] = sum(with_boxes)


# ----------------------------------------------------------------------------- main


def convert(args: argparse.Namespace) -> Counter:
    """Run the conversion; returns the counts printed at the end.

    Raises:
        ConversionError: see the module docstring.
    """
    from regionspot.cli import setup_logging
    from regionspot.io import atomic_write

    inputs = [p for p in (args.boxes, args.classes, args.image_labels, args.image_sizes) if p]
    for p in inputs:
        if not os.path.isfile(p):
            raise ConversionError(f"input file not found: {p}")
    log_file = args.output + ".log"
    for target in (args.output, log_file):
        if any(os.path.realpath(p) == os.path.realpath(target) for p in inputs):
            raise ConversionError(f"refusing to write {target}: it is an input file")
    if os.path.isdir(args.output):
        raise ConversionError(f"{args.output} is a folder; give the json file to write")
    if os.path.exists(args.output) and not args.overwrite:
        raise ConversionError(f"{args.output} exists; pass --overwrite to replace it")
    if not os.path.isdir(args.images):
        raise ConversionError(f"image folder not found: {args.images}")
    setup_logging(log_file)  # the output is checked: from here on the log file records the run

    mids, names = read_classes(args.classes)
    mid_to_id = {mid: i + 1 for i, mid in enumerate(mids)}
    on_disk, dirs, exts = scan_images(args.images)
    ann = Annotations()
    read_boxes(args.boxes, mid_to_id, ann)
    if args.image_labels:
        read_image_labels(args.image_labels, mid_to_id, ann, on_disk)
    counts = Counter()

    n = len(ann.keys)
    file_names: List[Optional[str]] = [None] * n
    missing = []
    for i, key in enumerate(ann.keys):
        code = on_disk.get(key)
        if code is None:
            missing.append(i)
        else:
            file_names[i] = os.path.join(dirs[code >> 3], key + exts[code & 7])
    dropped = set()
    if missing:
        if not args.skip_missing_images:
            examples = ", ".join(ann.keys[i] for i in missing[:3])
            raise ConversionError(f"{len(missing)} images of {args.boxes} are not in {args.images} (e.g. {examples}); "
                                  f"pass --skip-missing-images to leave them and their boxes out")
        dropped.update(missing)
        counts["images left out: not in --images"] = len(missing)

    sizes = read_size_table(args.image_sizes, ann) if args.image_sizes else {}
    to_read = [i for i in range(n) if i not in dropped and i not in sizes]
    results = read_image_sizes([os.path.join(args.images, file_names[i]) for i in to_read], args.workers)
    bad = []
    for i, (w, h, turned, error) in zip(to_read, results):
        if error is not None or w <= 0 or h <= 0:
            bad.append((i, error or f"size {w}x{h}"))
            continue
        sizes[i] = (w, h)
        counts["images turned by their EXIF orientation (width and height swapped)"] += turned
    if bad:
        if not args.skip_missing_images:
            examples = "; ".join(f"{file_names[i]}: {e}" for i, e in bad[:3])
            raise ConversionError(f"{len(bad)} images cannot be read in {args.images} ({examples}); pass "
                                  f"--skip-missing-images to leave them and their boxes out")
        dropped.update(i for i, _ in bad)
        counts["images left out: unreadable"] = len(bad)
    if dropped:
        counts["boxes left out with their images"] = sum(1 for b in ann.box_image if b in dropped)

    keep = sorted((i for i in range(n) if i not in dropped), key=ann.keys.__getitem__)
    info = {"description": "OpenImages v6 boxes in COCO format, written by tools/convert_openimages.py",
            "boxes": os.path.basename(args.boxes), "classes": os.path.basename(args.classes),
            "image_labels": os.path.basename(args.image_labels) if args.image_labels else None,
            "bbox": "XYWH absolute pixels of the image as displayed (EXIF orientation applied): x = XMin*width, "
                    "y = YMin*height, w = (XMax-XMin)*width, h = (YMax-YMin)*height; iscrowd = IsGroupOf",
            "image_level_labels": "category ids of the human-verified image-level labels: positive (present) and "
                                  "negative (verified absent)"}
    atomic_write(args.output, lambda f: write_json(f, ann, keep, file_names, sizes, mids, names, info, counts), "w")
    counts["images"] = len(keep)
    counts["classes"] = len(mids)
    counts.update(ann.skipped)
    return counts


def report(counts: Counter, output: str) -> None:
    """Print the counts of a conversion."""
    print(f"wrote {output}")
    print(f"images: {counts['images']} (with boxes: {counts['images with boxes']}, without boxes: "
          f"{counts['images without boxes']})")
    print(f"boxes: {counts['boxes']} (IsGroupOf: {counts['boxes with IsGroupOf (iscrowd 1)']})")
    print(f"classes: {counts['classes']} (with boxes: {counts['classes with boxes']})")
    print(f"image-level labels: {counts['positive image-level labels']} positive, "
          f"{counts['negative image-level labels']} negative")
    for note in ("labels both positive and negative on an image (kept as positive)",
                 "images turned by their EXIF orientation (width and height swapped)"):
        if counts[note]:
            print(f"{note}: {counts[note]}")
    skipped = sorted((k, v) for k, v in counts.items()
                     if k.startswith(("boxes:", "image labels:", "images left out", "boxes left out")) and v)
    print("skipped: none" if not skipped else "skipped:")
    for k, v in skipped:
        print(f"  {k}: {v}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status (2 for bad input, with one
    ``convert_openimages.py: error:`` line on stderr; the traceback too with ``--debug``)."""
    with warnings.catch_warnings():  # import-time deprecation noise of dependencies
        warnings.filterwarnings("ignore", message=".*(torch.jit|pkg_resources).*")
        from regionspot.cli import setup_logging  # noqa: F401 (imported under the filter: import-time noise)

    args = build_parser().parse_args(argv)

    def run() -> int:
        report(convert(args), args.output)
        return 0

    return run_tool(run, PROG, args.debug)  # the log file once the output is checked (convert)


if __name__ == "__main__":
    sys.exit(main())
