"""The one representation of a proposal file's boxes (:class:`ProposalSet`), the format names and
layouts, and :class:`ProposalFileError`: what the readers, the writer and the attaching of
proposals to dataset dicts share (docs of the formats: :mod:`regionspot.data.proposal_files`)."""

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from ..validation import InputError

PROPOSAL_FILE_FORMATS = ("glip", "coco", "detectron2")

#: A box may overhang its image by BOX_TOLERANCE_PX + this fraction of the side; it is clipped.
BOX_TOLERANCE_FRACTION = 0.02

# Detectron2's BoxMode values (detectron2.structures.BoxMode), kept as ints so that reading a
# file does not need the enum.
XYXY_ABS = 0
XYWH_ABS = 1

GLIP_LAYOUT = ('{"<image_id>": {"boxes": [[x0, y0, x1, y1], ...], "scores": [p, ...], '
               '"labels": [class_id, ...] (optional)}}')
COCO_LAYOUT = '[{"image_id": int, "bbox": [x, y, w, h], "score": p, "category_id": int (optional)}, ...]'
D2_LAYOUT = ('{"ids": [image_id, ...], "boxes": [(N, 4) array, ...], '
             '"objectness_logits": [(N,) array, ...], "bbox_mode": BoxMode (optional)}')
NUM_IDS_SHOWN = 5


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
                                    f"{sorted(extra)[:NUM_IDS_SHOWN]}")

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


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (for messages naming a bad value)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def output_id(key: str):
    """An image id as written: an int when the string is an integer written canonically."""
    return int(key) if key.isdigit() and str(int(key)) == key else key
