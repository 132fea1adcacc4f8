"""A proposal file's boxes put into Detectron2 dataset dicts (:func:`attach_proposals`): matched by
image id, checked against and clipped to each image, selected once (score threshold, NMS,
top-k), stored under Detectron2's precomputed-proposal keys with each image's filter report.
The file itself is read by :mod:`regionspot.data.proposal_files`."""

import logging
from typing import Iterable, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from ..filter_report import PROPOSAL_FILTERS_KEY, FilterReport
from ..proposal_sources import score_to_logit, select_proposals
from .proposal_files.proposal_set import (
    BOX_TOLERANCE_FRACTION,
    NUM_IDS_SHOWN,
    ProposalFileError,
    ProposalSet,
    output_id,
    short_repr,
)
from .validation import BOX_TOLERANCE_PX, InputError

# The log lines keep the name they had when this was part of proposal_files.py.
logger = logging.getLogger("regionspot.data.proposal_files")


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
        proposals: from :func:`~regionspot.data.proposal_files.read_proposal_file`.
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
            "missing_image_ids": [output_id(k) for k in missing[:20]],
            "file_images_not_in_dataset": len(unknown), "unknown_image_ids": [output_id(k) for k in unknown[:20]],
            **counts, "score_thresh": float(score_thresh), "nms_thresh": float(nms_thresh),
            "topk": int(topk) if topk is not None and topk > 0 else None}


def _record_key(record: dict) -> str:
    for key in ("image_id", "height", "width"):
        if key not in record:
            raise InputError(f"dataset dict {short_repr(record.get('file_name', record))} lacks {key!r}, "
                             "needed to attach proposals")
    return str(record["image_id"])


def _first(ids: List[str]) -> str:
    shown = ", ".join(ids[:NUM_IDS_SHOWN])
    return f"[{shown}{', ...' if len(ids) > NUM_IDS_SHOWN else ''}]"


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

