"""The Open Images annotations of one split, read from the official CSV files into compact arrays
(:class:`Annotations`): the boxable classes, the boxes, the human-verified image-level labels
and an optional table of image sizes. Part of ``regionspot-convert-openimages``
(:mod:`regionspot.tools.convert_openimages`)."""

from array import array
from collections import Counter
from typing import Dict, List, Tuple

from regionspot.tools.openimages.csv_files import ConversionError, csv_rows, read_header

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")
LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")
SIZE_COLUMNS = ("ImageID", "Width", "Height")


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
    col = read_header(rows, path, BOX_COLUMNS, "an OpenImages box CSV")
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
    col = read_header(rows, path, LABEL_COLUMNS, "an OpenImages image-level label CSV")
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
    col = read_header(rows, path, SIZE_COLUMNS, "an image-size CSV")
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
