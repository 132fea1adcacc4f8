"""The bundled real-photo sample dataset (``regionspot_sample``), in LVIS v1 format.

The repository stores only hand-made box annotations (``regionspot_sample.json`` next to this
file); the photographs themselves come out of installed Python packages (scikit-image's sample
data, optionally scikit-learn's sample images), so the sample works offline and nothing binary
is committed. :func:`prepare_regionspot_sample` writes the photos and a complete LVIS-format JSON
under a root directory, and :func:`register_regionspot_sample` registers the result with
Detectron2 so that ``DATASETS.TRAIN/TEST = ("regionspot_sample",)`` and the LVIS evaluator work.

Coordinates: every box in the committed file and in the written JSON is LVIS/COCO
``[x, y, width, height]`` in absolute pixels of the original (unresized) image, which is
Detectron2's ``BoxMode.XYWH_ABS``. The sample has boxes only, no instance masks.
"""

import json
import logging
import os
from collections import Counter

import numpy as np

from ...io import atomic_write

__all__ = [
    "SAMPLE_ANNOTATIONS",
    "JSON_NAME",
    "IMAGE_DIR",
    "load_sample_image",
    "prepare_regionspot_sample",
    "register_regionspot_sample",
    "sample_root",
]

logger = logging.getLogger(__name__)

#: The committed, hand-written annotation file (no categories; no image files).
SAMPLE_ANNOTATIONS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "regionspot_sample.json"
)

#: Name of the complete LVIS-format JSON that :func:`prepare_regionspot_sample` writes in ``root``.
JSON_NAME = "regionspot_sample_lvis_v1.json"

#: Sub-directory of ``root`` that receives the PNG images.
IMAGE_DIR = "images"

_SKIMAGE_PREFIX = "skimage.data."
_SKLEARN_PREFIX = "sklearn.datasets.load_sample_images:"
# Photographs shipped inside the scikit-image wheel (no download through pooch needed).
# ``stereo_motorcycle`` returns (left, right, disparity); the left view is used.
_SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "cat",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "rocket",
    "stereo_motorcycle",
)
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")

_NUM_LVIS_V1_CATEGORIES = 1203


def _known_sources():
    return [_SKIMAGE_PREFIX + n for n in _SKIMAGE_PHOTOS] + [
        _SKLEARN_PREFIX + n for n in _SKLEARN_PHOTOS
    ]


def load_sample_image(source: str) -> np.ndarray:
    """Load one bundled photograph from the installed package named by ``source``.

    Args:
        source: ``"skimage.data.<name>"`` for one of the photographs shipped with
            scikit-image (astronaut, camera, cat, chelsea, clock, coffee, coins, rocket,
            stereo_motorcycle -- the left view of the stereo pair), or
            ``"sklearn.datasets.load_sample_images:<file>"`` with ``<file>`` one of
            ``china.jpg``, ``flower.jpg``. No network access is needed for any of them.

    Returns:
        np.ndarray: (H, W, 3) uint8 RGB image, C-contiguous; grey-level photographs are
        repeated over the three channels. H and W are the photo's original size.

    Raises:
        ValueError: ``source`` is not one of the sources above (the message names it and
            lists the known ones), or the package returned an array that is not a 2-D grey
            or 3-D RGB(A) image.
        ImportError: the package that ``source`` names is not installed.
    """
    if not isinstance(source, str):
        raise ValueError(f"Unknown sample image source {source!r}: expected a string")
    if source.startswith(_SKIMAGE_PREFIX) and source[len(_SKIMAGE_PREFIX):] in _SKIMAGE_PHOTOS:
        import skimage.data

        name = source[len(_SKIMAGE_PREFIX):]
        image = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            image = image[0]  # (left, right, disparity) -> left view
    elif source.startswith(_SKLEARN_PREFIX) and source[len(_SKLEARN_PREFIX):] in _SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image as _sklearn_load_sample_image

        image = _sklearn_load_sample_image(source[len(_SKLEARN_PREFIX):])
    else:
        raise ValueError(
            f"Unknown sample image source {source!r}; known sources: {', '.join(_known_sources())}"
        )
    return _to_rgb_uint8(np.asarray(image), source)


def _to_rgb_uint8(image: np.ndarray, source: str) -> np.ndarray:
    """(H, W) or (H, W, 1|3|4) array of uint8/bool -> (H, W, 3) uint8 RGB."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise ValueError(f"{source}: expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"{source}: expected a grey or RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image)


def _load_committed_annotations(path: str = None) -> dict:
    """Read and check the committed annotation file; raise ValueError on any inconsistency."""
    path = path or SAMPLE_ANNOTATIONS
    with open(path, "r", encoding="utf-8") as f:
        data = json.load(f)
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing list '{key}'")
    images = {}
    for img in data["images"]:
        for key in ("id", "file_name", "source", "height", "width"):
            if key not in img:
                raise ValueError(f"{path}: image {img.get('id')!r} lacks '{key}'")
        if img["id"] in images:
            raise ValueError(f"{path}: duplicate image id {img['id']}")
        if os.path.basename(img["file_name"]) != img["file_name"]:
            raise ValueError(f"{path}: file_name {img['file_name']!r} must be a bare file name")
        images[img["id"]] = img
    ann_ids = set()
    for ann in data["annotations"]:
        if ann["id"] in ann_ids:
            raise ValueError(f"{path}: duplicate annotation id {ann['id']}")
        ann_ids.add(ann["id"])
        img = images.get(ann["image_id"])
        if img is None:
            raise ValueError(
                f"{path}: annotation {ann['id']} refers to unknown image {ann['image_id']}"
            )
        if not 1 <= int(ann["category_id"]) <= _NUM_LVIS_V1_CATEGORIES:
            raise ValueError(f"{path}: annotation {ann['id']} has category_id {ann['category_id']} "
                             f"outside LVIS v1's 1..{_NUM_LVIS_V1_CATEGORIES}")
        x, y, w, h = ann["bbox"]
        if not (w > 0 and h > 0 and x >= 0 and y >= 0
                and x + w <= img["width"] and y + h <= img["height"]):
            raise ValueError(
                f"{path}: annotation {ann['id']} bbox {ann['bbox']} (XYWH) is empty or outside "
                f"its {img['width']}x{img['height']} image {img['file_name']}"
            )
    return data


def _png_size(path: str):
    """(width, height) of an existing readable image file, or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            return im.size
    except Exception:  # unreadable / truncated file: rewrite it
        return None


def prepare_regionspot_sample(root: str) -> tuple[str, str]:
    """Write the sample's images and complete LVIS v1 JSON under ``root``.

    * ``root/images/<file_name>``: each photograph from :func:`load_sample_image`, saved as a
      lossless RGB PNG at its original size. A file that already exists with the size the
      annotations give is kept as it is; otherwise it is (re)written, atomically.
    * ``root/regionspot_sample_lvis_v1.json``: the committed annotations
      (:data:`SAMPLE_ANNOTATIONS`) completed into the LVIS v1 format that ``lvis.LVIS``,
      ``lvis.LVISEval`` and Detectron2's ``load_lvis_json`` read, written atomically (temp
      file + ``os.replace``):

      - images: ``id``, ``file_name``, ``height``, ``width``, ``neg_category_ids``,
        ``not_exhaustive_category_ids``, ``coco_url`` (a ``file://`` URL of the written image,
        whose last two parts ``images/<file_name>`` are what Detectron2's ``load_lvis_json``
        reads) and the informative ``source``.
      - annotations: ``id``, ``image_id``, ``category_id`` (LVIS v1 id, 1-based), ``bbox``
        (``[x, y, w, h]``, absolute pixels of the original image, XYWH), ``area`` = w * h,
        ``iscrowd`` = 0 and ``segmentation`` = the box as one polygon
        ``[[x0, y0, x1, y0, x1, y1, x0, y1]]`` -- the sample is annotated with boxes only,
        so its "masks" are the boxes and mask metrics on it are box metrics.
      - categories: all 1203 LVIS v1 categories from Detectron2's built-in
        ``LVIS_CATEGORIES`` (``id``, ``name``, ``synonyms``, ``def``, ``synset``,
        ``frequency``), each with ``image_count`` / ``instance_count`` counted on this sample.

    Args:
        root: directory to write into (created if missing).

    Returns:
        (json_path, image_root): absolute path of the written JSON and of the directory that
        holds the PNG files (``root/images``).

    Raises:
        ValueError: the committed annotations are inconsistent (duplicate ids, unknown image,
            category id outside 1..1203, box empty or outside its image), a ``source`` is
            unknown, or a photograph's size differs from the height/width in the annotation
            file (e.g. a different package version ships a different photo).
        ImportError: detectron2, scikit-image or scikit-learn (when a source needs it) is
            missing.
    """
    from PIL import Image

    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    data = _load_committed_annotations()
    root = os.path.abspath(root)
    image_root = os.path.join(root, IMAGE_DIR)
    os.makedirs(image_root, exist_ok=True)

    for img in data["images"]:
        path = os.path.join(image_root, img["file_name"])
        expected = (int(img["width"]), int(img["height"]))
        if os.path.isfile(path) and _png_size(path) == expected:
            continue
        array = load_sample_image(img["source"])
        got = (array.shape[1], array.shape[0])
        if got != expected:
            raise ValueError(
                f"Sample image {img['file_name']!r} from {img['source']} is {got[0]}x{got[1]} "
                f"(width x height) but {SAMPLE_ANNOTATIONS} says {expected[0]}x{expected[1]}; "
                "the installed package ships a different photo, so the boxes would not match"
            )
        atomic_write(path, lambda f, a=array: Image.fromarray(a).save(f, format="PNG"))
        if _png_size(path) != expected:
            raise ValueError(f"Written image {path} does not have the expected size {expected}")

    if len(LVIS_CATEGORIES) != _NUM_LVIS_V1_CATEGORIES:
        raise ValueError(f"Expected {_NUM_LVIS_V1_CATEGORIES} LVIS v1 categories, "
                         f"Detectron2 provides {len(LVIS_CATEGORIES)}")

    images = []
    for img in data["images"]:
        images.append({
            "id": int(img["id"]),
            "file_name": img["file_name"],
            "height": int(img["height"]),
            "width": int(img["width"]),
            "neg_category_ids": [int(c) for c in img.get("neg_category_ids", [])],
            "not_exhaustive_category_ids": [
                int(c) for c in img.get("not_exhaustive_category_ids", [])
            ],
            "coco_url": "file://" + os.path.join(image_root, img["file_name"]),
            "source": img["source"],
        })
    annotations = []
    for ann in data["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        annotations.append({
            "id": int(ann["id"]),
            "image_id": int(ann["image_id"]),
            "category_id": int(ann["category_id"]),
            "bbox": [x, y, w, h],
            "area": w * h,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            "iscrowd": 0,
        })
    instance_count = Counter(a["category_id"] for a in annotations)
    image_count = Counter(c for c, _ in {(a["category_id"], a["image_id"]) for a in annotations})
    categories = []
    for cat in sorted(LVIS_CATEGORIES, key=lambda c: c["id"]):
        keys = ("id", "name", "synonyms", "def", "synset", "frequency")
        entry = {k: cat[k] for k in keys if k in cat}
        entry["image_count"] = image_count.get(cat["id"], 0)
        entry["instance_count"] = instance_count.get(cat["id"], 0)
        categories.append(entry)

    info = dict(data.get("info", {}))
    info["generated_by"] = "regionspot.data.datasets.regionspot_sample.prepare_regionspot_sample"
    lvis_json = {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    json_path = os.path.join(root, JSON_NAME)
    payload = json.dumps(lvis_json).encode("utf-8")
    atomic_write(json_path, lambda f: f.write(payload))
    return json_path, image_root


def sample_vocabulary_metadata() -> dict:
    """Metadata of the sample's own vocabulary: the LVIS v1 categories it annotates.

    Returns:
        dict with ``thing_classes`` (Detectron2's LVIS v1 names of those categories, in
        LVIS-id order) and ``thing_dataset_id_to_contiguous_id`` ({LVIS id: index}), which
        Detectron2's ``LVISEvaluator`` uses to map predictions back to LVIS ids.
    """
    from detectron2.data.datasets.lvis import get_lvis_instances_meta

    lvis_names = get_lvis_instances_meta("lvis_v1")["thing_classes"]
    ids = sorted({int(a["category_id"]) for a in _load_committed_annotations()["annotations"]})
    return {"thing_classes": [lvis_names[i - 1] for i in ids],
            "thing_dataset_id_to_contiguous_id": {i: k for k, i in enumerate(ids)}}


def _load_sample_dicts(root: str):
    from detectron2.data.datasets.lvis import load_lvis_json

    json_path, _ = prepare_regionspot_sample(root)
    # load_lvis_json finds images at `<image_root><split folder>/<name>` from the coco_url,
    # and numbers categories `LVIS id - 1`; map those to the sample's vocabulary.
    dicts = load_lvis_json(json_path, os.path.abspath(root) + os.sep, dataset_name=None)
    to_contiguous = sample_vocabulary_metadata()["thing_dataset_id_to_contiguous_id"]
    for record in dicts:
        for ann in record["annotations"]:
            ann["category_id"] = to_contiguous[ann["category_id"] + 1]
    return dicts


def sample_root() -> str:
    """Default folder of the sample: ``$DETECTRON2_DATASETS/regionspot_sample`` (``datasets/``
    in the current directory when unset, Detectron2's convention for built-in datasets)."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "regionspot_sample")


def register_regionspot_sample(root: str, name: str = "regionspot_sample") -> None:
    """Prepare the sample under ``root`` and register it with Detectron2 as ``name``.

    Registration is lazy: the registered function calls :func:`prepare_regionspot_sample`
    (writing the photos and JSON on first use), then returns Detectron2's
    ``load_lvis_json(json_path, ..., dataset_name=None)``: a list of Detectron2 dicts
    with ``file_name`` (``image_root/<file_name>``), ``height``, ``width``, ``image_id``,
    ``neg_category_ids`` / ``not_exhaustive_category_ids`` (LVIS ids) and ``annotations``
    whose ``bbox`` is ``[x, y, w, h]`` with ``bbox_mode=BoxMode.XYWH_ABS`` (absolute pixels of
    the original image) and whose ``category_id`` indexes the sample's own vocabulary (the
    LVIS v1 categories it annotates, see :func:`sample_vocabulary_metadata`: small enough
    to train and evaluate on a CPU in minutes). ``MetadataCatalog.get(name)`` gets
    ``json_file``, ``image_root``, ``evaluator_type="lvis"`` and the built-in LVIS v1
    metadata of that vocabulary (``thing_classes``, ``thing_dataset_id_to_contiguous_id``).

    Idempotent: if ``name`` is already registered with the same ``json_file`` and
    ``image_root`` it is left as it is. A previous registration of this sample (or one
    without ``json_file`` metadata) under another root is replaced, with a warning.

    Raises:
        ValueError: ``name`` is already registered for a different dataset (its
            ``json_file`` is not a RegionSpot sample file); anything
            :func:`prepare_regionspot_sample` raises.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    root = os.path.abspath(root)
    json_path, image_root = os.path.join(root, JSON_NAME), os.path.join(root, IMAGE_DIR)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        old_json = meta.get("json_file", None)
        old_root = meta.get("image_root", None)
        if old_json == json_path and old_root == image_root:
            return
        if old_json is not None and os.path.basename(old_json) != JSON_NAME:
            raise ValueError(
                f"Dataset {name!r} is already registered with json_file={old_json!r}; "
                "choose another name for the RegionSpot sample"
            )
        logger.warning("Re-registering %r: %s -> %s", name, old_json, json_path)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)

    DatasetCatalog.register(name, lambda: _load_sample_dicts(root))
    MetadataCatalog.get(name).set(
        json_file=json_path,
        image_root=image_root,
        evaluator_type="lvis",
        **sample_vocabulary_metadata(),
    )
