"""The paper's training datasets in Detectron2's catalog: Objects365, OpenImages v6, V3Det.

Registered names and their default files under ``$DETECTRON2_DATASETS`` (``datasets/`` when
unset; see ``datasets/README.md`` for the downloads and the conversion of OpenImages):

- ``objects365_v1_train``: ``objects365_v1/annotations/objects365_train.json``, images in
  ``objects365_v1/train/``;
- ``objects365_v2_train`` / ``objects365_v2_val``:
  ``objects365_v2/annotations/zhiyuan_objv2_{train,val}.json``, images in
  ``objects365_v2/{train,val}/``;
- ``openimages_v6_train`` / ``openimages_v6_val``:
  ``openimages_v6/annotations/openimages_v6_{train,val}.json`` (written by
  ``tools/convert_openimages.py``), images in ``openimages_v6/{train,validation}/``;
- ``v3det_v1_train`` / ``v3det_v1_val``: ``V3Det/annotations/v3det_2023_v1_{train,val}.json``,
  images in ``V3Det/`` (the json's ``file_name`` is ``images/<synset>/<file>``), category tree
  ``V3Det/annotations/v3det_2023_v1_category_tree.json`` (optional).

Registration is lazy: importing this module reads no file. Each name is registered with a loader
that, when the dataset is first used (``DatasetCatalog.get``), reads the json once with
RegionSpot's COCO/LVIS loader (:mod:`.user`) and sets the vocabulary in ``MetadataCatalog``:
``thing_classes`` (the json's category names in category-id order) and
``thing_dataset_id_to_contiguous_id``. ``json_file``, ``image_root`` and ``evaluator_type``
("coco") are set at registration. A name that is already registered is left as it is.

Dataset dicts: Detectron2's standard dicts (``file_name``, ``height``, ``width``, ``image_id``,
``annotations`` with ``bbox`` in XYWH_ABS pixels of the original image, ``bbox_mode``,
contiguous ``category_id``, ``iscrowd``), plus the information about which classes are *not*
exhaustively labelled, for a loss that must not treat them as negatives:

* OpenImages: ``record["image_level_labels"]``, a sorted list of the contiguous class ids whose
  presence or absence was verified by humans for that image (the json's positive and negative
  image-level labels, and the classes of the image's boxes). Classes outside the list are not
  exhaustively labelled for that image.
* V3Det: ``MetadataCatalog.get(name).category_ancestors``, ``{contiguous id: sorted contiguous ids
  of all its ancestors}`` in V3Det's category tree (a separate official file,
  ``v3det_2023_v1_category_tree.json``; the annotation json itself has no hierarchy). Set when the
  tree file exists (default: next to the annotation json) or is given explicitly.

Objects365: the v2 json names images ``images/v1/patchN/<file>.jpg`` while some unpacking
layouts keep only ``patchN/<file>.jpg``; the loader checks the first images on disk and, when the
path as given is missing but its last two (or last one) components exist under the image root,
uses that form for every image.
"""

import contextlib
import gc
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from ..validation import InputError
from .user import dataset_dicts_from_json_data, dataset_metadata, read_dataset_json

__all__ = [
    "TRAINING_DATASETS",
    "DatasetSpec",
    "datasets_root",
    "register_training_dataset",
    "register_all_training_datasets",
    "load_training_dataset",
    "category_ancestors_from_tree",
    "image_level_label_ids",
]

logger = logging.getLogger(__name__)

README = "datasets/README.md"


@dataclass(frozen=True)
class DatasetSpec:
    """Where a training dataset lives and how it is read.

    Attributes:
        json_file: annotation json, relative to the datasets root (or absolute).
        image_root: folder the images' ``file_name`` are relative to (relative to the root, or
            absolute).
        kind: "objects365", "openimages" or "v3det" (selects the extras described in the module
            docstring).
        vocabulary: a built-in vocabulary the json's category names are expected to equal (a
            warning names the first differences otherwise), or None.
        category_tree: V3Det's category-tree json (relative to the root, or absolute), or None.
        tree_required: True when ``category_tree`` was given explicitly: a missing file is then an
            error instead of "no hierarchy".
    """

    json_file: str
    image_root: str
    kind: str
    vocabulary: Optional[str] = None
    category_tree: Optional[str] = None
    tree_required: bool = False


_V3DET_TREE = "V3Det/annotations/v3det_2023_v1_category_tree.json"

#: The built-in training datasets: name -> default location under the datasets root.
TRAINING_DATASETS: Dict[str, DatasetSpec] = {
    "objects365_v1_train": DatasetSpec("objects365_v1/annotations/objects365_train.json", "objects365_v1/train",
                                       "objects365", vocabulary="objects365_v1"),
    "objects365_v2_train": DatasetSpec("objects365_v2/annotations/zhiyuan_objv2_train.json", "objects365_v2/train",
                                       "objects365", vocabulary="objects365"),
    "objects365_v2_val": DatasetSpec("objects365_v2/annotations/zhiyuan_objv2_val.json", "objects365_v2/val",
                                     "objects365", vocabulary="objects365"),
    "openimages_v6_train": DatasetSpec("openimages_v6/annotations/openimages_v6_train.json", "openimages_v6/train",
                                       "openimages"),
    "openimages_v6_val": DatasetSpec("openimages_v6/annotations/openimages_v6_val.json",
                                     "openimages_v6/validation", "openimages"),
    "v3det_v1_train": DatasetSpec("V3Det/annotations/v3det_2023_v1_train.json", "V3Det", "v3det",
                                  category_tree=_V3DET_TREE),
    "v3det_v1_val": DatasetSpec("V3Det/annotations/v3det_2023_v1_val.json", "V3Det", "v3det",
                                category_tree=_V3DET_TREE),
}

_HOW_TO = {
    "objects365": "download Objects365 from https://www.objects365.org/ and lay it out as described in " + README,
    "openimages": "write it from the official OpenImages v6 CSV files with tools/convert_openimages.py, as "
                  "described in " + README,
    "v3det": "download V3Det from https://v3det.openxlab.org.cn/ and lay it out as described in " + README,
}


def datasets_root() -> str:
    """The datasets root: ``$DETECTRON2_DATASETS``, or ``datasets`` (in the current directory) when
    unset, Detectron2's convention for built-in datasets."""
    return os.getenv("DETECTRON2_DATASETS", "datasets")


def _under(root: str, path: Optional[str]) -> Optional[str]:
    return None if path is None else os.path.abspath(os.path.join(root, path))


def register_training_dataset(key: str, root: Optional[str] = None, name: Optional[str] = None,
                              json_file: Optional[str] = None, image_root: Optional[str] = None,
                              category_tree: Optional[str] = None) -> bool:
    """Register one of :data:`TRAINING_DATASETS` in Detectron2's catalog, lazily.

    Args:
        key: the built-in dataset (e.g. ``"v3det_v1_train"``), which fixes the kind of dataset and
            its default files.
        root: the datasets root (default :func:`datasets_root`).
        name: the name to register (default ``key``).
        json_file, image_root, category_tree: replace the default locations (absolute, or
            relative to ``root``). An explicit ``category_tree`` must exist when the dataset is
            loaded; the default one is used only if it exists.

    Returns:
        True if registered; False if ``name`` was already registered (it is left as it is).

    Raises:
        KeyError: ``key`` is not a built-in training dataset.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if key not in TRAINING_DATASETS:
        raise KeyError(f"unknown training dataset {key!r}; known: {', '.join(TRAINING_DATASETS)}")
    name = name or key
    if name in DatasetCatalog.list():
        logger.debug("%s is already registered; left as it is", name)
        return False
    root = datasets_root() if root is None else root
    spec = TRAINING_DATASETS[key]
    spec = replace(spec, json_file=_under(root, json_file or spec.json_file),
                   image_root=_under(root, image_root or spec.image_root),
                   category_tree=_under(root, category_tree or spec.category_tree),
                   tree_required=category_tree is not None)
    DatasetCatalog.register(name, lambda: load_training_dataset(name, spec))
    extra = {"category_tree": spec.category_tree} if spec.category_tree else {}
    MetadataCatalog.get(name).set(json_file=spec.json_file, image_root=spec.image_root, evaluator_type="coco",
                                  **extra)
    return True


def register_all_training_datasets(root: Optional[str] = None) -> List[str]:
    """Register every dataset of :data:`TRAINING_DATASETS` under ``root`` (default
    :func:`datasets_root`) that is not registered yet; returns the names registered now."""
    return [key for key in TRAINING_DATASETS if register_training_dataset(key, root)]


def load_training_dataset(name: str, spec: DatasetSpec) -> List[dict]:
    """Read a training dataset (the loader registered for ``name``): its dicts, and its
    vocabulary (and V3Det's ``category_ancestors``) set in ``MetadataCatalog.get(name)``.

    Args:
        name: the registered name (for the metadata and the messages).
        spec: absolute locations and kind (see :class:`DatasetSpec`).

    Returns:
        Detectron2 dataset dicts (see the module docstring); boxes are XYWH_ABS pixels of the
        original image.

    Raises:
        InputError: a missing annotation file or image folder (the message names it and points at
            datasets/README.md), a malformed json, a missing explicit category tree, or a
            vocabulary that differs from the one an earlier load set.
    """
    from detectron2.data import MetadataCatalog

    if not os.path.isfile(spec.json_file):
        raise InputError(f"dataset {name!r}: annotation file not found: {spec.json_file}; "
                         f"{_HOW_TO[spec.kind]} (or set $DETECTRON2_DATASETS to the folder that holds it)")
    if not os.path.isdir(spec.image_root):
        raise InputError(f"dataset {name!r}: image folder not found: {spec.image_root}; {_HOW_TO[spec.kind]}")
    start = time.perf_counter()
    with _no_gc():  # millions of new objects, none cyclic: the collector's passes would only cost time
        dicts, meta, extra = _read_training_dataset(name, spec)
    to_contiguous = meta["thing_dataset_id_to_contiguous_id"]
    if spec.vocabulary:
        _check_builtin_vocabulary(name, meta["thing_classes"], spec.vocabulary)
    try:
        MetadataCatalog.get(name).set(thing_classes=meta["thing_classes"],
                                      thing_dataset_id_to_contiguous_id=to_contiguous, **extra)
    except AssertionError as e:  # Detectron2 refuses to change metadata that is already set
        raise InputError(f"dataset {name!r}: {spec.json_file} gives other categories than an earlier load of "
                         f"this dataset in this process ({e})") from None
    logger.info("Loaded %s: %d images, %d boxes, %d categories from %s in %.1f s", name, len(dicts),
                sum(len(r["annotations"]) for r in dicts), len(meta["thing_classes"]), spec.json_file,
                time.perf_counter() - start)
    return dicts


def _read_training_dataset(name: str, spec: DatasetSpec):
    """``(dicts, metadata, extra metadata)`` of :func:`load_training_dataset`."""
    data = read_dataset_json(spec.json_file)
    meta = dataset_metadata(data, spec.json_file, spec.image_root)
    keys = ("image_level_labels",) if spec.kind == "openimages" else ()
    dicts = dataset_dicts_from_json_data(data, spec.json_file, spec.image_root, extra_image_keys=keys)
    del data
    to_contiguous = meta["thing_dataset_id_to_contiguous_id"]
    extra = {}
    if spec.kind == "objects365":
        _resolve_objects365_file_names(dicts, spec.image_root, name)
    elif spec.kind == "openimages":
        for record in dicts:
            record["image_level_labels"] = image_level_label_ids(record, to_contiguous)
    elif spec.kind == "v3det" and spec.category_tree:
        if os.path.isfile(spec.category_tree):
            extra["category_ancestors"] = category_ancestors_from_tree(_read_json(spec.category_tree, name),
                                                                        to_contiguous, spec.category_tree)
        elif spec.tree_required:
            raise InputError(f"dataset {name!r}: category tree not found: {spec.category_tree}")
        else:
            logger.info("%s: no category tree at %s; category_ancestors not set", name, spec.category_tree)
    return dicts, meta, extra


@contextlib.contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_json(path: str, name: str):
    import json

    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"dataset {name!r}: {path}: not valid JSON: {e}") from None


def image_level_label_ids(record: dict, to_contiguous: Dict[int, int]) -> List[int]:
    """The sorted contiguous class ids verified for one OpenImages image.

    Args:
        record: a dataset dict whose ``"image_level_labels"`` (if any) is the converter's
            ``{"positive": [category ids], "negative": [category ids]}`` (json category ids), and
            whose ``annotations`` already carry contiguous ``category_id``.
        to_contiguous: json category id -> contiguous id.

    Returns:
        Sorted contiguous ids of the positive and negative image-level labels and of the box
        classes (boxes are always verified). Labels of categories outside the vocabulary are
        dropped.
    """
    labels = record.get("image_level_labels") or {}
    ids = {to_contiguous[c] for key in ("positive", "negative") for c in labels.get(key, ()) if c in to_contiguous}
    ids.update(a["category_id"] for a in record["annotations"])
    return sorted(ids)


def category_ancestors_from_tree(tree: dict, to_contiguous: Dict[int, int],
                                 path: str = "category tree") -> Dict[int, List[int]]:
    """Ancestors of every category in V3Det's official category tree, as contiguous ids.

    Args:
        tree: the content of ``v3det_2023_v1_category_tree.json``: ``categoryid2treeid`` (dataset
            category id -> tree node id) and ``descendant2ancestor`` (node -> all its ancestor
            nodes) or, without it, ``child2father`` (node -> its direct parent nodes), whose
            transitive closure is used.
        to_contiguous: dataset category id -> contiguous id.
        path: names the file in errors.

    Returns:
        ``{contiguous id: sorted contiguous ids of its ancestors}`` for every category; tree nodes
        that are not dataset categories (inner nodes such as the root) are left out, and so is the
        category itself.

    Raises:
        InputError: the tree lacks ``categoryid2treeid``, or both ``descendant2ancestor`` and
            ``child2father``; a category id key is not an integer; two categories share a node.
    """
    if not isinstance(tree, dict) or not isinstance(tree.get("categoryid2treeid"), dict):
        raise InputError(f"{path}: lacks 'categoryid2treeid' (dataset category id -> tree node) of V3Det's "
                         f"category tree")
    cat_to_node = {}
    for key, node in tree["categoryid2treeid"].items():
        try:
            cat_to_node[int(key)] = node[0] if isinstance(node, list) and len(node) == 1 else node
        except ValueError:
            raise InputError(f"{path}: categoryid2treeid has a key that is not a category id: {key!r}") from None
    node_to_cat = {}
    for cat, node in cat_to_node.items():
        if not isinstance(node, str):
            raise InputError(f"{path}: categoryid2treeid[{cat}] is not a tree node id: {node!r}")
        if node in node_to_cat:
            raise InputError(f"{path}: categories {node_to_cat[node]} and {cat} share the tree node {node!r}")
        node_to_cat[node] = cat
    if isinstance(tree.get("descendant2ancestor"), dict):
        table = tree["descendant2ancestor"]

        def ancestors(node):
            return table.get(node, ())
    elif isinstance(tree.get("child2father"), dict):
        ancestors = _closure(tree["child2father"])
    else:
        raise InputError(f"{path}: lacks 'descendant2ancestor' and 'child2father' (the tree's relations)")
    result, missing = {}, 0
    for cat, contiguous in to_contiguous.items():
        node = cat_to_node.get(cat)
        if node is None:
            missing += 1
            result[contiguous] = []
            continue
        result[contiguous] = sorted({to_contiguous[node_to_cat[a]] for a in ancestors(node)
                                     if a != node and a in node_to_cat and node_to_cat[a] in to_contiguous})
    if missing:
        logger.warning("%s: %d of %d categories are not in the category tree (no ancestors)", path, missing,
                       len(to_contiguous))
    return result


def _closure(child_to_parents: dict):
    """node -> set of all ancestors, from node -> direct parents (a DAG; cycles are cut)."""
    memo: Dict[str, frozenset] = {}

    def ancestors(node, active=()):
        if node in memo:
            return memo[node]
        found = set()
        for parent in child_to_parents.get(node, ()) or ():
            if parent in active or parent == node:
                continue
            found.add(parent)
            found |= ancestors(parent, active + (node,))
        memo[node] = frozenset(found)
        return memo[node]

    return ancestors


def _relative_parts(file_name: str, image_root: str) -> List[str]:
    prefix = os.path.join(image_root, "")
    rel = file_name[len(prefix):] if file_name.startswith(prefix) else file_name
    return [p for p in rel.replace("\\", "/").split("/") if p]


def _resolve_objects365_file_names(dicts: List[dict], image_root: str, name: str, probe: int = 20) -> None:
    """Rewrite ``file_name`` to the form that exists on disk (see the module docstring)."""
    sample = dicts[:probe]
    if not sample:
        return

    def candidate(record, keep):
        parts = _relative_parts(record["file_name"], image_root)
        return os.path.join(image_root, *parts[-keep:]) if keep else record["file_name"]

    found = {keep: sum(os.path.exists(candidate(r, keep)) for r in sample) for keep in (0, 2, 1)}
    best = max(found, key=lambda k: (found[k], k == 0))
    if found[best] == 0:
        logger.warning("%s: none of the first %d images exists under %s (e.g. %s)", name, len(sample), image_root,
                       sample[0]["file_name"])
        return
    if best:
        logger.info("%s: images found as the last %d path component(s) of file_name under %s", name, best,
                    image_root)
        for record in dicts:
            record["file_name"] = candidate(record, best)


def _check_builtin_vocabulary(name: str, classes: List[str], vocabulary: str) -> None:
    from ..vocabularies import get_vocabulary

    expected = get_vocabulary(vocabulary)
    if list(classes) == expected:
        return
    diffs = [f"{i}: {a!r} (built-in {b!r})" for i, (a, b) in enumerate(zip(classes, expected)) if a != b][:3]
    logger.warning("%s: the json's %d category names differ from the built-in %r vocabulary (%d names)%s; the "
                   "json's names are used", name, len(classes), vocabulary, len(expected),
                   ": " + "; ".join(diffs) if diffs else "")
