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
import math
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from .checkpoint import RegionSpotCheckpointer
from .data.validation import InputError, check_boxes
from .data.vocabularies import check_vocabulary
from .filter_report import FilterReport
from .input_checks import check_image_array
from .predictions import RegionPredictions
from .predictor_inputs import (  # noqa: F401 (PREDICTOR_SOURCES and the checks: re-exported, demo/demo.py)
    PREDICTOR_SOURCES,
    REGION_TOKENS,
    check_point_labels,
    check_points,
)

logger = logging.getLogger(__name__)

# Vocabularies whose text embeddings a predictor keeps in memory.
TEXT_EMBEDDINGS_KEPT = 8


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
        self._proposals: Dict[str, tuple] = {}  # source -> (proposals, their filter report), for this image

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
        image = check_image_array(image, image_format)
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
                proposals: Optional[str] = None, points=None, point_labels=None, mask=None,
                region_token: str = "mask_box", return_attention: bool = False) -> RegionPredictions:
        """Label, score and mask each region of the current image.

        Give the regions one way: ``boxes``; ``proposals``; or clicks (``points`` with
        ``point_labels``) and/or a ``mask``, which SAM turns into one region's mask.

        Args:
            boxes: (N, 4) array-like, XYXY_ABS pixels of the image given to :meth:`set_image`;
                or None with ``proposals`` or ``points``/``mask``.
            vocabulary: class names to choose from for this call (None: the predictor's
                vocabulary). Text embeddings are computed once per vocabulary and kept.
            proposals: instead of ``boxes``, regions the model finds itself: "sam_auto" (SAM's
                automatic masks, "recognise everything") or "rpn" (needs a model built with
                ``MODEL.REGIONSPOT.RPN_WEIGHTS``); regions are sorted by decreasing proposal
                score and selected with the ``PROPOSAL_*`` settings; computed once per image
                (another vocabulary or ``return_attention`` reuses them).
            points: (K, 2) array-like XY pixels of the image: clicks on one object
                (``SamPredictor.predict``'s ``point_coords``).
            point_labels: (K,) 1 for a positive click, 0 for a negative one (default: all 1).
            mask: (H', W') bool mask of the object covering the whole image (any resolution),
                SAM's mask prompt; with or without points.
            region_token: for points / a mask, which token the head reads: "mask_box" (default:
                SAM's mask -> its box -> the box prompt's token, the kind the head was trained
                on) or "prompt" (the clicks' own token; the head never saw such tokens in
                training). The result carries SAM's mask of the clicks either way.
            return_attention: also return each region's cross-attention maps
                (:attr:`RegionPredictions.attention`); nothing is recorded otherwise.

        Returns:
            :class:`RegionPredictions` (N may be 0), one row per box in box order (one row for
            points / a mask); its ``filters`` say what each selection step removed. When a
            step removes every region (e.g. no SAM mask passes ``SAM_AUTO.PRED_IOU_THRESH``, or
            SAM's mask of the clicks is empty), one warning is logged naming the step, the
            counts and the setting.

        Raises:
            RuntimeError: :meth:`set_image` was not called.
            InputError: boxes with NaN, zero area or outside the image; points outside the
                image or bad labels; not exactly one of ``boxes``, ``proposals`` and
                ``points``/``mask``; an unknown source; no vocabulary.
            ValueError: an invalid vocabulary, or "rpn" on a model without an RPN.
            NotImplementedError: points or a mask with a localizer that has no ``prompt_points``.
        """
        if not self.is_image_set:
            raise RuntimeError("call set_image(image) before predict(boxes)")
        clicked = points is not None or mask is not None
        if sum([boxes is not None, proposals is not None, clicked]) != 1:
            raise InputError('give either boxes (N, 4), proposals="sam_auto"/"rpn", or points (K, 2) '
                             "with point_labels and/or a mask (exactly one of them)")
        if region_token not in REGION_TOKENS:
            raise InputError(f"region_token must be one of {REGION_TOKENS}, got {region_token!r}")
        names = self.vocabulary if vocabulary is None else check_vocabulary(vocabulary)
        if names is None:
            raise InputError("no vocabulary: pass vocabulary=[...] or call set_vocabulary() first")
        text_embeddings = self.text_embeddings_for(names)
        features = self._features
        h, w = self._image_size
        report = FilterReport()
        prompts, prompt_iou = None, None
        if boxes is not None:
            regions = [self._box_regions(check_boxes(boxes, (h, w), "boxes"))]
        elif proposals is not None:
            if proposals not in PREDICTOR_SOURCES:
                raise InputError(f"proposals must be one of {PREDICTOR_SOURCES}, got {proposals!r}")
            if proposals not in self._proposals:  # computed once per image: a new vocabulary reuses them
                found = FilterReport()
                self._proposals[proposals] = (self.model.generate_proposals(proposals, features, reports=[found]),
                                              found)
            regions, found = self._proposals[proposals]
            report = found.copy()
        else:
            regions, prompts, prompt_iou = self._clicked_region(points, point_labels, mask, report)
            if region_token == "mask_box":
                prompts = None
        with _eval_mode(self.model):
            recognition = self.model.recognize(features, regions, text_embeddings, prompts,
                                               with_masks=self.model.needs_sam_masks(self.protocol, True)
                                               and not regions[0].has("proposal_masks"),
                                               return_attention=return_attention)[0]
            result = self.model.postprocess(recognition, (h, w), self.protocol, mask_on=True, report=report)
        result = result.to("cpu")
        where = ("predict(points)" if clicked else
                 f"predict(proposals={proposals!r})" if proposals else "predict(boxes)")
        message = report.warning(f"{where} on a {w}x{h} (WxH) image")
        if message:
            logger.warning(message)
        attention = None
        if return_attention:
            attention = self.attention_grid(recognition.attention).cpu() if len(result) else torch.zeros(0)
        return RegionPredictions(
            boxes=result.pred_boxes.tensor, classes=result.pred_classes,
            labels=[names[i] for i in result.pred_classes.tolist()], scores=result.scores,
            probabilities=result.class_probs, proposal_scores=result.proposal_scores,
            masks=result.pred_masks.tensor(), vocabulary=list(names), filters=report,
            embeddings=recognition.embeddings.cpu(), attention=attention,
            prompt_iou=None if prompt_iou is None else prompt_iou[:len(result)].cpu(),
        )

    def _box_regions(self, checked: torch.Tensor) -> Instances:
        """Given boxes (XYXY pixels of the image) as proposals in the encoded image's frame."""
        features = self._features
        instances = Instances(features[0].image_size)
        # The test mapper's transform of annotation boxes: in float64, then clipped.
        resized = self._transform.apply_box(checked.double().numpy().reshape(-1, 4))
        instances.proposal_boxes = Boxes(torch.as_tensor(resized, dtype=torch.float32))
        instances.proposal_boxes.clip(features[0].image_size)
        instances.objectness_logits = torch.full((len(checked),), float("inf"))
        return instances.to(self.model.device)

    def _clicked_region(self, points, point_labels, mask, report: FilterReport):
        """SAM's mask of the clicks / mask prompt as one proposal (its box, and the mask in
        the image's pixels as ``proposal_masks``); ([Instances], [BoxPrompts], (1,) IoU)."""
        localizer = self.model.localizer
        if not hasattr(localizer, "prompt_points"):
            raise NotImplementedError(f"the localizer {type(localizer).__name__} has no prompt_points(): point and "
                                      f"mask prompts need it (MODEL.REGIONSPOT.LOCALIZER); use boxes instead")
        h, w = self._image_size
        coords = labels = None
        if points is not None:
            coords = check_points(points, (h, w))
            labels = check_point_labels(point_labels, len(coords))
            coords = torch.as_tensor(self._transform.apply_coords(coords.double().numpy().copy()), dtype=torch.float32)
        if mask is not None:
            mask = torch.as_tensor(np.asarray(mask))
            if mask.dim() != 2 or mask.numel() == 0:
                raise InputError(f"mask must be an (H, W) bool array covering the image, got shape {tuple(mask.shape)}")
            mask = mask.bool()
        feature = self._features[0]
        prompt = localizer.prompt_points(feature.sam_embedding, feature.sam_input_size, feature.image_size,
                                         coords, labels, mask)
        full = localizer.paste_masks(prompt.low_res_masks, feature.sam_input_size, (h, w))  # (1, H, W) bool
        instances = Instances(feature.image_size)
        ys, xs = torch.nonzero(full[0], as_tuple=True)
        report.add("point prompt: SAM's mask of the clicks", "points", int(0 if coords is None else len(coords)),
                   "regions", 1, int(len(xs) > 0), "move or add positive clicks (the mask is empty)")
        if len(xs) == 0:
            instances.proposal_boxes = Boxes(torch.zeros(0, 4))
            instances.objectness_logits = torch.zeros(0)
            instances.proposal_masks = full[:0].cpu()
            empty = prompt._replace(tokens=prompt.tokens[:0], low_res_masks=prompt.low_res_masks[:0],
                                    iou_predictions=prompt.iou_predictions[:0])
            return [instances.to(self.model.device)], [empty], prompt.iou_predictions[:0]
        box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).double()[None]
        resized = self._transform.apply_box(box.cpu().numpy())
        instances.proposal_boxes = Boxes(torch.as_tensor(resized, dtype=torch.float32))
        instances.proposal_boxes.clip(feature.image_size)
        instances.objectness_logits = torch.full((1,), float("inf"))
        instances.proposal_masks = full  # already in the output frame: post-processing keeps it as it is
        return [instances.to(self.model.device)], [prompt], prompt.iou_predictions

    def attention_grid(self, attention: torch.Tensor) -> torch.Tensor:
        """(N, layers, L) cross-attention weights -> (N, layers, g, g) over the patch grid.

        The class token (row 0 of L when the semantic encoder keeps it) is dropped, as the
        paper's Fig. 4 does; the rest is CLIP's g x g patch grid in raster order.

        Raises:
            ValueError: the patch tokens do not form a square grid.
        """
        has_class_token = int(getattr(self.model.semantic_encoder, "use_class_token", True))
        patches = attention[..., has_class_token:]
        grid = math.isqrt(patches.shape[-1])
        if grid * grid != patches.shape[-1]:
            raise ValueError(f"{patches.shape[-1]} feature-map tokens (class token excluded) are not a square grid")
        return patches.reshape(*attention.shape[:-1], grid, grid).float()

    @torch.no_grad()
    def embed(self, boxes) -> torch.Tensor:
        """Region embeddings of boxes of the current image: the head's output in the
        vision-language model's joint space, where text embeddings live.

        ``logit_scale * embed(boxes) @ text_embeddings.T`` are the logits :meth:`predict`
        scores with (:func:`score_embeddings`), so stored embeddings can be scored against any
        vocabulary later (``regionspot-export-region-embeddings``).

        Args:
            boxes: (N, 4) array-like, XYXY_ABS pixels of the image given to :meth:`set_image`.

        Returns:
            (N, E) float32 on the CPU, rows of unit L2 norm.

        Raises:
            RuntimeError: :meth:`set_image` was not called.
            InputError: bad boxes (as :meth:`predict`).
        """
        if not self.is_image_set:
            raise RuntimeError("call set_image(image) before embed(boxes)")
        h, w = self._image_size
        regions = [self._box_regions(check_boxes(boxes, (h, w), "boxes"))]
        with _eval_mode(self.model):
            prompts = self.model.prompt_boxes(self._features, regions, with_masks=False)
            return self.model.region_embeddings(self._features, prompts)[0].cpu()

    def score_embeddings(self, embeddings: torch.Tensor, vocabulary: Sequence[str]) -> torch.Tensor:
        """Class probabilities of stored region embeddings against a vocabulary, as
        :meth:`predict` computes them (:func:`score_embeddings` with this model's scale and
        ``TEST_SCORE``). Returns (N, C) float32."""
        text = self.text_embeddings_for(vocabulary)
        return score_embeddings(embeddings.to(text.device), text, self.model.logit_scale,
                                self.protocol.class_score).cpu()



def score_embeddings(embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: float = 100.0,
                     class_score: str = "softmax") -> torch.Tensor:
    """(N, E) region embeddings and (C, E) text embeddings -> (N, C) float32 class probabilities.

    The model's own functions: :func:`~regionspot.modeling.head.region_logits` (scale x cosine)
    then :func:`~regionspot.modeling.postprocess.class_probabilities` (``TEST_SCORE``).
    """
    from .modeling.head import region_logits
    from .modeling.postprocess import class_probabilities

    # stored embeddings are unit rows (the model's F.normalize): scored as the live path scores them
    unit = embeddings.numel() == 0 or bool(((embeddings.float().norm(dim=-1) - 1).abs() < 1e-5).all())
    return class_probabilities(region_logits(embeddings, text_embeddings, logit_scale, normalized=unit), class_score)

