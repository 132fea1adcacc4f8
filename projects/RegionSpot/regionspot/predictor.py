"""``RegionSpotPredictor``: set an image once, then recognise any boxes with any vocabulary.

Modelled on ``segment_anything.SamPredictor``: :meth:`RegionSpotPredictor.set_image` runs
the expensive frozen encoders (SAM's image encoder, CLIP's semantic feature map) once;
:meth:`RegionSpotPredictor.predict` then costs one SAM mask-decoder pass and one head pass
per call, for any number of boxes and any vocabulary.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from detectron2.data import transforms as T
from detectron2.modeling import build_model

from .checkpoint import RegionSpotCheckpointer
from .data.validation import InputError, check_boxes


@dataclass
class RegionPredictions:
    """Predictions for N boxes of one image (all tensors on the CPU).

    Attributes:
        boxes: (N, 4) float32, XYXY_ABS pixels of the image given to ``set_image``.
        classes: (N,) int64 index of the best class in ``vocabulary``.
        labels: N class names.
        scores: (N,) float32 score of the best class.
        probabilities: (N, C) float32 scores against the whole vocabulary.
        masks: (N, H, W) bool SAM masks in the image's pixels.
        vocabulary: the C class names scored against.
    """

    boxes: torch.Tensor
    classes: torch.Tensor
    labels: List[str]
    scores: torch.Tensor
    probabilities: torch.Tensor
    masks: torch.Tensor
    vocabulary: List[str]

    def to_json(self) -> List[dict]:
        """One dict per box: box (XYXY pixels), label, class index and score."""
        return [
            {"box_xyxy": [round(v, 2) for v in box], "label": label, "class_id": int(c), "score": float(s)}
            for box, label, c, s in zip(self.boxes.tolist(), self.labels, self.classes, self.scores)
        ]


class RegionSpotPredictor:
    """Recognise regions of one image at a time.

    Args:
        model: a :class:`regionspot.modeling.meta_arch.RegionSpot` (put in eval mode).
        min_size, max_size: test-time resize of the image before both encoders, as the test
            mapper does (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``: short side 800, long
            side at most 1333 for the paper's configs).

    Example::

        predictor = RegionSpotPredictor.from_config(cfg)
        predictor.set_image(image_rgb)               # (H, W, 3) uint8
        out = predictor.predict(boxes, ["cat", "dog"])
        out.labels, out.scores, out.masks
    """

    def __init__(self, model, min_size: int = 800, max_size: int = 1333):
        self.model = model.eval()
        self.resize = T.ResizeShortestEdge(min_size, max_size)
        self.reset_image()

    @classmethod
    def from_config(cls, cfg) -> "RegionSpotPredictor":
        """Build the model of ``cfg`` and load ``MODEL.WEIGHTS`` (the head) when set."""
        model = build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            RegionSpotCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        return cls(model, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)

    def reset_image(self) -> None:
        """Forget the current image."""
        self._image_size = None
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
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        sam_embeddings, sam_sizes, semantic = self.model.encode_images([tensor])
        self._image_size = image.shape[:2]
        self._resized_size = resized.shape[:2]
        self._features = (sam_embeddings[0], sam_sizes[0], semantic)

    @torch.no_grad()
    def predict(self, boxes, vocabulary: Optional[Sequence[str]] = None) -> RegionPredictions:
        """Label, score and mask each box of the current image.

        Args:
            boxes: (N, 4) array-like, XYXY_ABS pixels of the image given to :meth:`set_image`.
            vocabulary: class names to choose from; None keeps the model's current vocabulary.
                Text embeddings are cached per vocabulary.

        Returns:
            :class:`RegionPredictions` (N may be 0).

        Raises:
            RuntimeError: :meth:`set_image` was not called.
            InputError: boxes with NaN, zero area or outside the image; an empty vocabulary.
        """
        if not self.is_image_set:
            raise RuntimeError("call set_image(image) before predict(boxes)")
        if vocabulary is not None:
            vocabulary = list(vocabulary)
            if not vocabulary:
                raise InputError("vocabulary is empty: give at least one class name")
            self.model.set_vocabulary(vocabulary)
        (h, w), (rh, rw) = self._image_size, self._resized_size
        boxes = check_boxes(boxes, (h, w), "boxes")
        sam_embedding, sam_size, semantic = self._features
        device = self.model.device
        scaled = boxes.to(device) * torch.tensor([rw / w, rh / h, rw / w, rh / h], device=device)
        tokens, low_res = self.model.region_tokens(sam_embedding, scaled, (rh, rw))
        names = list(self.model.class_names)
        if tokens.shape[0] == 0:
            empty = torch.zeros(0)
            return RegionPredictions(boxes, empty.long(), [], empty, torch.zeros(0, len(names)),
                                     torch.zeros(0, h, w, dtype=torch.bool), names)
        embeddings = self.model.region_embeddings([tokens], semantic)[0]
        probabilities = self.model.class_scores(embeddings)
        scores, classes = probabilities.max(dim=1)
        masks = self.model.position.paste_masks(low_res, sam_size, (h, w))
        return RegionPredictions(
            boxes=boxes, classes=classes.cpu(), labels=[names[i] for i in classes.tolist()],
            scores=scores.cpu(), probabilities=probabilities.cpu(), masks=masks.cpu(), vocabulary=names,
        )
