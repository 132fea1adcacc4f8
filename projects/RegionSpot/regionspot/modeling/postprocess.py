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
(:mod:`regionspot.modeling.proposals.filters`), so that an empty result says which step emptied it.

Masks: a box that carries several classes shares one mask. :class:`SharedMasks` stores one
bitmap per kept box and an index per detection, so mask memory grows with the number of
distinct boxes, not with the number of (box, class) pairs, and the evaluator encodes each
bitmap once.
"""

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .profiling import stage

CLASS_SCORES = ("softmax", "sigmoid")
SELECTIONS = ("topk", "tap", "per_box")


@dataclass(frozen=True)
class RecognitionProtocol:
    """How logits become scored detections (see the module docstring).

    Attributes:
        class_score: "softmax" over the vocabulary (released) or "sigmoid" per class.
        proposal_score_power: exponent of the proposal score in the fused score (>= 0).
        selection: "topk", "tap" or "per_box".
        topk: detections kept per image by "topk" and "tap" (> 0).
        nms_thresh: per-class NMS IoU threshold among the detections; 0 disables it.
        tap_class_thresh: class-probability threshold of the "tap" selection.
        max_detections: what the evaluator keeps per image (stated in :meth:`describe`;
            applied by the LVIS evaluator, not here).

    Raises:
        ValueError: a value out of range; the message names the config key.
    """

    class_score: str = "softmax"
    proposal_score_power: float = 1.0
    selection: str = "topk"
    topk: int = 900
    nms_thresh: float = 0.0
    tap_class_thresh: float = 0.001
    max_detections: int = 300

    def __post_init__(self):
        checks = [
            (self.class_score in CLASS_SCORES, "MODEL.REGIONSPOT.TEST_SCORE", f"one of {CLASS_SCORES}",
             self.class_score),
            (self.selection in SELECTIONS, "MODEL.REGIONSPOT.TEST_PROTOCOL", f"one of {SELECTIONS}",
             self.selection),
            (self.proposal_score_power >= 0, "MODEL.REGIONSPOT.PROPOSAL_SCORE_POWER", ">= 0",
             self.proposal_score_power),
            (self.topk > 0, "MODEL.REGIONSPOT.TEST_TOPK", "positive", self.topk),
            (0 <= self.nms_thresh <= 1, "MODEL.REGIONSPOT.TEST_NMS_THRESH", "in [0, 1] (0 disables NMS)",
             self.nms_thresh),
            (0 <= self.tap_class_thresh < 1, "MODEL.REGIONSPOT.TAP_CLASS_THRESH", "in [0, 1)",
             self.tap_class_thresh),
            (self.max_detections > 0, "TEST.DETECTIONS_PER_IMAGE", "positive", self.max_detections),
        ]
        for ok, key, expected, value in checks:
            if not ok:
                raise ValueError(f"{key} must be {expected}, got {value!r}")

    @classmethod
    def from_config(cls, cfg) -> "RecognitionProtocol":
        """The protocol of a Detectron2 config with RegionSpot's keys."""
        rs = cfg.MODEL.REGIONSPOT
        return cls(class_score=rs.TEST_SCORE, proposal_score_power=float(rs.PROPOSAL_SCORE_POWER),
                   selection=rs.TEST_PROTOCOL, topk=int(rs.TEST_TOPK), nms_thresh=float(rs.TEST_NMS_THRESH),
                   tap_class_thresh=float(rs.TAP_CLASS_THRESH), max_detections=int(cfg.TEST.DETECTIONS_PER_IMAGE))

    def replace(self, **changes) -> "RecognitionProtocol":
        """A copy with some fields changed (e.g. ``selection="per_box"`` for the predictor)."""
        return dataclasses.replace(self, **changes)

    def fusion_text(self) -> str:
        """How the final score is made, in words."""
        p = "class probability"
        if self.selection == "tap":
            p = "sqrt(class probability x SAM's predicted IoU)"
        if self.proposal_score_power == 0:
            return f"score = {p} (proposal score ignored)"
        return f"score = proposal score^{self.proposal_score_power:g} x {p}"

    def describe(self, num_classes: Optional[int] = None) -> str:
        """One line stating the protocol (printed with every AP table and stored with it)."""
        vocab = f" over {num_classes} classes" if num_classes else ""
        parts = [f"{self.class_score}{vocab}", self.fusion_text()]
        if self.selection == "topk":
            parts.append(f"top {self.topk} (box, class) pairs per image")
        elif self.selection == "tap":
            parts.append(f"TAP protocol: every class with probability > {self.tap_class_thresh:g} per box, "
                         f"best {self.topk} per image")
        else:
            parts.append("best class per box")
        parts.append(f"per-class NMS at IoU {self.nms_thresh:g}" if self.nms_thresh > 0 else "no NMS")
        parts.append(f"evaluator keeps {self.max_detections} per image")
        return "; ".join(parts)

    def as_dict(self) -> Dict[str, object]:
        """The fields, JSON-serialisable."""
        return dataclasses.asdict(self)


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
        report: optional :class:`~regionspot.modeling.proposals.filters.FilterReport` of the
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


class SharedMasks:
    """K binary masks of K detections that share U <= K distinct bitmaps.

    A box labelled with several classes yields several detections with one mask; storing it
    once keeps memory proportional to the distinct boxes (900 (box, class) pairs on 10 boxes
    of a 1333 x 800 image: 10 MB instead of 960 MB). Behaves like a (K, H, W) bool tensor
    where Detectron2 needs it: ``len``, indexing with ints, slices, bool or int64 tensors
    (what ``Instances.__getitem__`` does), ``.to(device)``, iteration, :meth:`cat`.

    Args:
        bitmaps: (U, H, W) bool.
        index: (K,) int64, the bitmap of each detection (values in [0, U)).
    """

    def __init__(self, bitmaps: torch.Tensor, index: torch.Tensor):
        if bitmaps.dim() != 3 or bitmaps.dtype != torch.bool:
            raise ValueError(f"bitmaps must be a (U, H, W) bool tensor, got {tuple(bitmaps.shape)} {bitmaps.dtype}")
        if index.dim() != 1:
            raise ValueError(f"index must be (K,), got {tuple(index.shape)}")
        self.bitmaps = bitmaps
        self.index = index.to(device=bitmaps.device, dtype=torch.int64)

    @classmethod
    def from_tensor(cls, masks: torch.Tensor) -> "SharedMasks":
        """Wrap a plain (K, H, W) bool tensor (one bitmap per detection)."""
        return cls(masks, torch.arange(masks.shape[0], device=masks.device))

    def __len__(self) -> int:
        return self.index.shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self),) + tuple(self.bitmaps.shape[1:]))

    @property
    def device(self) -> torch.device:
        return self.bitmaps.device

    @property
    def dtype(self) -> torch.dtype:
        return self.bitmaps.dtype

    def __getitem__(self, item: Union[int, slice, torch.Tensor]) -> Union[torch.Tensor, "SharedMasks"]:
        if isinstance(item, int):
            return self.bitmaps[self.index[item]]
        return SharedMasks(self.bitmaps, self.index[item])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in self.index.tolist():
            yield self.bitmaps[i]

    def to(self, *args, **kwargs) -> "SharedMasks":
        bitmaps = self.bitmaps.to(*args, **kwargs)
        return SharedMasks(bitmaps, self.index.to(bitmaps.device))

    def tensor(self) -> torch.Tensor:
        """The (K, H, W) bool tensor, materialised (K bitmaps: use sparingly)."""
        return self.bitmaps[self.index]

    def __array__(self, dtype=None, copy=None):
        """(K, H, W) bool numpy array (``np.asarray``, as Detectron2's ``Visualizer`` reads masks)."""
        array = self.tensor().cpu().numpy()
        return array if dtype is None else array.astype(dtype)

    def compact(self) -> "SharedMasks":
        """The same masks keeping only the bitmaps some detection uses, in first-use order."""
        used, inverse = torch.unique(self.index, return_inverse=True)
        return SharedMasks(self.bitmaps[used], inverse)

    @staticmethod
    def cat(masks_list: Sequence["SharedMasks"]) -> "SharedMasks":
        """Concatenate along the detections (``Instances.cat``)."""
        bitmaps, indices, total = [], [], 0
        for m in masks_list:
            bitmaps.append(m.bitmaps)
            indices.append(m.index + total)
            total += m.bitmaps.shape[0]
        return SharedMasks(torch.cat(bitmaps), torch.cat(indices))

    def __repr__(self) -> str:
        return f"SharedMasks(num_masks={len(self)}, bitmaps={self.bitmaps.shape[0]}, size={tuple(self.bitmaps.shape[1:])})"


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
