"""``RegionSpotPredictor``: set an image once, then recognise any boxes with any vocabulary.

Modelled on ``segment_anything.SamPredictor``: :meth:`RegionSpotPredictor.set_image` runs
the expensive frozen encoders (SAM's image encoder, CLIP's semantic feature map) once;
:meth:`RegionSpotPredictor.predict` then costs one SAM mask-decoder pass and one head pass
per call, for any number of boxes and any vocabulary. Boxes come from the caller, or from a
proposal source the model computes itself ("sam_auto": recognise everything; "rpn").

The predictor walks the model's own recognition path (``encode_images`` -> proposals ->
``recognize`` -> ``postprocess`` with the "per_box" selection); it keeps its own vocabulary
and text embeddings, so several predictors can share one model without disturbing each other
or the model's evaluation vocabulary.
"""

import logging
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from .checkpoint import RegionSpotCheckpointer
from .data.validation import InputError, check_boxes
from .data.vocabularies import check_vocabulary
from .filter_report import FilterReport

logger = logging.getLogger(__name__)

PREDICTOR_SOURCES = ("sam_auto", "rpn")
# Vocabularies whose text embeddings a predictor keeps in memory.
TEXT_EMBEDDINGS_KEPT = 8


@dataclass
class RegionPredictions:
    """Predictions for N boxes of one image (all tensors on the CPU), in box order.

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

    def select(self, keep: torch.Tensor) -> "RegionPredictions":
        """The predictions of the boxes where ``keep`` ((N,) bool or int64 indices) says so."""
        keep = torch.as_tensor(keep)
        return RegionPredictions(
            boxes=self.boxes[keep], classes=self.classes[keep],
            labels=[self.labels[i] for i in torch.arange(len(self.labels))[keep].tolist()],
            scores=self.scores[keep], probabilities=self.probabilities[keep],
            proposal_scores=self.proposal_scores[keep], masks=self.masks[keep], vocabulary=self.vocabulary,
            filters=self.filters.copy())

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

    def to_json(self) -> List[dict]:
        """One dict per box: box (XYXY pixels), label, class index, score, proposal score."""
        return [
            {"box_xyxy": [round(v, 2) for v in box], "label": label, "class_id": int(c), "score": float(s),
             "proposal_score": float(p)}
            for box, label, c, s, p in zip(self.boxes.tolist(), self.labels, self.classes, self.scores,
                                           self.proposal_scores)
        ]


@contextmanager
def _eval_mode(model):
    """Run the model in eval mode (the head's dropout off) and give it back in the mode it had."""
    training = model.training
    model.train(False)
    try:
        yield
    finally:
        model.train(training)


class RegionSpotPredictor:
    """Recognise regions of one image at a time.

    Args:
        model: a :class:`regionspot.modeling.meta_arch.RegionSpot`. The predictor never changes
            it: predictions run in eval mode (no dropout) and the model's own mode is restored
            afterwards, so a model being trained can be looked at between steps.
        min_size, max_size: test-time resize of the image before both encoders, as the test
            mapper does (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``: short side 800, long
            side at most 1333 for the paper's configs).
        vocabulary: the default class names of :meth:`predict` (optional; see
            :meth:`set_vocabulary`).

    Example::

        predictor = RegionSpotPredictor.from_config(cfg, vocabulary=["cat", "dog"])
        predictor.set_image(image_rgb)               # (H, W, 3) uint8
        out = predictor.predict(boxes)               # given boxes
        out = predictor.predict(proposals="sam_auto", vocabulary=["cat", "sofa", "lamp"])
        out.labels, out.scores, out.masks
    """

    def __init__(self, model, min_size: int = 800, max_size: int = 1333,
                 vocabulary: Optional[Sequence[str]] = None):
        self.model = model
        # The head's weights file ("" for an untrained head), recorded in outputs; set by from_config.
        self.weights: Optional[str] = None
        self.resize = T.ResizeShortestEdge(min_size, max_size)
        self.protocol = model.protocol.replace(selection="per_box")
        self._text_embeddings: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.vocabulary: Optional[List[str]] = None
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        self.reset_image()

    @classmethod
    def from_config(cls, cfg, vocabulary: Optional[Sequence[str]] = None, *,
                    allow_untrained_head: bool = False) -> "RegionSpotPredictor":
        """Build the model of ``cfg`` and load its head from ``MODEL.WEIGHTS``.

        Args:
            cfg: a RegionSpot config (e.g. ``regionspot.config.load_config(file, opts)``).
            vocabulary: the default class names of :meth:`predict`.
            allow_untrained_head: with an empty ``MODEL.WEIGHTS``, recognise with a randomly
                initialised head on purpose (its labels are chance); refused otherwise.

        Raises:
            ValueError: ``MODEL.WEIGHTS`` is empty and ``allow_untrained_head`` is False.
            CheckpointError: the file is missing or is not a head of this variant.
        """
        if not cfg.MODEL.WEIGHTS and not allow_untrained_head:
            raise ValueError("MODEL.WEIGHTS is empty: set it to a RegionSpot checkpoint (a released one or one "
                             "written by train_net.py); to recognise with a randomly initialised head on purpose, "
                             "pass allow_untrained_head=True (the demo's --untrained-head)")
        model = build_model(cfg).eval()  # its own model: in eval mode, as Detectron2's DefaultPredictor does
        if cfg.MODEL.WEIGHTS:
            RegionSpotCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        predictor = cls(model, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, vocabulary=vocabulary)
        predictor.weights = cfg.MODEL.WEIGHTS
        return predictor

    # ----------------------------------------------------------------- vocabulary
    def set_vocabulary(self, class_names: Sequence[str], text_embeddings: Optional[torch.Tensor] = None) -> None:
        """This predictor's default vocabulary (the model is not changed).

        Args:
            class_names: C class names.
            text_embeddings: optional precomputed (C, E) embeddings; by default computed now
                (or read from the disk cache) with the model's CLIP.

        Raises:
            ValueError: an invalid vocabulary (empty, blank or duplicate names) or embeddings
                of the wrong shape.
        """
        names = check_vocabulary(class_names)
        if text_embeddings is not None:
            self._remember(names, self.model.check_text_embeddings(text_embeddings, len(names)))
        else:
            self.text_embeddings_for(names)
        self.vocabulary = names

    def text_embeddings_for(self, class_names: Sequence[str]) -> torch.Tensor:
        """(C, E) text embeddings of a vocabulary, computed once and kept (the last
        :data:`TEXT_EMBEDDINGS_KEPT` vocabularies)."""
        names = check_vocabulary(class_names)
        key = tuple(names)
        if key in self._text_embeddings:
            self._text_embeddings.move_to_end(key)
            return self._text_embeddings[key]
        return self._remember(names, self.model.encode_vocabulary(names))

    def _remember(self, names: List[str], embeddings: torch.Tensor) -> torch.Tensor:
        self._text_embeddings[tuple(names)] = embeddings
        while len(self._text_embeddings) > TEXT_EMBEDDINGS_KEPT:
            self._text_embeddings.popitem(last=False)
        return embeddings

    # ----------------------------------------------------------------- image
    def reset_image(self) -> None:
        """Forget the current image."""
        self._image_size = None
        self._transform = None
        self._features = None

    @property
    def is_image_set(self) -> bool:
        return self._features is not None

    @torch.no_grad()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute the image's SAM embedding and CLIP semantic feature map once.

        Args:
            image: (H, W, 3) uint8 array.
            image_format: "RGB" or "BGR" (OpenCV's order).

        Raises:
            InputError: not an (H, W, 3) uint8 array, or an unknown ``image_format``.
        """
        if image_format not in ("RGB", "BGR"):
            raise InputError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"image must be an (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
        if image_format == "BGR":
            image = image[..., ::-1]
        self.reset_image()
        transform = self.resize.get_transform(image)  # the test mapper's resize
        resized = transform.apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        self._features = self.model.encode_images([tensor])  # the frozen encoders: always in eval mode
        self._image_size = image.shape[:2]
        self._transform = transform

    # ----------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, boxes=None, vocabulary: Optional[Sequence[str]] = None, *,
                proposals: Optional[str] = None) -> RegionPredictions:
        """Label, score and mask each region of the current image.

        Args:
            boxes: (N, 4) array-like, XYXY_ABS pixels of the image given to :meth:`set_image`;
                or None with ``proposals``.
            vocabulary: class names to choose from for this call (None: the predictor's
                vocabulary). Text embeddings are computed once per vocabulary and kept.
            proposals: instead of ``boxes``, regions the model finds itself: "sam_auto" (SAM's
                automatic masks, "recognise everything") or "rpn" (needs a model built with
                ``MODEL.REGIONSPOT.RPN_WEIGHTS``); regions are sorted by decreasing proposal
                score and selected with the ``PROPOSAL_*`` settings.

        Returns:
            :class:`RegionPredictions` (N may be 0), one row per box in box order; its
            ``filters`` say what each selection step removed. When a step removes every
            region (e.g. no SAM mask passes ``SAM_AUTO.PRED_IOU_THRESH``), one warning is
            logged naming the step, the counts and the config key.

        Raises:
            RuntimeError: :meth:`set_image` was not called.
            InputError: boxes with NaN, zero area or outside the image; both or neither of
                ``boxes`` and ``proposals``; an unknown source; no vocabulary.
            ValueError: an invalid vocabulary, or "rpn" on a model without an RPN.
        """
        if not self.is_image_set:
            raise RuntimeError("call set_image(image) before predict(boxes)")
        if (boxes is None) == (proposals is None):
            raise InputError('give either boxes (N, 4) or proposals="sam_auto"/"rpn", not both or neither')
        names = self.vocabulary if vocabulary is None else check_vocabulary(vocabulary)
        if names is None:
            raise InputError("no vocabulary: pass vocabulary=[...] or call set_vocabulary() first")
        text_embeddings = self.text_embeddings_for(names)
        features = self._features
        h, w = self._image_size
        report = FilterReport()
        if proposals is None:
            checked = check_boxes(boxes, (h, w), "boxes")
            instances = Instances(features[0].image_size)
            # The test mapper's transform of annotation boxes: in float64, then clipped.
            resized = self._transform.apply_box(checked.double().numpy().reshape(-1, 4))
            instances.proposal_boxes = Boxes(torch.as_tensor(resized, dtype=torch.float32))
            instances.proposal_boxes.clip(features[0].image_size)
            instances.objectness_logits = torch.full((len(checked),), float("inf"))
            regions = [instances.to(self.model.device)]
        elif proposals in PREDICTOR_SOURCES:
            regions = self.model.generate_proposals(proposals, features, reports=[report])
        else:
            raise InputError(f"proposals must be one of {PREDICTOR_SOURCES}, got {proposals!r}")
        with _eval_mode(self.model):
            result = self.model.inference(features, regions, text_embeddings, [(h, w)], self.protocol, mask_on=True,
                                          reports=[report])[0]
        result = result.to("cpu")
        message = report.warning(f"predict(proposals={proposals!r}) on a {w}x{h} (WxH) image")
        if message:
            logger.warning(message)
        return RegionPredictions(
            boxes=result.pred_boxes.tensor, classes=result.pred_classes,
            labels=[names[i] for i in result.pred_classes.tolist()], scores=result.scores,
            probabilities=result.class_probs, proposal_scores=result.proposal_scores,
            masks=result.pred_masks.tensor(), vocabulary=list(names), filters=report,
        )
