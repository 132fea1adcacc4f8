"""``RegionPredictions``: what :meth:`regionspot.predictor.RegionSpotPredictor.predict` returns for
the regions of one image (boxes, labels, scores, probabilities, masks, region embeddings,
attention maps, and what each selection step removed), with selection by index or score and
the JSON rows the demo writes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional

import numpy as np

from .filter_report import FilterReport

if TYPE_CHECKING:  # torch is imported where used: regionspot.deploy fills these with numpy arrays, torch-free
    import torch

# The predictor's logger (the name its log lines have always carried): above_score's warning.
logger = logging.getLogger("regionspot.predictor")


@dataclass
class RegionPredictions:
    """Predictions for N boxes of one image (all tensors on the CPU), in box order.

    :class:`regionspot.deploy.OnnxRegionSpotPredictor` gives the same fields as numpy arrays
    (the methods work on both).

    Attributes:
        boxes: (N, 4) float32, XYXY_ABS pixels of the image given to ``set_image``.
        classes: (N,) int64 index of the best class in ``vocabulary``.
        labels: N class names.
        scores: (N,) float32 score of the best class (proposal score ** power x probability).
        probabilities: (N, C) float32 class probabilities against the whole vocabulary.
        proposal_scores: (N,) float32 proposal scores (1 for given boxes).
        masks: (N, H, W) bool masks in the image's pixels (SAM's box-prompted masks, or the
            automatic mask generator's with ``proposals="sam_auto"``).
        vocabulary: the C class names scored against.
        filters: what each selection step removed on the way (SAM's automatic-mask filters,
            the ``PROPOSAL_*`` selection, :meth:`above_score`), with the key that controls it
            (:class:`~regionspot.filter_report.FilterReport`; ``filters.as_dict()``
            is JSON). Empty for given boxes, which are never filtered.
        embeddings: (N, E) float32 L2-normalised region embeddings in the vision-language
            model's joint space (``logits = LOGIT_SCALE * embeddings @ text_embeddings.T``).
        attention: (N, num_layers, g, g) float32 cross-attention maps of each region's token
            over the semantic feature map's g x g patch grid (the class token excluded, as in
            the paper's Fig. 4; heads averaged; the grid covers the whole image, which CLIP
            sees stretched to a square), or None unless ``predict(..., return_attention=True)``.
            :func:`regionspot.attention_maps.upsample_attention` brings a map to image pixels.
        prompt_iou: (N,) float32 SAM's predicted IoU of the mask of a point / mask prompt,
            or None for other prompts.
    """

    boxes: torch.Tensor
    classes: torch.Tensor
    labels: List[str]
    scores: torch.Tensor
    probabilities: torch.Tensor
    proposal_scores: torch.Tensor
    masks: torch.Tensor
    vocabulary: List[str]
    filters: FilterReport = field(default_factory=FilterReport)
    embeddings: Optional[torch.Tensor] = None
    attention: Optional[torch.Tensor] = None
    prompt_iou: Optional[torch.Tensor] = None

    def select(self, keep: torch.Tensor) -> "RegionPredictions":
        """The predictions of the boxes where ``keep`` ((N,) bool or int64 indices) says so."""
        if isinstance(self.boxes, np.ndarray):
            keep = np.asarray(keep)
            indices = np.arange(len(self.labels))[keep].tolist()
        else:
            import torch

            keep = torch.as_tensor(keep)
            indices = torch.arange(len(self.labels))[keep].tolist()

        def part(t):
            return None if t is None else t[keep]
        return RegionPredictions(
            boxes=self.boxes[keep], classes=self.classes[keep],
            labels=[self.labels[i] for i in indices],
            scores=self.scores[keep], probabilities=self.probabilities[keep],
            proposal_scores=self.proposal_scores[keep], masks=self.masks[keep], vocabulary=self.vocabulary,
            filters=self.filters.copy(), embeddings=part(self.embeddings), attention=part(self.attention),
            prompt_iou=part(self.prompt_iou))

    def top_classes(self, k: int = 5) -> List[List[tuple]]:
        """Per region, its ``k`` most probable classes as (name, probability), best first."""
        k = min(k, len(self.vocabulary))
        if not len(self.labels) or k == 0:
            return [[] for _ in self.labels]
        if isinstance(self.probabilities, np.ndarray):
            indices = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
            values = np.take_along_axis(self.probabilities, indices, axis=1)
        else:
            values, indices = self.probabilities.topk(k, dim=1)
        return [[(self.vocabulary[i], float(v)) for v, i in zip(vs, ids)]
                for vs, ids in zip(values.tolist(), indices.tolist())]

    def above_score(self, min_score: float, key: str = "min_score", where: str = "") -> "RegionPredictions":
        """The predictions whose score is at least ``min_score``, the step recorded in
        :attr:`filters` (stage "minimum score", under ``key``, e.g. the demo's "--min-score").

        When it removes every region, one warning is logged naming the step, the counts and
        ``key``. ``min_score`` <= 0 keeps everything and records no step.

        Args:
            min_score: the lowest score kept (scores are in [0, 1]).
            key: the setting's name as the user knows it.
            where: what is being recognised, for the warning (e.g. the image's path).
        """
        kept = self.select(self.scores >= min_score)
        if min_score > 0:
            best = f"; the best score was {float(self.scores.max()):.4g}" if len(self.labels) else ""
            kept.filters.add("minimum score", key, float(min_score), "regions", len(self.labels), len(kept.labels),
                             "lower it" + best)
            message = kept.filters.warning(where or "RegionPredictions.above_score")
            if message and kept.filters.emptying_step() is kept.filters.steps[-1]:
                logger.warning(message)
        return kept

    def to_json(self, top_k: int = 0) -> List[dict]:
        """One dict per box: box (XYXY pixels), label, class index, score, proposal score
        (+ ``"top_classes"``: the ``top_k`` best [name, probability] pairs, when ``top_k`` > 0)."""
        rows = [
            {"box_xyxy": [round(v, 2) for v in box], "label": label, "class_id": int(c), "score": float(s),
             "proposal_score": float(p)}
            for box, label, c, s, p in zip(self.boxes.tolist(), self.labels, self.classes, self.scores,
                                           self.proposal_scores)
        ]
        if top_k > 0:
            for row, top in zip(rows, self.top_classes(top_k)):
                row["top_classes"] = [[name, round(p, 6)] for name, p in top]
        return rows
