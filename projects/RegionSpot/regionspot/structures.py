"""Small value types shared by the model, the data loader and the evaluation.

- :class:`RecognitionProtocol`: how logits become scored detections (the record stored and
  printed with every AP table; :mod:`regionspot.modeling.postprocess` applies it,
  :mod:`regionspot.evaluation.protocol` reports it);
- :class:`SharedMasks`: K detection masks sharing U <= K bitmaps (made by the model, encoded
  by the evaluator);
- :class:`ImageFeatures` and :class:`RegionRecognition`: what the recognition path hands from
  one step to the next (:class:`regionspot.modeling.meta_arch.RegionSpot`: ``encode_images``
  -> ``recognize`` -> ``postprocess``).

This module imports neither ``regionspot.modeling``, ``regionspot.data`` nor
``regionspot.evaluation``.
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.structures import Instances

from .proposal_sources import logit_to_score

__all__ = ["CLASS_SCORES", "SELECTIONS", "RecognitionProtocol", "SharedMasks", "ImageFeatures",
           "RegionRecognition", "LocalizerEmbedding", "embedding_at", "embedding_batch_size", "embedding_dims",
           "stack_embeddings"]

# A localizer's image embedding: one tensor (SAM: (256, g, g) per image), or a dict of tensors for
# localizers whose decoder also reads other feature maps (SAM-HQ's early ViT features, SAM 2.1's
# high-resolution features). Batched, every tensor has the batch dimension first.
LocalizerEmbedding = Union[torch.Tensor, Dict[str, torch.Tensor]]


def embedding_at(batch: LocalizerEmbedding, i: int) -> LocalizerEmbedding:
    """Image ``i`` of a batched localizer embedding (a tensor or a dict of tensors)."""
    if isinstance(batch, dict):
        return {k: v[i] for k, v in batch.items()}
    return batch[i]


def embedding_batch_size(batch: LocalizerEmbedding) -> int:
    """B, the number of images in a batched localizer embedding."""
    return int(next(iter(batch.values())).shape[0] if isinstance(batch, dict) else batch.shape[0])


def embedding_dims(embedding: LocalizerEmbedding) -> int:
    """Dimensions of a localizer embedding's (first) tensor: 3 for one image's, 4 for a batch's."""
    return int(next(iter(embedding.values())).dim() if isinstance(embedding, dict) else embedding.dim())


def stack_embeddings(items: Sequence[LocalizerEmbedding]) -> LocalizerEmbedding:
    """Per-image localizer embeddings (tensors or dicts of tensors) stacked into a batch."""
    if items and isinstance(items[0], dict):
        return {k: torch.stack([e[k] for e in items]) for k in items[0]}
    return torch.stack(list(items))

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
        return (f"SharedMasks(num_masks={len(self)}, bitmaps={self.bitmaps.shape[0]}, "
                f"size={tuple(self.bitmaps.shape[1:])})")


@dataclass
class ImageFeatures:
    """What the frozen encoders computed for one image, once (:meth:`RegionSpot.encode_images`).

    Attributes:
        image: (3, H, W) uint8 RGB, the image as given (the mapper's resized image).
        sam_embedding: the localizer's image embedding (:data:`LocalizerEmbedding`; SAM's is
            (256, g, g)), float32 or the encoder precision.
        sam_input_size: (h, w) of the image inside SAM's padded S x S input.
        semantic: (L, D) float32 CLIP semantic feature map.
    """

    image: torch.Tensor
    sam_embedding: LocalizerEmbedding
    sam_input_size: Tuple[int, int]
    semantic: torch.Tensor

    @property
    def image_size(self) -> Tuple[int, int]:
        """(H, W) of :attr:`image`: the frame of proposals and boxes before post-processing."""
        return tuple(self.image.shape[-2:])

    @classmethod
    def from_batch(cls, images: Sequence[torch.Tensor], sam_embeddings: LocalizerEmbedding,
                   sam_input_sizes: Sequence[Tuple[int, int]], semantic: torch.Tensor) -> List["ImageFeatures"]:
        """Split the batched outputs of the localizer's and the semantic encoder's ``encode``
        into one :class:`ImageFeatures` per image."""
        return [cls(image, embedding_at(sam_embeddings, i), tuple(sam_input_sizes[i]), semantic[i])
                for i, image in enumerate(images)]


@dataclass
class RegionRecognition:
    """One image's proposals recognised against a vocabulary, before post-processing.

    Attributes:
        proposals: ``Instances`` with ``proposal_boxes`` (XYXY_ABS pixels of the encoded
            image), ``objectness_logits`` (and ``proposal_masks`` for ``sam_auto``).
        logits: (N, C) float32 region-vocabulary logits (``LOGIT_SCALE * cosine``).
        iou_predictions: (N,) float32 SAM's predicted IoU of each box's mask (None when SAM's
            masks were not computed: neither masks nor the TAP protocol asked for them).
        low_res_masks: (N, 1, 4g, 4g) float32 SAM mask logits (padded frame, 1/4 resolution),
            or None like ``iou_predictions``.
        sam_input_size: (h, w) of the image inside SAM's padded input.
        embeddings: (N, E) float32 L2-normalised region embeddings (the head's output in the
            vision-language model's joint space; ``logits = LOGIT_SCALE * embeddings @ text.T``).
        attention: (N, num_layers, L) float32 cross-attention weights of each region's token
            over the L semantic feature-map tokens, averaged over heads; None unless asked for
            (``recognize(..., return_attention=True)``).
    """

    proposals: Instances
    logits: torch.Tensor
    iou_predictions: Optional[torch.Tensor]
    low_res_masks: Optional[torch.Tensor]
    sam_input_size: Tuple[int, int]
    embeddings: Optional[torch.Tensor] = None
    attention: Optional[torch.Tensor] = None

    @property
    def proposal_scores(self) -> torch.Tensor:
        """(N,) float32 proposal scores in [0, 1] (1 for ground-truth boxes)."""
        return logit_to_score(self.proposals.objectness_logits)
