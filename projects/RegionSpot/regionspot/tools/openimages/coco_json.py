"""Writing the converted split as a COCO-format json, streamed in chunks (:func:`write_json`), for
``regionspot-convert-openimages`` (:mod:`regionspot.tools.convert_openimages`; the format is
described there)."""

import json
from array import array
from collections import Counter
from typing import Dict, List, Tuple

from regionspot.tools.openimages.annotations import Annotations
from regionspot.tools.openimages.csv_files import progress

IMAGE_CHUNK = 4096  # json entries formatted before each write
BOX_CHUNK = 16384


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
    with progress(total=len(keep), desc="writing images", unit=" images") as bar:
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
    with progress(total=len(box_image), desc="writing boxes", unit=" boxes") as bar:
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
