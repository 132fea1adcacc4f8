"""Where the boxes to recognise come from: four proposal sources, one representation.

RegionSpot recognises boxes that something else proposes (paper Sec. 4, Table 1). Every
source hands the model Detectron2 proposals: an ``Instances`` per image with

- ``proposal_boxes``: ``Boxes``, (N, 4) float32 XYXY_ABS pixels of the image the model sees
  (the mapper's resized image);
- ``objectness_logits``: (N,) float32, the proposal score as a logit. ``sigmoid`` of it is
  the proposal score in [0, 1] that inference fuses with the class probability
  (``score = proposal_score ** PROPOSAL_SCORE_POWER * class probability``). A score of
  exactly 1 (ground truth) is stored as ``+inf``, 0 as ``-inf``;
- optionally ``proposal_masks``: (N, H, W) bool masks that come with the proposals
  (``sam_auto``), used as the mask output instead of SAM's box-prompted masks.

Sources (``MODEL.REGIONSPOT.PROPOSALS``), one module each:

- ``gt`` (:mod:`.gt`): the dataset's ground-truth boxes, score 1 (the paper's main protocol);
- ``file`` (:mod:`.file`): a detector's results on disk (GLIP layout, COCO results list or
  Detectron2's proposal pickle), attached to the dataset dicts as Detectron2's
  precomputed-proposal keys and turned into ``proposals`` by the mapper;
- ``rpn`` (:mod:`.rpn`): Detectron2's RPN with its own weights, in the same forward;
- ``sam_auto`` (:mod:`.sam_auto`): SAM's automatic mask generator ("recognise everything").

Every step that drops proposals (SAM's own filters, :func:`select_proposals`) can record what
it removed, and the key that controls it, in the image's filter report (:mod:`.filters`).
"""

from typing import Optional

import numpy as np
import torch

PROPOSAL_SOURCES = ("gt", "file", "rpn", "sam_auto")


def score_to_logit(scores):
    """Proposal scores in [0, 1] -> logits (``objectness_logits``); 1 -> +inf, 0 -> -inf.

    Args:
        scores: float tensor or numpy array of probabilities, any shape.

    Returns:
        The same type and shape, float32.
    """
    if torch.is_tensor(scores):
        return torch.logit(scores.float())
    p = np.asarray(scores, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return (np.log(p) - np.log1p(-p)).astype(np.float32)


def logit_to_score(logits):
    """``objectness_logits`` -> proposal scores in [0, 1] (the sigmoid; +inf -> 1 exactly).

    Args:
        logits: float tensor or numpy array, any shape.

    Returns:
        The same type and shape, float32.
    """
    if torch.is_tensor(logits):
        return torch.sigmoid(logits.float())
    x = np.asarray(logits, dtype=np.float64)
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def select_proposals(boxes: torch.Tensor, scores: torch.Tensor, *, topk: Optional[int] = None,
                     score_thresh: float = 0.0, nms_thresh: float = 0.0, report=None) -> torch.Tensor:
    """Indices of the proposals to keep, best first: score threshold, class-agnostic NMS, top-k.

    The same selection applies to every predicted source (a file's boxes, the RPN's, SAM's
    automatic masks); ground-truth boxes are never filtered.

    Args:
        boxes: (N, 4) float XYXY boxes (any frame; NMS only compares them with each other).
        scores: (N,) float proposal scores in [0, 1].
        topk: keep at most this many (None or <= 0: no cap).
        score_thresh: drop proposals whose score is below it (0: keep all).
        nms_thresh: class-agnostic NMS IoU threshold; 0 (or >= 1) disables NMS.
        report: optional :class:`~regionspot.modeling.proposals.filters.FilterReport` of the
            image: each step that is on records how many boxes it removed, with its key
            (``MODEL.REGIONSPOT.PROPOSAL_SCORE_THRESH``, ``PROPOSAL_NMS_THRESH``,
            ``PROPOSAL_TOPK``).

    Returns:
        (K,) int64 indices into ``boxes``, sorted by decreasing score (stable for ties).
    """
    from torchvision.ops import nms

    def record(stage, key, setting, before, advice):
        if report is not None:
            report.add(f"proposals: {stage}", f"MODEL.REGIONSPOT.{key}", setting, "boxes", before,
                       order.numel(), advice)

    order = torch.argsort(scores, descending=True, stable=True)
    if score_thresh > 0:
        before = order.numel()
        order = order[scores[order] >= score_thresh]
        record("score threshold", "PROPOSAL_SCORE_THRESH", float(score_thresh), before, "lower it")
    if 0 < nms_thresh < 1:
        before = order.numel()
        if before > 1:
            kept = nms(boxes[order].float(), scores[order].float(), nms_thresh)
            order = order[kept.sort().values]  # nms returns by decreasing score; keep our stable order
        record("NMS", "PROPOSAL_NMS_THRESH", float(nms_thresh), before, "raise it (0 turns NMS off)")
    if topk is not None and topk > 0:
        before = order.numel()
        order = order[:topk]
        record("top-k", "PROPOSAL_TOPK", int(topk), before, "raise it")
    return order


def check_proposal_source(source: str) -> str:
    """Return ``source`` if it names a proposal source, else raise a ValueError naming the key."""
    if source not in PROPOSAL_SOURCES:
        raise ValueError(f"MODEL.REGIONSPOT.PROPOSALS must be one of {PROPOSAL_SOURCES}, got {source!r}")
    return source


__all__ = ["PROPOSAL_SOURCES", "score_to_logit", "logit_to_score", "select_proposals",
           "check_proposal_source"]
