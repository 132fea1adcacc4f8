"""The three proposal-file formats parsed into per-image arrays, every value checked (one
parser per format: :func:`parse_glip`, :func:`parse_coco`, :func:`parse_detectron2`); each
returns ``(boxes, scores, labels)`` dicts keyed by ``str(image_id)``: XYXY_ABS float64 boxes of
the original image, scores in [0, 1], int64 labels (-1: none)."""

from typing import Optional

import numpy as np

from ...proposal_sources import logit_to_score
from .proposal_set import (
    COCO_LAYOUT,
    D2_LAYOUT,
    GLIP_LAYOUT,
    XYWH_ABS,
    XYXY_ABS,
    ProposalFileError,
    short_repr,
)


def _float_array(value, path: str, where: str, what: str, expected: str) -> np.ndarray:
    """``value`` as a float64 array, or a ProposalFileError naming ``where``, ``what`` and
    the ``expected`` layout (ragged lists and non-numbers cannot be converted)."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ProposalFileError(f"{path}: {where}: {what} must be {expected}, got {short_repr(value)}") from None


def _check_boxes_scores(boxes: np.ndarray, scores: np.ndarray, path: str, where: str, *,
                        fmt: str, box_mode: int, scores_are_logits: bool):
    """Validate one image's (or one file's) boxes and scores; return them as float64 arrays.

    ``boxes`` is in ``box_mode`` (XYXY or XYWH); ``where`` names the image (``"image 42"``)
    or, for a COCO list, is a callable ``i -> description of entry i``.
    """
    name = where if callable(where) else (lambda i: f"{where}, box {i}")
    place = "" if callable(where) else f"{where}: "
    if boxes.size == 0 and boxes.ndim <= 2:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ProposalFileError(f"{path}: {place}boxes must be an (N, 4) list of "
                                f"{'[x, y, w, h]' if box_mode == XYWH_ABS else '[x0, y0, x1, y1]'}, "
                                f"got shape {boxes.shape}")
    if scores.size == 0:
        scores = scores.reshape(0)
    if scores.ndim != 1:
        raise ProposalFileError(f"{path}: {place}scores must be a flat list of N numbers, got shape {scores.shape}")
    if len(scores) != len(boxes):
        raise ProposalFileError(f"{path}: {place}{len(boxes)} boxes but {len(scores)} "
                                f"{'objectness_logits' if scores_are_logits else 'scores'}; expected one score per box")
    bad = ~np.isfinite(boxes).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ProposalFileError(f"{path}: {name(i)}: {boxes[i].tolist()} contains NaN or infinity")
    _check_scores(scores, path, name, fmt, scores_are_logits)
    if box_mode == XYWH_ABS:
        neg = (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
        if neg.any():
            i = int(np.flatnonzero(neg)[0])
            raise ProposalFileError(f"{path}: {name(i)}: {boxes[i].tolist()} has a negative width or height "
                                    f"(the {fmt} format declares [x, y, w, h] with w, h >= 0)")
        boxes = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    else:
        flipped = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if flipped.any():
            i = int(np.flatnonzero(flipped)[0])
            raise ProposalFileError(
                f"{path}: {name(i)}: {boxes[i].tolist()} has x1 < x0 or y1 < y0, but the {fmt} format "
                "declares XYXY boxes [x0, y0, x1, y1]; were [x, y, w, h] (XYWH) boxes written?")
    return boxes, scores


def _check_scores(scores: np.ndarray, path: str, name, fmt: str, scores_are_logits: bool):
    if scores_are_logits:
        bad = np.isnan(scores)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ProposalFileError(f"{path}: {name(i)}: objectness logit is NaN")
        return
    bad = ~np.isfinite(scores)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ProposalFileError(f"{path}: {name(i)}: score is {float(scores[i])}; expected a probability in [0, 1]")
    bad = (scores < 0) | (scores > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ProposalFileError(
            f"{path}: {name(i)}: score {float(scores[i])} is outside [0, 1]; the {fmt} format stores "
            "probabilities (if these are logits, apply a sigmoid, or write Detectron2's proposal pickle)")


def _label_array(value, n: int, path: str, where: str) -> np.ndarray:
    """(n,) int64 labels from ``value`` (None -> all -1)."""
    if value is None:
        return np.full(n, -1, dtype=np.int64)
    labels = _float_array(value, path, where, "labels", "a list of N integer class ids").reshape(-1)
    if len(labels) != n:
        raise ProposalFileError(f"{path}: {where}: {n} boxes but {len(labels)} labels; expected one label per box")
    bad = ~np.isfinite(labels) | (labels != np.round(labels))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ProposalFileError(f"{path}: {where}, box {i}: label {float(labels[i])} is not an integer class id")
    return labels.astype(np.int64)


def parse_glip(data: dict, path: str):
    """GLIP layout (released RegionSpot code) -> per-image boxes, scores, labels."""
    boxes, scores, labels = {}, {}, {}
    for image_id, entry in data.items():
        where = f"image {image_id}"
        if not isinstance(entry, dict):
            raise ProposalFileError(f"{path}: {where}: expected an object with 'boxes' and 'scores', got "
                                    f"{type(entry).__name__}; the glip layout is {GLIP_LAYOUT}")
        missing = [k for k in ("boxes", "scores") if k not in entry]
        if missing:
            raise ProposalFileError(f"{path}: {where}: lacks {', '.join(repr(k) for k in missing)} "
                                    f"(has {sorted(entry)}); the glip layout is {GLIP_LAYOUT}")
        b = _float_array(entry["boxes"], path, where, "boxes", "an (N, 4) list of [x0, y0, x1, y1]")
        s = _float_array(entry["scores"], path, where, "scores", "a list of N numbers in [0, 1]")
        b, s = _check_boxes_scores(b, s, path, where, fmt="glip", box_mode=XYXY_ABS, scores_are_logits=False)
        key = str(image_id)
        boxes[key], scores[key] = b, s
        labels[key] = _label_array(entry.get("labels"), len(b), path, where)
    return boxes, scores, labels


def _coco_entry_problem(i: int, entry) -> Optional[str]:
    """What is wrong with COCO results entry ``i`` (None if nothing)."""
    if not isinstance(entry, dict):
        return f"entry {i} is {type(entry).__name__}, expected an object"
    missing = [k for k in ("image_id", "bbox", "score") if k not in entry]
    if missing:
        return f"entry {i} (image_id {entry.get('image_id', '?')}) lacks {', '.join(repr(k) for k in missing)}"
    image_id = entry["image_id"]
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        return f"entry {i}: image_id {short_repr(image_id)} is not an integer"
    try:
        bbox = np.asarray(entry["bbox"], dtype=np.float64)
        score = np.asarray(entry["score"], dtype=np.float64)
        category = np.asarray(entry.get("category_id", -1), dtype=np.float64)
    except (TypeError, ValueError):
        bbox = score = category = None
    if bbox is None or bbox.shape != (4,):
        return f"entry {i} (image_id {image_id}): bbox {short_repr(entry['bbox'])} is not 4 numbers [x, y, w, h]"
    if score is None or score.shape != ():
        return f"entry {i} (image_id {image_id}): score {short_repr(entry['score'])} is not a number"
    if category is None or category.shape != () or not np.isfinite(category) or category != round(float(category)):
        return f"entry {i} (image_id {image_id}): category_id {short_repr(entry.get('category_id'))} is not an integer"
    return None


def _raise_first_coco_problem(data: list, path: str):
    for i, entry in enumerate(data):
        problem = _coco_entry_problem(i, entry)
        if problem:
            raise ProposalFileError(f"{path}: {problem}; the coco layout is {COCO_LAYOUT}")
    raise ProposalFileError(f"{path}: unexpected content; the coco layout is {COCO_LAYOUT}")  # pragma: no cover


def parse_coco(data: list, path: str):
    """COCO results list -> per-image boxes (converted to XYXY), scores, category ids."""
    if not data:
        return {}, {}, {}
    try:
        ids = [d["image_id"] for d in data]
        bbox = np.asarray([d["bbox"] for d in data], dtype=np.float64)
        score = np.asarray([d["score"] for d in data], dtype=np.float64)
        category = np.asarray([d.get("category_id", -1) for d in data], dtype=np.float64)
        id_array = np.asarray(ids)
    except (KeyError, TypeError, ValueError, AttributeError):
        _raise_first_coco_problem(data, path)
    if (bbox.shape != (len(data), 4) or score.shape != (len(data),) or category.shape != (len(data),)
            or id_array.dtype.kind not in "iuU" or id_array.ndim != 1
            or not np.isfinite(category).all() or (category != np.round(category)).any()):
        _raise_first_coco_problem(data, path)

    def entry(i):
        return f"entry {i} (image_id {ids[i]})"

    bbox, score = _check_boxes_scores(bbox, score, path, entry, fmt="coco", box_mode=XYWH_ABS,
                                      scores_are_logits=False)
    unique_ids, inverse = np.unique(id_array, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    splits = np.cumsum(np.bincount(inverse, minlength=len(unique_ids)))[:-1]
    boxes, scores, labels = {}, {}, {}
    for image_id, idx in zip(unique_ids.tolist(), np.split(order, splits)):
        key = str(image_id)
        boxes[key], scores[key], labels[key] = bbox[idx], score[idx], category[idx].astype(np.int64)
    return boxes, scores, labels


def _parse_bbox_mode(value, path: str) -> int:
    try:
        mode = int(value)
    except (TypeError, ValueError):
        mode = None
    if mode not in (XYXY_ABS, XYWH_ABS):
        raise ProposalFileError(f"{path}: bbox_mode {short_repr(value)} is not supported; expected Detectron2's "
                                f"BoxMode.XYXY_ABS ({XYXY_ABS}) or BoxMode.XYWH_ABS ({XYWH_ABS}) "
                                "(absolute pixels of the original image)")
    return mode


def parse_detectron2(data, path: str):
    """Detectron2 proposal pickle -> per-image boxes (XYXY), scores (sigmoid of logits), -1 labels."""
    if not isinstance(data, dict):
        raise ProposalFileError(f"{path}: the pickle holds {type(data).__name__}; expected a dict {D2_LAYOUT}")
    data = dict(data)
    for old, new in (("indexes", "ids"), ("scores", "objectness_logits")):  # Detectron (v1) names
        if old in data:
            data[new] = data.pop(old)
    missing = [k for k in ("ids", "boxes", "objectness_logits") if k not in data]
    if missing:
        raise ProposalFileError(f"{path}: the pickle lacks {', '.join(repr(k) for k in missing)} "
                                f"(has {sorted(map(str, data))}); expected {D2_LAYOUT}")
    ids, all_boxes, all_logits = data["ids"], data["boxes"], data["objectness_logits"]
    for key, value in (("ids", ids), ("boxes", all_boxes), ("objectness_logits", all_logits)):
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise ProposalFileError(f"{path}: '{key}' is {type(value).__name__}; expected a list with one "
                                    f"item per image ({D2_LAYOUT})")
    if not len(ids) == len(all_boxes) == len(all_logits):
        raise ProposalFileError(f"{path}: {len(ids)} ids, {len(all_boxes)} box arrays and {len(all_logits)} "
                                "objectness_logits arrays; expected one of each per image")
    mode = _parse_bbox_mode(data.get("bbox_mode", XYXY_ABS), path)
    boxes, scores, labels = {}, {}, {}
    for i, (image_id, b, logits) in enumerate(zip(ids, all_boxes, all_logits)):
        key = _id_key(image_id, path, i)
        where = f"image {key}"
        if key in boxes:
            raise ProposalFileError(f"{path}: image id {key} appears more than once in 'ids'")
        b = _float_array(b, path, where, "boxes", "an (N, 4) float array")
        logits = _float_array(logits, path, where, "objectness_logits", "an (N,) float array")
        b, logits = _check_boxes_scores(b, logits, path, where, fmt="detectron2", box_mode=mode,
                                        scores_are_logits=True)
        boxes[key], scores[key] = b, logit_to_score(logits)
        labels[key] = np.full(len(b), -1, dtype=np.int64)
    return boxes, scores, labels


def _id_key(image_id, path: str, index: int) -> str:
    if isinstance(image_id, (bool, np.bool_)) or not isinstance(image_id, (int, np.integer, str)):
        raise ProposalFileError(f"{path}: ids[{index}] = {short_repr(image_id)} is not an integer or string image id")
    return str(image_id)
