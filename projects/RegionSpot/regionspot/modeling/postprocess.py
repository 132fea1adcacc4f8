"""From region-vocabulary logits to detections: the scoring protocol, and masks pasted once.

Every path that turns RegionSpot's logits into labelled boxes (``RegionSpot.forward`` for
evaluation, :class:`regionspot.RegionSpotPredictor`, the demo, the benchmark) goes through
:func:`select_detections` with a :class:`RecognitionProtocol`, so the numbers a user reads
always say how they were made (:meth:`RecognitionProtocol.describe`).

Score of a (box, class) pair:

- class probability ``p``: softmax of the logits over the vocabulary (released protocol) or
  a per-class sigmoid (``MODEL.REGIONSPOT.TEST_SCORE``);
- fused with the proposal's own score ``s`` in [0, 1] (1 for ground-truth boxes):
  ``score = s ** PROPOSAL_SCORE_POWER * p``. Power 1 is the released behaviour with GLIP boxes;
  0 ignores the proposal score.

Selections (``MODEL.REGIONSPOT.TEST_PROTOCOL``):

- ``"topk"`` (released, reference protocol of the paper's Table 1): the ``TEST_TOPK`` best
  (box, class) pairs of the image (a box may carry several classes); then optional per-class
  NMS among them (``TEST_NMS_THRESH``, off by default);
- ``"tap"``: the protocol of TAP (Tokenize Anything via Prompting, Pan et al.), for comparing
  with that peer on equal terms: every class whose probability exceeds ``TAP_CLASS_THRESH``
  (0.001 in TAP's evaluation script) becomes a detection of the box, scored
  ``sqrt(p * clip(iou, 0, 1)) * s ** PROPOSAL_SCORE_POWER`` with ``iou`` SAM's predicted IoU
  of the box's mask; per-class NMS (TAP uses IoU 0.5: set ``TEST_NMS_THRESH 0.5``), then the
  ``TEST_TOPK`` best;
- ``"per_box"``: the best class of every box, all boxes in their order (the predictor and
  the demo: "what is in this box?").

The LVIS evaluator then keeps ``TEST.DETECTIONS_PER_IMAGE`` (300, LVIS's standard) per image.
Each selection step records what it removed, and its key, in the image's filter report
(:mod:`regionspot.filter_report`), so that an empty result says which step emptied it.

The protocol record (:class:`RecognitionProtocol`) and :class:`SharedMasks` live in
:mod:`regionspot.structures` (the evaluation reads them too) and are re-exported here.

Masks: a box that carries several classes shares one mask. :class:`SharedMasks` stores one
bitmap per kept box and an index per detection, so mask memory grows with the number of
distinct boxes, not with the number of (box, class) pairs, and the evaluator encodes each
bitmap once.
"""

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..structures import CLASS_SCORES, SELECTIONS, RecognitionProtocol, SharedMasks  # noqa: F401
from .profiling import stage


def class_probabilities(logits: torch.Tensor, class_score: str) -> torch.Tensor:
    """(N, C) logits -> (N, C) float32 class probabilities: softmax over C or per-class sigmoid."""
    if class_score not in CLASS_SCORES:
        raise ValueError(f"class_score must be one of {CLASS_SCORES}, got {class_score!r}")
    logits = logits.float()
    return logits.softmax(-1) if class_score == "softmax" else logits.sigmoid()


class Detections(NamedTuple):
    """K detections of one image, best first (``per_box``: box order).

    Attributes:
        box_index: (K,) int64 index of the proposal each detection labels.
        classes: (K,) int64 vocabulary index.
        scores: (K,) float32 fused score.
    """

    box_index: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor


def select_detections(probabilities: torch.Tensor, proposal_scores: torch.Tensor, boxes: torch.Tensor,
                      protocol: RecognitionProtocol,
                      iou_predictions: Optional[torch.Tensor] = None, report=None) -> Detections:
    """Apply a protocol's score fusion and selection to one image's N proposals.

    Args:
        probabilities: (N, C) float class probabilities (:func:`class_probabilities`).
        proposal_scores: (N,) float proposal scores in [0, 1].
        boxes: (N, 4) float XYXY boxes (any frame; only NMS uses them).
        protocol: the :class:`RecognitionProtocol`.
        iou_predictions: (N,) SAM's predicted IoU of each box's mask; required by "tap".
        report: optional :class:`~regionspot.filter_report.FilterReport` of the
            image: each selection step records how many (box, class) pairs it removed, with
            its key ("tap": ``TAP_CLASS_THRESH``, then ``TEST_NMS_THRESH`` and ``TEST_TOPK``;
            "topk": ``TEST_TOPK``, then ``TEST_NMS_THRESH``; "per_box" removes nothing).

    Returns:
        :class:`Detections`.

    Raises:
        ValueError: "tap" without ``iou_predictions``.
    """
    n, c = probabilities.shape
    device = probabilities.device

    def record(stage, key, setting, before, after, advice):
        if report is not None:
            report.add(f"recognition: {stage}", f"MODEL.REGIONSPOT.{key}", setting, "(box, class) pairs",
                       before, after, advice)
    weight = proposal_scores.float().clamp(0, 1) ** protocol.proposal_score_power  # 0 ** 0 == 1
    if protocol.selection == "per_box":
        scores, classes = (probabilities * weight[:, None]).max(dim=1) if n else (
            torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int64, device=device))
        return Detections(torch.arange(n, device=device), classes, scores)
    if protocol.selection == "tap":
        if iou_predictions is None:
            raise ValueError("the TAP protocol needs SAM's predicted IoU of every box")
        box_idx, classes = torch.nonzero(probabilities > protocol.tap_class_thresh, as_tuple=True)
        record("TAP class threshold", "TAP_CLASS_THRESH", protocol.tap_class_thresh, n * c, box_idx.numel(),
               "lower it")
        iou = iou_predictions.float().clamp(0, 1)[box_idx]
        scores = (probabilities[box_idx, classes] * iou).sqrt() * weight[box_idx]
        order = torch.argsort(scores, descending=True)
        box_idx, classes, scores = box_idx[order], classes[order], scores[order]
    else:
        fused = (probabilities * weight[:, None]).flatten()
        scores, flat = fused.topk(min(protocol.topk, fused.numel()))
        box_idx, classes = flat // c, flat % c
        record("top-k", "TEST_TOPK", protocol.topk, n * c, scores.numel(), "raise it")
    if protocol.nms_thresh > 0:
        before = scores.numel()
        if before:
            from torchvision.ops import batched_nms

            keep = batched_nms(boxes[box_idx].float(), scores, classes, protocol.nms_thresh)
            box_idx, classes, scores = box_idx[keep], classes[keep], scores[keep]
        record("per-class NMS", "TEST_NMS_THRESH", protocol.nms_thresh, before, scores.numel(),
               "raise it (0 turns NMS off)")
    k = min(protocol.topk, scores.numel())
    if protocol.selection == "tap":
        record("top-k", "TEST_TOPK", protocol.topk, scores.numel(), k, "raise it")
    return Detections(box_idx[:k], classes[:k], scores[:k])


def resize_masks(masks: torch.Tensor, output_size: Sequence[int], chunk: int = 16) -> torch.Tensor:
    """Resize (K, h, w) bool masks to (K, H, W) bool by nearest neighbour, a chunk at a time."""
    out = torch.empty(masks.shape[0], *output_size, dtype=torch.bool, device=masks.device)
    for start in range(0, masks.shape[0], chunk):
        part = masks[start:start + chunk, None].float()
        out[start:start + part.shape[0]] = F.interpolate(part, size=tuple(output_size), mode="nearest")[:, 0] > 0.5
    return out



@stage("postprocess")
def detections_to_instances(proposals, logits: torch.Tensor, proposal_scores: torch.Tensor,
                            iou_predictions: Optional[torch.Tensor], output_size: Tuple[int, int],
                            protocol: RecognitionProtocol, *,
                            masks_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                            report=None):
    """Scored detections of one image in the output frame (the model's last step).

    Args:
        proposals: ``Instances`` with ``proposal_boxes`` (XYXY_ABS pixels of the encoded image).
        logits: (N, C) float32 region-vocabulary logits.
        proposal_scores: (N,) float32 in [0, 1].
        iou_predictions: (N,) float32 SAM's predicted IoUs, or None (needed for "tap" only).
        output_size: (H_out, W_out) to report boxes and masks in (the original image).
        protocol: scoring and selection (:class:`RecognitionProtocol`).
        masks_of: None for no masks; else a function from the (K,) int64 indices of the kept
            proposals to their (K, H_out, W_out) bool masks (one mask per kept box, shared by
            all its detections: :class:`SharedMasks`).
        report: the image's filter report, to which the selection steps add what they removed.

    Returns:
        ``Instances`` of size ``output_size`` with ``pred_boxes``, ``scores``,
        ``pred_classes``, ``proposal_scores`` (+ ``pred_masks``; + ``class_probs``, the (K, C)
        class probabilities, for the "per_box" selection).
    """
    from detectron2.structures import Boxes, Instances

    boxes = proposals.proposal_boxes.tensor
    probs = class_probabilities(logits, protocol.class_score)
    det = select_detections(probs, proposal_scores, boxes, protocol, iou_predictions, report=report)
    out_h, out_w = output_size
    in_h, in_w = proposals.image_size
    result = Instances((out_h, out_w))
    out_boxes = Boxes(boxes[det.box_index].clone())
    out_boxes.scale(out_w / in_w, out_h / in_h)
    out_boxes.clip((out_h, out_w))
    result.pred_boxes = out_boxes
    result.scores = det.scores
    result.pred_classes = det.classes
    result.proposal_scores = proposal_scores[det.box_index]
    if protocol.selection == "per_box":
        result.class_probs = probs[det.box_index]
    if masks_of is not None:
        kept, inverse = torch.unique(det.box_index, return_inverse=True)
        result.pred_masks = SharedMasks(masks_of(kept), inverse)
    return result
