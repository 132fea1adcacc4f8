"""Proposal source ``file``: a detector's boxes stored on disk, read by the data loader.

Reads, validates, converts and attaches boxes that some detector wrote to a file, so that
RegionSpot recognises them (paper Sec. 4: boxes from GLIP, or from any other detector).

Three formats are understood; in all of them boxes are in pixels of the ORIGINAL image (the
image as the dataset stores it, before any resizing by the mapper):

``"glip"``
    The layout of the GLIP-box file released with the released RegionSpot code: one JSON
    object ``{str(image_id): {"boxes": [[x0, y0, x1, y1], ...], "scores": [...],
    "labels": [...]}}``. Boxes are XYXY, scores are probabilities in [0, 1], ``labels``
    (optional) are the detector's class ids.
``"coco"``
    The COCO results list that detectors' evaluators write (Detectron2's
    ``coco_instances_results.json``, mmdetection's ``*.bbox.json``...): a JSON list of
    ``{"image_id": int, "bbox": [x, y, w, h], "score": float, "category_id": int}``. Boxes
    are XYWH, scores probabilities in [0, 1], ``category_id`` optional; other keys
    (``segmentation``...) are ignored.
``"detectron2"``
    Detectron2's precomputed-proposal pickle (what ``detectron2.data.build
    .load_proposals_into_dataset`` reads): a dict with ``"ids"`` (image ids), ``"boxes"``
    (list of (N_i, 4) float arrays), ``"objectness_logits"`` (list of (N_i,) float arrays,
    LOGITS: score = sigmoid(logit), so +-inf are allowed) and optional ``"bbox_mode"`` (a
    ``BoxMode`` value; XYXY_ABS by default; XYXY_ABS and XYWH_ABS are accepted). The legacy
    Detectron (v1) names ``"indexes"`` (= ids) and ``"scores"`` (= objectness_logits) are
    renamed as Detectron2 renames them. The file has no class labels.

Reading gives a :class:`ProposalSet` (per image: XYXY_ABS float32 boxes, scores in [0, 1],
int64 labels). :func:`attach_proposals` puts one image's boxes into its Detectron2 dataset dict
under Detectron2's precomputed-proposal keys, which the mapper turns into
``dataset_dict["proposals"]`` with ``detectron2.data.detection_utils.transform_proposals``.

Every problem with a file's content raises :class:`ProposalFileError`, whose message names the
file and, where it applies, the image id, the box index and the offending value.

Pickles can run code when loaded; the detectron2 format is read with an unpickler that only
builds lists, dicts, numpy arrays and Detectron2's ``BoxMode``, and refuses anything else.
"""

import json
import logging
import pickle
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from ..filter_report import PROPOSAL_FILTERS_KEY, FilterReport
from ..io import atomic_write
from ..proposal_sources import logit_to_score, score_to_logit, select_proposals
from .validation import BOX_TOLERANCE_PX, InputError

logger = logging.getLogger(__name__)

PROPOSAL_FILE_FORMATS = ("glip", "coco", "detectron2")

#: A box may overhang its image by BOX_TOLERANCE_PX + this fraction of the side; it is clipped.
BOX_TOLERANCE_FRACTION = 0.02

# Detectron2's BoxMode values (detectron2.structures.BoxMode), kept as ints so that reading a
# file does not need the enum.
_XYXY_ABS = 0
_XYWH_ABS = 1

_GLIP_LAYOUT = ('{"<image_id>": {"boxes": [[x0, y0, x1, y1], ...], "scores": [p, ...], '
                '"labels": [class_id, ...] (optional)}}')
_COCO_LAYOUT = '[{"image_id": int, "bbox": [x, y, w, h], "score": p, "category_id": int (optional)}, ...]'
_D2_LAYOUT = ('{"ids": [image_id, ...], "boxes": [(N, 4) array, ...], '
              '"objectness_logits": [(N,) array, ...], "bbox_mode": BoxMode (optional)}')
_NUM_IDS_SHOWN = 5


class ProposalFileError(InputError):
    """A proposal file cannot be used as it is; the message names the file and what is wrong
    (image id, box index and value where relevant) and what was expected."""


@dataclass
class ProposalSet:
    """The boxes of one proposal file, per image, in one representation.

    Attributes:
        path: the file they were read from (or a description, for sets built in memory).
        format: one of :data:`PROPOSAL_FILE_FORMATS`: the format of ``path``.
        boxes: ``str(image_id)`` -> (N, 4) float32 array, XYXY_ABS pixels of the ORIGINAL image,
            in the file's order.
        scores: ``str(image_id)`` -> (N,) float32 array of proposal scores in [0, 1].
        labels: ``str(image_id)`` -> (N,) int64 array of the detector's class ids, -1 where the
            file has none (always for the detectron2 format). Images missing from ``labels``
            get -1 for every box.

    The dicts are copied; arrays given in other dtypes or as lists are converted and
    ``(0,)``-shaped empty boxes become (0, 4). Raises :class:`ProposalFileError` if the keys or
    lengths of the three dicts differ.
    """

    path: str
    format: str
    boxes: Dict[str, np.ndarray] = field(default_factory=dict)
    scores: Dict[str, np.ndarray] = field(default_factory=dict)
    labels: Dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        self.boxes, self.scores, self.labels = dict(self.boxes), dict(self.scores), dict(self.labels)
        if set(self.boxes) != set(self.scores):
            raise ProposalFileError(f"{self.path}: boxes and scores are given for different image ids")
        for image_id in self.boxes:
            boxes = np.asarray(self.boxes[image_id], dtype=np.float32)
            self.boxes[image_id] = boxes.reshape(0, 4) if boxes.size == 0 else boxes
            self.scores[image_id] = np.asarray(self.scores[image_id], dtype=np.float32).reshape(-1)
            labels = self.labels.get(image_id)
            n = len(self.boxes[image_id])
            self.labels[image_id] = (np.full(n, -1, dtype=np.int64) if labels is None
                                     else np.asarray(labels, dtype=np.int64).reshape(-1))
            if self.boxes[image_id].shape != (n, 4) or len(self.scores[image_id]) != n \
                    or len(self.labels[image_id]) != n:
                raise ProposalFileError(
                    f"{self.path}: image {image_id}: boxes {self.boxes[image_id].shape}, scores "
                    f"{self.scores[image_id].shape} and labels {self.labels[image_id].shape} "
                    "must be (N, 4), (N,) and (N,)")
        extra = set(self.labels) - set(self.boxes)
        if extra:
            raise ProposalFileError(f"{self.path}: labels given for image ids without boxes: "
                                    f"{sorted(extra)[:_NUM_IDS_SHOWN]}")

    @property
    def num_images(self) -> int:
        """Number of images the file has an entry for (including entries with no box)."""
        return len(self.boxes)

    @property
    def num_boxes(self) -> int:
        """Total number of boxes over all images."""
        return int(sum(len(b) for b in self.boxes.values()))

    def image_ids(self) -> List[str]:
        """The image ids (strings), in the set's order."""
        return list(self.boxes)

    def has_labels(self) -> bool:
        """Whether any box has a class label (a label other than -1)."""
        return any(bool((labels >= 0).any()) for labels in self.labels.values())

    def summary(self) -> dict:
        """JSON-serialisable figures: images, boxes, boxes per image and score statistics.

        Returns:
            dict with ``file``, ``format``, ``images``, ``boxes``, ``has_labels``,
            ``boxes_per_image`` ({min, median, mean, max}) and ``scores`` ({min, mean, max});
            the statistics are None when there is no image / no box.
        """
        counts = np.array([len(b) for b in self.boxes.values()], dtype=np.int64)
        scores = (np.concatenate(list(self.scores.values())) if self.boxes
                  else np.zeros(0, dtype=np.float32))
        per_image = None
        if counts.size:
            per_image = {"min": int(counts.min()), "median": float(np.median(counts)),
                         "mean": float(counts.mean()), "max": int(counts.max())}
        score_stats = None
        if scores.size:
            score_stats = {"min": float(scores.min()), "mean": float(scores.astype(np.float64).mean()),
                           "max": float(scores.max())}
        return {"file": self.path, "format": self.format, "images": self.num_images,
                "boxes": self.num_boxes, "has_labels": self.has_labels(),
                "boxes_per_image": per_image, "scores": score_stats}


# ----------------------------------------------------------------------------- loading


class _RefusedClass(pickle.UnpicklingError):
    """A pickle names a class that a proposal file has no business holding."""


class _RefusedPickle(ProposalFileError):
    """A valid pickle that holds something other than plain data."""


class _ProposalUnpickler(pickle.Unpickler):
    """Builds only plain containers, numpy arrays/scalars and BoxMode; refuses other classes."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol 0-2 pickles written by Python 3
        ("collections", "OrderedDict"),
        ("detectron2.structures.boxes", "BoxMode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _RefusedClass(
            f"refusing to load {module}.{name}: a Detectron2 proposal pickle holds only lists, "
            "dicts and numpy arrays (convert tensors with .numpy())")


def _sniff(path: str) -> str:
    """The kind of file from its first bytes: ``"json"``, ``"pickle"`` or ``"unknown"``."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head:
        raise ProposalFileError(f"{path}: the file is empty; expected a proposal file in one of the "
                                f"formats {PROPOSAL_FILE_FORMATS}")
    start = head.lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    if start[:1] in (b"{", b"["):
        return "json"
    if head[:1] == b"\x80":  # pickle protocol >= 2
        return "pickle"
    return "unknown"


def _load_json(path: str):
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProposalFileError(f"{path}: starts like JSON but is not valid JSON: {e}") from None


def _load_pickle(path: str):
    try:
        with open(path, "rb") as f:
            return _ProposalUnpickler(f, encoding="latin1").load()
    except _RefusedClass as e:
        raise _RefusedPickle(f"{path}: cannot be read as a Detectron2 proposal pickle: {e}") from None
    except Exception as e:  # a corrupt or foreign pickle can fail in many ways
        raise ProposalFileError(f"{path}: is not a valid pickle ({type(e).__name__}: {e})") from None


def _load_content(path: str):
    """(kind, content): the parsed JSON value or unpickled object of ``path``."""
    kind = _sniff(path)
    if kind == "json":
        return kind, _load_json(path)
    if kind == "pickle":
        return kind, _load_pickle(path)
    try:  # protocol 0/1 pickles, JSON after a long run of blanks
        return "pickle", _load_pickle(path)
    except _RefusedPickle:
        raise
    except ProposalFileError:
        pass
    try:
        return "json", _load_json(path)
    except ProposalFileError:
        pass
    raise ProposalFileError(
        f"{path}: is neither JSON nor a pickle; expected a proposal file in one of the formats "
        f"{PROPOSAL_FILE_FORMATS}: a JSON object (glip), a JSON list (coco) or a pickle (detectron2)")


def _format_of_content(path: str, kind: str, content) -> str:
    if kind == "pickle":
        return "detectron2"
    if isinstance(content, dict):
        return "glip"
    if isinstance(content, list):
        return "coco"
    raise ProposalFileError(f"{path}: JSON top level is {type(content).__name__}; expected an object "
                            f"(glip layout {_GLIP_LAYOUT}) or a list (coco layout {_COCO_LAYOUT})")


def detect_format(path: str) -> str:
    """The format of a proposal file, from its content.

    A JSON object is ``"glip"``, a JSON list ``"coco"``, a pickle ``"detectron2"``. Usually
    only the first bytes are read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ProposalFileError: the file is empty, neither JSON nor a pickle, or JSON whose top
            level is neither an object nor a list.
    """
    kind = _sniff(path)
    if kind == "pickle":
        return "detectron2"
    if kind == "json":
        with open(path, "rb") as f:
            start = f.read(256).lstrip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
        return "glip" if start[:1] == b"{" else "coco"
    kind, content = _load_content(path)
    return _format_of_content(path, kind, content)


def read_proposal_file(path: str, format: str = "auto") -> ProposalSet:
    """Read and validate a proposal file.

    Args:
        path: a file in one of :data:`PROPOSAL_FILE_FORMATS` (see the module docstring).
        format: ``"auto"`` (detect from the content, :func:`detect_format`) or the expected
            format; a file whose content is another format is an error.

    Returns:
        A :class:`ProposalSet`: per ``str(image_id)``, (N, 4) float32 XYXY_ABS boxes in
        original-image pixels, (N,) float32 scores in [0, 1] (sigmoid of the logits for the
        detectron2 format) and (N,) int64 labels (-1 where the file has none). COCO entries are
        grouped by image (images sorted by id: numerically when all ids are integers; boxes in
        file order).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``format`` is not "auto" or one of :data:`PROPOSAL_FILE_FORMATS`.
        ProposalFileError: the content is not the named format; missing keys or wrong types;
            boxes that are not (N, 4) or whose count differs from the scores'; NaN or infinite
            coordinates, NaN scores or logits; scores outside [0, 1] (glip, coco); negative
            COCO width/height; XYXY boxes with x1 < x0 or y1 < y0 (the message asks whether
            XYWH was written); a Detectron2 ``bbox_mode`` other than XYXY_ABS / XYWH_ABS;
            duplicate image ids in a pickle.
    """
    if format != "auto" and format not in PROPOSAL_FILE_FORMATS:
        raise ValueError(f"proposal file format must be 'auto' or one of {PROPOSAL_FILE_FORMATS}, got {format!r}")
    kind, content = _load_content(path)
    found = _format_of_content(path, kind, content)
    if format != "auto" and format != found:
        raise ProposalFileError(f"{path}: expected the {format!r} format ({_layout(format)}) but the "
                                f"content is {_describe_content(kind, content)}, i.e. the {found!r} format")
    parse = {"glip": _parse_glip, "coco": _parse_coco, "detectron2": _parse_detectron2}[found]
    boxes, scores, labels = parse(content, path)
    return ProposalSet(path=path, format=found, boxes=boxes, scores=scores, labels=labels)


def _layout(fmt: str) -> str:
    return {"glip": _GLIP_LAYOUT, "coco": _COCO_LAYOUT, "detectron2": "a pickle " + _D2_LAYOUT}[fmt]


def _describe_content(kind: str, content) -> str:
    if kind == "pickle":
        return "a pickle"
    return "a JSON object" if isinstance(content, dict) else "a JSON list"


# ----------------------------------------------------------------------------- validation


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _float_array(value, path: str, where: str, what: str, expected: str) -> np.ndarray:
    """``value`` as a float64 array, or a ProposalFileError naming ``where``, ``what`` and
    the ``expected`` layout (ragged lists and non-numbers cannot be converted)."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ProposalFileError(f"{path}: {where}: {what} must be {expected}, got {_short(value)}") from None


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
                                f"{'[x, y, w, h]' if box_mode == _XYWH_ABS else '[x0, y0, x1, y1]'}, "
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
    if box_mode == _XYWH_ABS:
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


# ----------------------------------------------------------------------------- formats


def _parse_glip(data: dict, path: str):
    """GLIP layout (released RegionSpot code) -> per-image boxes, scores, labels."""
    boxes, scores, labels = {}, {}, {}
    for image_id, entry in data.items():
        where = f"image {image_id}"
        if not isinstance(entry, dict):
            raise ProposalFileError(f"{path}: {where}: expected an object with 'boxes' and 'scores', got "
                                    f"{type(entry).__name__}; the glip layout is {_GLIP_LAYOUT}")
        missing = [k for k in ("boxes", "scores") if k not in entry]
        if missing:
            raise ProposalFileError(f"{path}: {where}: lacks {', '.join(repr(k) for k in missing)} "
                                    f"(has {sorted(entry)}); the glip layout is {_GLIP_LAYOUT}")
        b = _float_array(entry["boxes"], path, where, "boxes", "an (N, 4) list of [x0, y0, x1, y1]")
        s = _float_array(entry["scores"], path, where, "scores", "a list of N numbers in [0, 1]")
        b, s = _check_boxes_scores(b, s, path, where, fmt="glip", box_mode=_XYXY_ABS, scores_are_logits=False)
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
        return f"entry {i}: image_id {_short(image_id)} is not an integer"
    try:
        bbox = np.asarray(entry["bbox"], dtype=np.float64)
        score = np.asarray(entry["score"], dtype=np.float64)
        category = np.asarray(entry.get("category_id", -1), dtype=np.float64)
    except (TypeError, ValueError):
        bbox = score = category = None
    if bbox is None or bbox.shape != (4,):
        return f"entry {i} (image_id {image_id}): bbox {_short(entry['bbox'])} is not 4 numbers [x, y, w, h]"
    if score is None or score.shape != ():
        return f"entry {i} (image_id {image_id}): score {_short(entry['score'])} is not a number"
    if category is None or category.shape != () or not np.isfinite(category) or category != round(float(category)):
        return f"entry {i} (image_id {image_id}): category_id {_short(entry.get('category_id'))} is not an integer"
    return None


def _raise_first_coco_problem(data: list, path: str):
    for i, entry in enumerate(data):
        problem = _coco_entry_problem(i, entry)
        if problem:
            raise ProposalFileError(f"{path}: {problem}; the coco layout is {_COCO_LAYOUT}")
    raise ProposalFileError(f"{path}: unexpected content; the coco layout is {_COCO_LAYOUT}")  # pragma: no cover


def _parse_coco(data: list, path: str):
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

    bbox, score = _check_boxes_scores(bbox, score, path, entry, fmt="coco", box_mode=_XYWH_ABS,
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
    if mode not in (_XYXY_ABS, _XYWH_ABS):
        raise ProposalFileError(f"{path}: bbox_mode {_short(value)} is not supported; expected Detectron2's "
                                f"BoxMode.XYXY_ABS ({_XYXY_ABS}) or BoxMode.XYWH_ABS ({_XYWH_ABS}) "
                                "(absolute pixels of the original image)")
    return mode


def _parse_detectron2(data, path: str):
    """Detectron2 proposal pickle -> per-image boxes (XYXY), scores (sigmoid of logits), -1 labels."""
    if not isinstance(data, dict):
        raise ProposalFileError(f"{path}: the pickle holds {type(data).__name__}; expected a dict {_D2_LAYOUT}")
    data = dict(data)
    for old, new in (("indexes", "ids"), ("scores", "objectness_logits")):  # Detectron (v1) names
        if old in data:
            data[new] = data.pop(old)
    missing = [k for k in ("ids", "boxes", "objectness_logits") if k not in data]
    if missing:
        raise ProposalFileError(f"{path}: the pickle lacks {', '.join(repr(k) for k in missing)} "
                                f"(has {sorted(map(str, data))}); expected {_D2_LAYOUT}")
    ids, all_boxes, all_logits = data["ids"], data["boxes"], data["objectness_logits"]
    for key, value in (("ids", ids), ("boxes", all_boxes), ("objectness_logits", all_logits)):
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise ProposalFileError(f"{path}: '{key}' is {type(value).__name__}; expected a list with one "
                                    f"item per image ({_D2_LAYOUT})")
    if not len(ids) == len(all_boxes) == len(all_logits):
        raise ProposalFileError(f"{path}: {len(ids)} ids, {len(all_boxes)} box arrays and {len(all_logits)} "
                                "objectness_logits arrays; expected one of each per image")
    mode = _parse_bbox_mode(data.get("bbox_mode", _XYXY_ABS), path)
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
        raise ProposalFileError(f"{path}: ids[{index}] = {_short(image_id)} is not an integer or string image id")
    return str(image_id)


# ----------------------------------------------------------------------------- writing


def _output_id(key: str):
    """An image id as written: an int when the string is an integer written canonically."""
    return int(key) if key.isdigit() and str(int(key)) == key else key


def write_proposal_file(proposals: ProposalSet, path: str, format: str) -> str:
    """Write ``proposals`` to ``path`` in ``format``, atomically (``regionspot.io.atomic_write``).

    Image ids are written as JSON/Python ints when the id string is a canonical non-negative
    integer (``"42"``; not ``"042"``, which stays a string so that it reads back the same).

    - ``"glip"``: one JSON object ``{id: {"boxes": XYXY, "scores": [...], "labels": [...]}}``
      (``labels`` only when some box has one; -1 marks a box without label).
    - ``"coco"``: a JSON list of ``{"image_id", "bbox": [x, y, w, h], "score",
      "category_id"}``; ``category_id`` is the box's label, or 1 where the label is -1
      (COCO tools require a category; 1 is a placeholder, not a class prediction). A list
      of boxes cannot hold an image without boxes: such images are not in the file.
    - ``"detectron2"``: a pickle ``{"ids", "boxes": [(N, 4) float32 XYXY], "objectness_logits":
      [(N,) float32 = score_to_logit(score)], "bbox_mode": 0}`` (``BoxMode.XYXY_ABS``'s value;
      a score of exactly 1 becomes a logit of +inf, 0 becomes -inf). Labels are not stored.

    Returns:
        ``path``.

    Raises:
        ValueError: ``format`` is not one of :data:`PROPOSAL_FILE_FORMATS`.
        OSError: the file cannot be written (any previous file at ``path`` is kept).
    """
    if format not in PROPOSAL_FILE_FORMATS:
        raise ValueError(f"proposal file format must be one of {PROPOSAL_FILE_FORMATS}, got {format!r}")
    if format == "detectron2":
        payload = pickle.dumps(_detectron2_payload(proposals), protocol=4)
        return atomic_write(path, lambda f: f.write(payload), "wb")
    obj = _glip_payload(proposals) if format == "glip" else _coco_payload(proposals)
    text = json.dumps(obj, separators=(",", ":"))  # one shot: much faster than json.dump's chunks
    return atomic_write(path, lambda f: f.write(text), "w")


def _glip_payload(proposals: ProposalSet) -> dict:
    with_labels = proposals.has_labels()
    out = {}
    for key in proposals.image_ids():
        entry = {"boxes": proposals.boxes[key].astype(np.float64).tolist(),
                 "scores": proposals.scores[key].astype(np.float64).tolist()}
        if with_labels:
            entry["labels"] = proposals.labels[key].tolist()
        out[key] = entry
    return out


def _coco_payload(proposals: ProposalSet) -> list:
    out = []
    for key in proposals.image_ids():
        image_id = _output_id(key)
        b = proposals.boxes[key].astype(np.float64)
        xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1).tolist()
        categories = np.where(proposals.labels[key] >= 0, proposals.labels[key], 1).tolist()
        for bbox, score, category in zip(xywh, proposals.scores[key].astype(np.float64).tolist(), categories):
            out.append({"image_id": image_id, "bbox": bbox, "score": score, "category_id": category})
    return out


def _detectron2_payload(proposals: ProposalSet) -> dict:
    keys = proposals.image_ids()
    return {"ids": [_output_id(k) for k in keys],
            "boxes": [proposals.boxes[k].astype(np.float32) for k in keys],
            "objectness_logits": [score_to_logit(proposals.scores[k]) for k in keys],
            "bbox_mode": _XYXY_ABS}


# ----------------------------------------------------------------------------- attaching


def attach_proposals(dataset_dicts: Iterable[dict], proposals: ProposalSet, *, score_thresh: float = 0.0,
                     nms_thresh: float = 0.0, topk: Optional[int] = None) -> dict:
    """Put each image's proposals into its Detectron2 dataset dict (in place).

    Each dict (keys ``image_id``, ``height``, ``width``) is matched to the file by
    ``str(record["image_id"])`` and gets exactly Detectron2's precomputed-proposal keys, which
    ``detectron2.data.detection_utils.transform_proposals`` turns into ``record["proposals"]``:

    - ``proposal_boxes``: (K, 4) float32, XYXY_ABS pixels of the original image, clipped to
      it, sorted by decreasing score;
    - ``proposal_objectness_logits``: (K,) float32, ``score_to_logit(score)`` (+inf for 1);
    - ``proposal_bbox_mode``: ``BoxMode.XYXY_ABS``;

    and, for an image the file has, ``proposal_filters``
    (:data:`~regionspot.filter_report.PROPOSAL_FILTERS_KEY`): the
    :meth:`FilterReport.as_dict` of the steps below for that image, which the model's
    output report starts from.

    Per image: boxes are checked against the image (a box may overhang by
    ``BOX_TOLERANCE_PX`` + :data:`BOX_TOLERANCE_FRACTION` of the side and is clipped), boxes
    of zero area after clipping are dropped, then ``select_proposals`` applies the score
    threshold, class-agnostic NMS and top-k.

    Images the file lacks get (0, 4) / (0,) arrays; ids of the file that the dataset lacks
    are ignored; both are counted in the report and logged as a warning.

    Args:
        dataset_dicts: Detectron2 dataset dicts (modified in place).
        proposals: from :func:`read_proposal_file`.
        score_thresh: drop boxes whose score is below it (0: keep all).
        nms_thresh: class-agnostic NMS IoU threshold (0 or >= 1: no NMS).
        topk: keep at most this many boxes per image (None or <= 0: all).

    Returns:
        JSON-serialisable coverage report: ``file``, ``format``, ``images_in_dataset``,
        ``images_with_proposals``, ``images_without_proposals``, ``missing_image_ids`` (first
        20 dataset ids the file lacks), ``file_images_not_in_dataset``, ``unknown_image_ids``
        (first 20 file ids the dataset lacks), ``boxes_in_file_for_dataset``,
        ``degenerate_boxes_dropped``, ``boxes_below_score_thresh``, ``boxes_removed_by_nms``,
        ``boxes_removed_by_topk``, ``boxes_kept`` (these five add up to
        ``boxes_in_file_for_dataset``), ``score_thresh``, ``nms_thresh``, ``topk``.

    Raises:
        ProposalFileError: the file matches no image of a non-empty dataset (the message names
            the file, its number of ids and a few ids of each side); a box reaches beyond its
            image by more than the tolerance (the message names the image id, box, image size).
        InputError: a dataset dict lacks ``image_id``, ``height`` or ``width``.
    """
    from detectron2.structures import BoxMode

    records = list(dataset_dicts)
    dataset_ids = [_record_key(r) for r in records]
    matched = [k for k in dataset_ids if k in proposals.boxes]
    if records and not matched:
        raise ProposalFileError(
            f"{proposals.path}: matches no image of the dataset: the file has {proposals.num_images} image ids "
            f"(e.g. {_first(proposals.image_ids())}), the dataset {len(records)} "
            f"(e.g. {_first(dataset_ids)}); image ids are compared as strings")
    counts = dict.fromkeys(("boxes_in_file_for_dataset", "degenerate_boxes_dropped", "boxes_below_score_thresh",
                            "boxes_removed_by_nms", "boxes_removed_by_topk", "boxes_kept"), 0)
    missing = []
    progress = tqdm(zip(records, dataset_ids), total=len(records), desc="attaching proposals", unit="img",
                    disable=None, leave=False)  # disable=None: quiet when not on a terminal (CI logs)
    for record, key in progress:
        if key in proposals.boxes:
            boxes, logits = _select_for_image(record, key, proposals, counts, score_thresh, nms_thresh, topk)
        else:
            missing.append(key)
            boxes, logits = np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.float32)
        record["proposal_boxes"] = boxes
        record["proposal_objectness_logits"] = logits
        record["proposal_bbox_mode"] = BoxMode.XYXY_ABS
    known = set(dataset_ids)
    unknown = [k for k in proposals.image_ids() if k not in known]
    _warn_coverage(proposals.path, len(records), missing, unknown)
    return {"file": proposals.path, "format": proposals.format, "images_in_dataset": len(records),
            "images_with_proposals": len(records) - len(missing), "images_without_proposals": len(missing),
            "missing_image_ids": [_output_id(k) for k in missing[:20]],
            "file_images_not_in_dataset": len(unknown), "unknown_image_ids": [_output_id(k) for k in unknown[:20]],
            **counts, "score_thresh": float(score_thresh), "nms_thresh": float(nms_thresh),
            "topk": int(topk) if topk is not None and topk > 0 else None}


def _record_key(record: dict) -> str:
    for key in ("image_id", "height", "width"):
        if key not in record:
            raise InputError(f"dataset dict {_short(record.get('file_name', record))} lacks {key!r}, "
                             "needed to attach proposals")
    return str(record["image_id"])


def _first(ids: List[str]) -> str:
    shown = ", ".join(ids[:_NUM_IDS_SHOWN])
    return f"[{shown}{', ...' if len(ids) > _NUM_IDS_SHOWN else ''}]"


def _select_for_image(record: dict, key: str, proposals: ProposalSet, counts: dict,
                      score_thresh: float, nms_thresh: float, topk: Optional[int]):
    """(boxes, logits) kept for one image, updating ``counts``."""
    boxes = _clip_to_image(proposals.boxes[key], int(record["height"]), int(record["width"]), key, proposals.path)
    scores = proposals.scores[key]
    counts["boxes_in_file_for_dataset"] += len(boxes)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    report = FilterReport()
    report.add("proposal file: zero-area boxes", "MODEL.REGIONSPOT.PROPOSAL_FILE", proposals.path, "boxes",
               len(boxes), int(valid.sum()), "check the file's boxes: XYXY pixels of the original image")
    boxes, scores = boxes[valid], scores[valid]
    keep = select_proposals(torch.from_numpy(boxes), torch.from_numpy(scores), topk=topk,
                            score_thresh=score_thresh, nms_thresh=nms_thresh, report=report).numpy()
    removed = {s.key.rsplit(".", 1)[-1]: s.removed for s in report.steps}
    counts["degenerate_boxes_dropped"] += removed["PROPOSAL_FILE"]
    counts["boxes_below_score_thresh"] += removed.get("PROPOSAL_SCORE_THRESH", 0)
    counts["boxes_removed_by_nms"] += removed.get("PROPOSAL_NMS_THRESH", 0)
    counts["boxes_removed_by_topk"] += removed.get("PROPOSAL_TOPK", 0)
    counts["boxes_kept"] += len(keep)
    record[PROPOSAL_FILTERS_KEY] = report.as_dict()
    return np.ascontiguousarray(boxes[keep], dtype=np.float32), score_to_logit(scores[keep])


def _clip_to_image(boxes: np.ndarray, height: int, width: int, key: str, path: str) -> np.ndarray:
    """Boxes clipped to [0, width] x [0, height]; error if one overhangs beyond the tolerance."""
    tol_x = BOX_TOLERANCE_PX + BOX_TOLERANCE_FRACTION * width
    tol_y = BOX_TOLERANCE_PX + BOX_TOLERANCE_FRACTION * height
    outside = ((boxes[:, 0] < -tol_x) | (boxes[:, 2] > width + tol_x)
               | (boxes[:, 1] < -tol_y) | (boxes[:, 3] > height + tol_y))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ProposalFileError(
            f"{path}: image {key}, box {i}: XYXY {np.round(boxes[i], 2).tolist()} reaches beyond the "
            f"{width}x{height} (WxH) image by more than the tolerance ({tol_x:.1f} px horizontally, "
            f"{tol_y:.1f} px vertically); boxes must be in pixels of the ORIGINAL image (not the resized "
            "or a normalised one), and the file must belong to this dataset")
    clipped = boxes.copy()
    np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
    return clipped


def _warn_coverage(path: str, num_records: int, missing: List[str], unknown: List[str]):
    if missing:
        logger.warning("%s: %d of %d dataset images have no entry in the file and get no proposals "
                       "(e.g. image ids %s)", path, len(missing), num_records, _first(missing))
    if unknown:
        logger.warning("%s: %d image ids of the file are not in the dataset and are ignored (e.g. %s)",
                       path, len(unknown), _first(unknown))


__all__ = ["PROPOSAL_FILE_FORMATS", "BOX_TOLERANCE_FRACTION", "ProposalFileError", "ProposalSet",
           "detect_format", "read_proposal_file", "write_proposal_file", "attach_proposals"]
