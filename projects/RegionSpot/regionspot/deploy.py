"""``OnnxRegionSpotPredictor``: RegionSpot on ONNX Runtime, without PyTorch or Detectron2.

It runs the folder that ``regionspot-export onnx`` writes (:mod:`regionspot.onnx_export`) with
the interface of :class:`regionspot.predictor.RegionSpotPredictor`: :meth:`set_image` runs the
two image encoders once, :meth:`predict` labels any boxes against any vocabulary,
:meth:`embed` gives region embeddings. Pre- and post-processing are the PyTorch path's, in
numpy, Pillow and OpenCV:

- the test-time resize (Detectron2's ``ResizeShortestEdge``: PIL bilinear on uint8) and the
  boxes' frame change (float64, clipped to the resized image);
- the localizer's host resize (SAM's ``ResizeLongestSide``: PIL bilinear), its normalisation,
  padding and box frame being inside the exported graphs;
- masks pasted as the family pastes them (bilinear, thresholded), class probabilities
  (softmax or sigmoid) and the "per_box" selection of the predictor.

Text: a vocabulary that is not the exported one is encoded with the exported text tower and the
exported BPE tokenizer (``tokenizers``, with CLIP's cleaning: ftfy, HTML unescape, whitespace,
lower case), with the same prompt ensemble (mean of the templates' features, L2-normalised).

This module imports neither torch nor detectron2 (``tests/test_onnx_export.py`` runs it in a
process where importing them fails).
"""

import copy
import html
import json
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np

from .data.vocabularies import check_vocabulary, clean_class_name, names_for_text
from .filter_report import FilterReport
from .input_checks import InputError, check_image_array
from .input_checks import check_box_array as check_boxes
from .predictions import RegionPredictions

BOX_CHUNK = 64  # boxes per prompt-decoder call (each holds a copy of the image embedding)
TEXT_BATCH = 256  # prompts per text-tower call
TEXT_EMBEDDINGS_KEPT = 8


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("regionspot.deploy needs ONNX Runtime: pip install -e .[onnxruntime] "
                          "(or pip install onnxruntime)") from None
    return onnxruntime


def shortest_edge_size(h: int, w: int, short: int, max_size: int):
    """Detectron2's ``ResizeShortestEdge.get_output_shape``: (new_h, new_w)."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short * 1.0, scale * w) if h < w else (scale * h, short * 1.0)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def longest_side_size(h: int, w: int, side: int):
    """SAM's ``ResizeLongestSide.get_preprocess_shape``: (new_h, new_w)."""
    scale = side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_uint8(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with PIL's bilinear resize (Detectron2's and SAM's)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


class ClipTokenizer:
    """CLIP's BPE tokenizer without torch: ``SimpleTokenizer``'s cleaning (ftfy, HTML unescape
    twice, whitespace collapsed, lower case) and the exported ``tokenizer.json`` (``tokenizers``),
    with the start and end tokens and ``clip.tokenize(..., truncate=True)``'s padding and cut.

    Args:
        path: the ``tokenizer.json`` of an export folder.
        sot, eot: the start and end token ids; context_length: the padded length.
    """

    def __init__(self, path: str, sot: int, eot: int, context_length: int = 77):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(path)
        self.sot, self.eot, self.context_length = int(sot), int(eot), int(context_length)

    @staticmethod
    def clean(text: str) -> str:
        """CLIP's ``whitespace_clean(basic_clean(text)).lower()``."""
        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:  # ftfy only repairs mojibake; class names rarely need it
            pass
        text = html.unescape(html.unescape(text)).strip()
        return re.sub(r"\s+", " ", text).strip().lower()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """B texts -> (B, context_length) int64 token ids (zero-padded, cut with the end token last)."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        encoded = self.tokenizer.encode_batch([self.clean(t) for t in texts], add_special_tokens=False)
        for i, enc in enumerate(encoded):
            ids = [self.sot, *enc.ids, self.eot][:self.context_length]
            ids[-1] = self.eot
            out[i, :len(ids)] = ids
        return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class OnnxRegionSpotPredictor:
    """Recognise regions of one image at a time on ONNX Runtime (no torch, no detectron2).

    Args:
        folder: a folder written by ``regionspot-export onnx``.
        providers: ONNX Runtime execution providers, best first (default: CPU only), e.g.
            ``["CUDAExecutionProvider", "CPUExecutionProvider"]``; refused when the installed
            onnxruntime build lacks one.
        vocabulary: the default class names (default: the exported vocabulary, if any).
        session_options: an ``onnxruntime.SessionOptions`` for every session (threads, graph
            optimisation level).

    Raises:
        ValueError: not an export folder, or a provider this onnxruntime build does not have.

    Example::

        predictor = OnnxRegionSpotPredictor("regionspot_onnx/")
        predictor.set_image(image_rgb)
        out = predictor.predict(boxes, vocabulary=["cat", "dog"])   # out.labels, out.scores, out.masks
    """

    def __init__(self, folder: str, providers: Optional[Sequence[str]] = None,
                 vocabulary: Optional[Sequence[str]] = None, session_options=None):
        ort = _import_onnxruntime()
        manifest_path = os.path.join(folder, "manifest.json")
        if not os.path.isfile(manifest_path):
            raise ValueError(f"{folder!r} is not a RegionSpot ONNX export: no manifest.json (write one with "
                             f"regionspot-export onnx)")
        with open(manifest_path, encoding="utf-8") as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != "regionspot-onnx":
            raise ValueError(f"{manifest_path}: not a RegionSpot ONNX manifest "
                             f"(format {self.manifest.get('format')!r})")
        available = ort.get_available_providers()
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise ValueError(f"providers {missing} are not in this onnxruntime build (it has {available})")
        self.folder = folder
        self.sessions = {key: ort.InferenceSession(os.path.join(folder, name), sess_options=session_options,
                                                   providers=self.providers)
                         for key, name in self.manifest["files"].items()}
        text = self.manifest["text"]
        self.tokenizer = ClipTokenizer(os.path.join(folder, text["tokenizer"]), text["sot"], text["eot"],
                                       text["context_length"])
        self._text_embeddings: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
        self.vocabulary: Optional[List[str]] = None
        if text.get("embeddings"):
            with open(os.path.join(folder, text["vocabulary"]), encoding="utf-8") as f:
                exported = json.load(f)
            self._remember(exported, np.load(os.path.join(folder, text["embeddings"])).astype(np.float32))
            self.vocabulary = list(exported)
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        self.reset_image()

    def fork(self) -> "OnnxRegionSpotPredictor":
        """Another predictor on the same ONNX Runtime sessions (nothing loaded again), with its own
        image and its own copy of the kept text embeddings (e.g. one per web-app session)."""
        other = copy.copy(self)
        other._text_embeddings = OrderedDict(self._text_embeddings)
        other.reset_image()
        return other

    # ----------------------------------------------------------------- vocabulary
    def set_vocabulary(self, class_names: Sequence[str], text_embeddings: Optional[np.ndarray] = None) -> None:
        """The default vocabulary of :meth:`predict`; embeddings computed now unless given ((C, E)).

        Raises:
            ValueError: an invalid vocabulary, or embeddings of the wrong shape.
        """
        names = check_vocabulary(class_names)
        if text_embeddings is not None:
            e = np.asarray(text_embeddings, dtype=np.float32)
            dim = self.manifest["semantic_encoder"]["embed_dim"]
            if e.shape != (len(names), dim):
                raise ValueError(f"text_embeddings must be ({len(names)}, {dim}), got {e.shape}")
            self._remember(names, e)
        else:
            self.text_embeddings_for(names)
        self.vocabulary = names

    def _remember(self, names: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
        self._text_embeddings[tuple(names)] = embeddings
        while len(self._text_embeddings) > TEXT_EMBEDDINGS_KEPT:
            self._text_embeddings.popitem(last=False)
        return embeddings

    def text_embeddings_for(self, class_names: Sequence[str]) -> np.ndarray:
        """(C, E) float32 unit text embeddings of a vocabulary: the exported ones, else the
        prompt ensemble through the exported text tower (kept for the last few vocabularies)."""
        names = check_vocabulary(class_names)
        key = tuple(names)
        if key in self._text_embeddings:
            self._text_embeddings.move_to_end(key)
            return self._text_embeddings[key]
        return self._remember(names, self.encode_texts(names))

    def encode_texts(self, class_names: Sequence[str]) -> np.ndarray:
        """The prompt ensemble of ``TextClassifier.embed``: every template filled with each cleaned
        name, the text tower's features averaged per class, L2-normalised. Returns (C, E) float32."""
        text = self.manifest["text"]
        templates = text["templates"]
        cleaned = [clean_class_name(n) for n in names_for_text(class_names, text["class_name_style"])]
        prompts = [t.format(c) for c in cleaned for t in templates]
        session = self.sessions["text_encoder"]
        features = np.concatenate([
            session.run(None, {"text_tokens": self.tokenizer(prompts[s:s + TEXT_BATCH])})[0]
            for s in range(0, len(prompts), TEXT_BATCH)]).astype(np.float32)
        mean = features.reshape(len(cleaned), len(templates), -1).sum(axis=1) / len(templates)
        return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)

    # ----------------------------------------------------------------- image
    def reset_image(self) -> None:
        """Forget the current image."""
        self._image_size = None
        self._resized_size = None
        self._input_size = None
        self._embeddings: Optional[Dict[str, np.ndarray]] = None
        self._semantic = None

    @property
    def is_image_set(self) -> bool:
        return self._semantic is not None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Run the localizer's image encoder and the semantic encoder once.

        Args:
            image: (H, W, 3) uint8 array; image_format: "RGB" or "BGR".

        Raises:
            InputError: not an (H, W, 3) uint8 array, or an unknown ``image_format``.
        """
        image = check_image_array(image, image_format)
        self.reset_image()
        h, w = image.shape[:2]
        resize = self.manifest["image_resize"]
        rh, rw = shortest_edge_size(h, w, resize["min_size"], resize["max_size"])
        resized = resize_uint8(image, rh, rw)
        localizer = self.manifest["localizer"]
        if localizer["host_resize"] == "longest_side":
            ih, iw = longest_side_size(rh, rw, localizer["input_size"])
            sam_image = resize_uint8(resized, ih, iw)
        else:
            ih, iw = rh, rw
            sam_image = resized

        def pixels(x):
            return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))
        outputs = self.sessions["localizer_image_encoder"].run(None, {"pixels": pixels(sam_image)})
        self._embeddings = dict(zip(localizer["embedding_names"], outputs))
        self._semantic = self.sessions["semantic_encoder"].run(None, {"image": pixels(resized)})[0]
        self._image_size, self._resized_size, self._input_size = (h, w), (rh, rw), (ih, iw)

    # ----------------------------------------------------------------- regions
    def _resized_boxes(self, boxes) -> np.ndarray:
        h, w = self._image_size
        rh, rw = self._resized_size
        checked = check_boxes(boxes, (h, w), "boxes").astype(np.float64)
        scaled = checked * np.array([rw / w, rh / h, rw / w, rh / h])  # Detectron2's ResizeTransform.apply_box
        out = scaled.astype(np.float32)
        out[:, 0::2] = out[:, 0::2].clip(0, rw)
        out[:, 1::2] = out[:, 1::2].clip(0, rh)
        return out

    def _prompt(self, boxes: np.ndarray):
        session = self.sessions["localizer_prompt"]
        size = np.array(self._resized_size, dtype=np.float32)
        pieces = []
        for s in range(0, len(boxes), BOX_CHUNK):
            feeds = dict(self._embeddings, boxes=np.ascontiguousarray(boxes[s:s + BOX_CHUNK]), image_size=size)
            pieces.append(session.run(None, feeds))
        return [np.concatenate(parts) for parts in zip(*pieces)]

    def _head(self, tokens: np.ndarray, text_embeddings: np.ndarray):
        return self.sessions["head"].run(None, {"tokens": tokens, "semantic_features": self._semantic,
                                                "text_embeddings": text_embeddings})

    def paste_masks(self, low_res_masks: np.ndarray) -> np.ndarray:
        """(K, 1, 4g, 4g) mask logits -> (K, H, W) bool masks of the image, as the family pastes
        them (manifest ``mask_paste``; bilinear resizes with OpenCV)."""
        import cv2

        localizer = self.manifest["localizer"]
        h, w = self._image_size
        side = localizer["input_size"]
        ih, iw = self._input_size
        out = np.zeros((len(low_res_masks), h, w), dtype=bool)
        for k, logits in enumerate(low_res_masks[:, 0].astype(np.float32)):
            if localizer["mask_paste"] == "crop_padding":
                logits = cv2.resize(logits, (side, side), interpolation=cv2.INTER_LINEAR)[:ih, :iw]
            out[k] = cv2.resize(np.ascontiguousarray(logits), (w, h), interpolation=cv2.INTER_LINEAR) \
                > localizer["mask_threshold"]
        return out

    def predict(self, boxes, vocabulary: Optional[Sequence[str]] = None) -> RegionPredictions:
        """Label, score and mask each box of the current image (the PyTorch predictor's
        ``predict(boxes, vocabulary)``).

        Args:
            boxes: (N, 4) XYXY_ABS pixels of the image given to :meth:`set_image`.
            vocabulary: class names for this call (None: the predictor's vocabulary).

        Returns:
            :class:`~regionspot.predictions.RegionPredictions` whose arrays are numpy arrays.

        Raises:
            RuntimeError: :meth:`set_image` was not called.
            InputError: bad boxes, or no vocabulary.
        """
        if not self.is_image_set:
            raise RuntimeError("call set_image(image) before predict(boxes)")
        names = self.vocabulary if vocabulary is None else check_vocabulary(vocabulary)
        if names is None:
            raise InputError("no vocabulary: pass vocabulary=[...] or call set_vocabulary() first")
        text_embeddings = self.text_embeddings_for(names)
        resized = self._resized_boxes(boxes)
        n, c = len(resized), len(names)
        h, w = self._image_size
        rh, rw = self._resized_size
        if n == 0:
            return RegionPredictions(
                boxes=np.zeros((0, 4), np.float32), classes=np.zeros(0, np.int64), labels=[],
                scores=np.zeros(0, np.float32), probabilities=np.zeros((0, c), np.float32),
                proposal_scores=np.zeros(0, np.float32), masks=np.zeros((0, h, w), bool), vocabulary=list(names),
                filters=FilterReport(), embeddings=np.zeros((0, text_embeddings.shape[1]), np.float32))
        tokens, low_res, _ = self._prompt(resized)
        logits, embeddings = self._head(tokens, text_embeddings)
        protocol = self.manifest["protocol"]
        probs = _softmax(logits) if protocol["class_score"] == "softmax" else 1.0 / (1.0 + np.exp(-logits))
        probs = probs.astype(np.float32)
        classes = probs.argmax(axis=1).astype(np.int64)  # given boxes: proposal score 1, weight 1
        out_boxes = resized * np.array([w / rw, h / rh, w / rw, h / rh], dtype=np.float32)
        out_boxes[:, 0::2] = out_boxes[:, 0::2].clip(0, w)
        out_boxes[:, 1::2] = out_boxes[:, 1::2].clip(0, h)
        return RegionPredictions(
            boxes=out_boxes, classes=classes, labels=[names[i] for i in classes.tolist()],
            scores=probs[np.arange(n), classes], probabilities=probs, proposal_scores=np.ones(n, np.float32),
            masks=self.paste_masks(low_res), vocabulary=list(names), filters=FilterReport(),
            embeddings=embeddings.astype(np.float32))

    def position_tokens(self, boxes) -> np.ndarray:
        """(N, T) float32 position-aware tokens of boxes of the current image."""
        if not self.is_image_set:
            raise RuntimeError("call set_image(image) before position_tokens(boxes)")
        return self._prompt(self._resized_boxes(boxes))[0]

    def embed(self, boxes) -> np.ndarray:
        """(N, E) float32 unit region embeddings of boxes of the current image (the PyTorch
        predictor's ``embed``).

        Raises:
            RuntimeError: :meth:`set_image` was not called; InputError: bad boxes.
        """
        if not self.is_image_set:
            raise RuntimeError("call set_image(image) before embed(boxes)")
        resized = self._resized_boxes(boxes)
        dim = self.manifest["semantic_encoder"]["embed_dim"]
        if len(resized) == 0:
            return np.zeros((0, dim), np.float32)
        tokens = self._prompt(resized)[0]
        return self._head(tokens, np.zeros((1, dim), np.float32))[1]
