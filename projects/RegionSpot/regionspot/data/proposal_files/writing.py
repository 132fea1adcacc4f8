"""Writing a :class:`~.proposal_set.ProposalSet` in one of the three formats, atomically."""

import json
import pickle

import numpy as np

from ...io import atomic_write
from ...proposal_sources import score_to_logit
from .proposal_set import PROPOSAL_FILE_FORMATS, XYXY_ABS, ProposalSet, output_id


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
        image_id = output_id(key)
        b = proposals.boxes[key].astype(np.float64)
        xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1).tolist()
        categories = np.where(proposals.labels[key] >= 0, proposals.labels[key], 1).tolist()
        for bbox, score, category in zip(xywh, proposals.scores[key].astype(np.float64).tolist(), categories):
            out.append({"image_id": image_id, "bbox": bbox, "score": score, "category_id": category})
    return out


def _detectron2_payload(proposals: ProposalSet) -> dict:
    keys = proposals.image_ids()
    return {"ids": [output_id(k) for k in keys],
            "boxes": [proposals.boxes[k].astype(np.float32) for k in keys],
            "objectness_logits": [score_to_logit(proposals.scores[k]) for k in keys],
            "bbox_mode": XYXY_ABS}
