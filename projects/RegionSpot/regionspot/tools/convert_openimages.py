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
import os
import sys
import warnings
from collections import Counter
from typing import List, Optional, Sequence

from regionspot.tools.common import run_tool
from regionspot.tools.openimages.annotations import (  # noqa: F401 (re-exported: the tool's public names)
    BOX_COLUMNS,
    LABEL_COLUMNS,
    SIZE_COLUMNS,
    Annotations,
    read_boxes,
    read_classes,
    read_image_labels,
    read_size_table,
)
from regionspot.tools.openimages.coco_json import BOX_CHUNK, IMAGE_CHUNK, write_json  # noqa: F401 (re-exported)
from regionspot.tools.openimages.csv_files import ConversionError, csv_rows  # noqa: F401 (re-exported)
from regionspot.tools.openimages.images import (  # noqa: F401 (re-exported)
    IMAGE_EXTENSIONS,
    image_size,
    read_image_sizes,
    scan_images,
)

PROG = "convert_openimages.py"


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
