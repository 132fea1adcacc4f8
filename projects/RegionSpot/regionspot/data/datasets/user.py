"""A user's own LVIS- or COCO-format dataset (a json file and an image folder), registered in
Detectron2's catalog from the command line: ``--register NAME JSON IMAGE_ROOT``.

The format is recognised from the json (LVIS: the categories carry LVIS's ``frequency``, which
the LVIS evaluator needs; otherwise COCO). The vocabulary
is the json's categories, in category-id order, set in the metadata at registration so that
everything that needs it (evaluation, the demo, the text-embedding tool) has it before any
image is loaded. Evaluation uses the LVIS evaluator (AP, APr, APc, APf) for LVIS files and
Detectron2's COCO evaluator for COCO files.

Image paths: an image's ``file_name`` is joined to IMAGE_ROOT; an LVIS image with only a
``coco_url`` (as in the official LVIS files) is found at ``IMAGE_ROOT/<split>/<name>``
(``train2017``...) or ``IMAGE_ROOT/<name>``.
"""

import json
import logging
import os
from typing import Dict, List, Sequence, Tuple

from ..validation import InputError

logger = logging.getLogger(__name__)

FORMATS = ("lvis", "coco")


def detect_json_format(data: dict) -> str:
    """"lvis" when the categories carry LVIS's ``frequency`` (what APr/APc/APf and the LVIS
    evaluator need), else "coco"."""
    categories = data.get("categories") or []
    return "lvis" if categories and all("frequency" in c for c in categories) else "coco"


def read_dataset_json(json_file: str) -> dict:
    """Read and check a COCO/LVIS-format json: ``images`` (id, height, width, and file_name or
    coco_url), ``annotations`` (image_id, category_id, bbox), ``categories`` (id, name).

    Raises:
        InputError: missing file, invalid JSON, or missing lists/keys (the message names the
            file and the first offending entry).
    """
    try:
        with open(json_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"dataset json not found: {json_file!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{json_file}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{json_file}: expected a COCO/LVIS json object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(f"{json_file}: lacks the list {key!r} of a COCO/LVIS-format dataset")
    if not data["categories"]:
        raise InputError(f"{json_file}: 'categories' is empty: the dataset has no vocabulary")
    required = {"images": ("id", "height", "width"), "annotations": ("image_id", "category_id", "bbox"),
                "categories": ("id", "name")}
    for key, fields in required.items():
        for i, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise InputError(f"{json_file}: {key}[{i}] lacks {', '.join(missing)}")
    for i, img in enumerate(data["images"]):
        if "file_name" not in img and "coco_url" not in img:
            raise InputError(f"{json_file}: images[{i}] (id {img['id']}) has neither file_name nor coco_url")
    return data


def dataset_metadata(data: dict, json_file: str, image_root: str) -> Dict[str, object]:
    """Detectron2 metadata of a dataset json: ``thing_classes`` (category names in id order),
    ``thing_dataset_id_to_contiguous_id``, ``json_file``, ``image_root``, ``evaluator_type``.

    Raises:
        InputError: duplicate category ids.
    """
    categories = sorted(data["categories"], key=lambda c: c["id"])
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise InputError(f"{json_file}: duplicate category ids in 'categories'")
    return {"thing_classes": [str(c["name"]) for c in categories],
            "thing_dataset_id_to_contiguous_id": {cid: i for i, cid in enumerate(ids)},
            "json_file": os.path.abspath(json_file), "image_root": os.path.abspath(image_root),
            "evaluator_type": detect_json_format(data)}


def _image_path(img: dict, image_root: str) -> str:
    if "file_name" in img:
        return os.path.join(image_root, img["file_name"])
    split, name = img["coco_url"].rstrip("/").split("/")[-2:]
    with_split = os.path.join(image_root, split, name)
    return with_split if os.path.exists(with_split) else os.path.join(image_root, name)


def load_dataset_json(json_file: str, image_root: str, extra_image_keys: Sequence[str] = ()) -> List[dict]:
    """Detectron2 dataset dicts of a COCO/LVIS-format json.

    Args:
        json_file: the annotation file.
        image_root: the folder that the images' ``file_name`` are relative to.
        extra_image_keys: further keys of the json's image entries to copy, as they are, into
            each record when an image has them (e.g. ``"image_level_labels"``).

    Returns:
        One dict per image: ``file_name``, ``height``, ``width``, ``image_id``, LVIS's
        ``neg_category_ids`` / ``not_exhaustive_category_ids`` when present, and
        ``annotations`` with ``bbox`` (XYWH_ABS pixels of the original image), ``bbox_mode``,
        ``category_id`` (contiguous, in ``thing_classes`` order) and ``iscrowd``. Annotations
        of zero or negative width or height are skipped, counted in a logged warning (large
        datasets have a few; there is no region to recognise).

    Raises:
        InputError: see :func:`read_dataset_json`; an annotation of an unknown image or category.
    """
    return dataset_dicts_from_json_data(read_dataset_json(json_file), json_file, image_root, extra_image_keys)


def dataset_dicts_from_json_data(data: dict, json_file: str, image_root: str,
                                 extra_image_keys: Sequence[str] = ()) -> List[dict]:
    """:func:`load_dataset_json` on a json already read (and checked) by :func:`read_dataset_json`,
    so that a caller that also needs the metadata (:func:`dataset_metadata`) reads a large file
    once. ``json_file`` only names the file in errors and in the metadata."""
    from detectron2.structures import BoxMode

    to_contiguous = dataset_metadata(data, json_file, image_root)["thing_dataset_id_to_contiguous_id"]
    records = {}
    for img in data["images"]:
        record = {"file_name": _image_path(img, image_root), "height": int(img["height"]),
                  "width": int(img["width"]), "image_id": img["id"], "annotations": []}
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key in img:
                record[key] = list(img[key])
        for key in extra_image_keys:
            if key in img:
                record[key] = img[key]
        records[img["id"]] = record
    degenerate = []
    for ann in data["annotations"]:
        if ann["image_id"] not in records:
            raise InputError(f"{json_file}: annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
        if ann["category_id"] not in to_contiguous:
            raise InputError(f"{json_file}: annotation {ann.get('id')} has category_id {ann['category_id']}, which is "
                             f"not in 'categories'")
        bbox = [float(v) for v in ann["bbox"]]
        if len(bbox) != 4 or not (bbox[2] > 0 and bbox[3] > 0):
            degenerate.append(ann.get("id"))  # zero or negative size: no region to recognise
            continue
        records[ann["image_id"]]["annotations"].append({
            "bbox": bbox, "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": to_contiguous[ann["category_id"]], "iscrowd": int(ann.get("iscrowd", 0))})
    if degenerate:
        logger.warning("%s: %d annotation(s) with zero or negative width/height skipped (ids %s%s)", json_file,
                       len(degenerate), degenerate[:10], ", ..." if len(degenerate) > 10 else "")
    return list(records.values())


def register_dataset(name: str, json_file: str, image_root: str) -> Dict[str, object]:
    """Register a COCO/LVIS-format dataset in Detectron2's catalog, its vocabulary included.

    Args:
        name: the dataset name to use in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        json_file: the annotation file.
        image_root: the folder of its images.

    Returns:
        The metadata set (see :func:`dataset_metadata`).

    Raises:
        InputError: a missing json or image folder, a malformed json, or ``name`` already
            registered for another json file.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if not os.path.isdir(image_root):
        raise InputError(f"--register {name}: image folder not found: {image_root!r}")
    data = read_dataset_json(json_file)
    meta = dataset_metadata(data, json_file, image_root)
    if name in DatasetCatalog.list():
        if MetadataCatalog.get(name).get("json_file", None) == meta["json_file"]:
            return meta
        raise InputError(f"--register {name}: the name is already registered (for "
                         f"{MetadataCatalog.get(name).get('json_file', 'another dataset')}); choose another name")
    DatasetCatalog.register(name, lambda: load_dataset_json(json_file, image_root))
    MetadataCatalog.get(name).set(**meta)
    logger.info("Registered %s: %s (%s format, %d images, %d categories), images in %s", name, json_file,
                meta["evaluator_type"], len(data["images"]), len(meta["thing_classes"]), image_root)
    return meta


def add_register_argument(parser) -> None:
    """Add ``--register NAME JSON IMAGE_ROOT`` (repeatable) to an argparse parser."""
    parser.add_argument("--register", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register your own COCO- or LVIS-format dataset (repeatable); its vocabulary is "
                             "the json's categories")


def register_from_args(registrations: Sequence[Tuple[str, str, str]]) -> List[str]:
    """Register every ``(name, json, image_root)`` given with ``--register``; returns the names."""
    for name, json_file, image_root in registrations:
        register_dataset(name, json_file, image_root)
    return [name for name, _, _ in registrations]
