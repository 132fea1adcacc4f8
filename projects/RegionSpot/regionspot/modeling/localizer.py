"""The localizer interface: what every promptable localization model gives RegionSpot.

RegionSpot's localizer (paper Sec. 3, "localization model") is a frozen promptable model turned
into a box -> (position-aware token, mask) encoder. :class:`Localizer` is the interface every
family implements (SAM: :mod:`.position_tokens`, SAM-HQ: :mod:`.sam_hq`, SAM 2:
:mod:`.sam2_localizer`), in the style of Detectron2's ``Backbone`` (a small abstract base) and
``segment_anything``'s ``SamPredictor`` (encode an image once, then prompt it many times):

- written once here: batching and precision of the image side (:meth:`Localizer.encode`),
  chunked prompting of the boxes of several images (:meth:`Localizer.prompt`), clicks and mask
  prompts (:meth:`Localizer.prompt_clicks`), the token-source rule
  (:meth:`Localizer.select_token`; validated and sized by ``weights_files``), the float32 token
  extraction of training and the SAM-token cache, autocast, device, dtype, :attr:`Localizer.pair_name`;
- abstract, what a family's model does its own way: preprocessing, image encoder, prompt frames
  and encoder, mask decoder, mask pasting, automatic mask generator, input size, decoder width.

A new family is one module with a :class:`Localizer` subclass and a builder registered with
``regionspot.modeling.backbones.register_localizer`` (``tests/test_localizer_interface.py``
adds a toy family that way and runs the predictor, training and ``sam_auto`` with it).
"""

import abc
import itertools
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..structures import LocalizerEmbedding, embedding_batch_size, embedding_dims, stack_embeddings
from ..weights_files import check_token_source, token_width
from .fast_attention import SAM_ATTENTION_KINDS
from .precision import check_encoder_precision, encoder_autocast, resolve_encoder_precision
from .profiling import stage

# Masks pasted per call of a family's post-processing: each costs two float32 frames (S x S and
# the output size) before thresholding, so pasting in chunks bounds that memory.
MASK_PASTE_CHUNK = 16
# The mask logit given to the model for a binary mask prompt (+ inside, - outside): SAM's own
# low-resolution logits of a confident mask are of this order.
MASK_PROMPT_LOGIT = 10.0


class BoxPrompts(NamedTuple):
    """What a localizer gives for N prompts of one image (:meth:`Localizer.prompt`).

    Attributes:
        tokens: (N, T) float32 position-aware tokens.
        low_res_masks: (N, 1, 4g, 4g) float32 mask logits of the single-mask output at 1/4 of
            the image embedding's stride, in the model's input frame (see
            :meth:`Localizer.paste_masks`); None when masks were not asked for.
        iou_predictions: (N,) float32, the model's predicted IoU of each mask (its IoU head;
            TAP's protocol fuses it into the score, the released protocol does not use it);
            None when masks were not asked for.
    """

    tokens: torch.Tensor
    low_res_masks: Optional[torch.Tensor]
    iou_predictions: Optional[torch.Tensor]


class OnnxLocalizer(NamedTuple):
    """A family's ONNX export (:meth:`Localizer.onnx_modules`): two modules the exporter traces,
    and how the runtime prepares their input and pastes their masks (``regionspot.deploy``).

    Attributes:
        image_encoder: ``(1, 3, h, w)`` float32 RGB pixels in [0, 255] (the image as
            ``host_resize`` leaves it) -> a tuple of the embedding tensors named ``embedding_names``.
        embedding_names: the names of the image encoder's outputs, the prompt module's first inputs.
        prompt: ``(*embeddings, boxes (N, 4) float32 XYXY pixels of an (H, W) image, image_size
            (2,) float32 [H, W])`` -> ``(tokens (N, T), low_res_masks (N, 1, 4g, 4g), iou (N,))``,
            all float32: the boxes' frame change, prompt encoder and single-mask decoder.
        host_resize: ``"longest_side"``: before the image encoder the image is resized with PIL
            (bilinear) so that its long side is the input side S (SAM's ``ResizeLongestSide``);
            ``"none"``: the encoder takes the image as it is.
        mask_paste: ``"crop_padding"``: a mask is upsampled to S x S (bilinear), cropped to the
            image's (h, w) inside the input, resized to the output size (SAM's
            ``postprocess_masks``); ``"whole_input"``: resized from the whole square to the output
            size (SAM 2's). Thresholded at ``mask_threshold``.
        mask_threshold: the mask-logit threshold.
    """

    image_encoder: nn.Module
    embedding_names: Tuple[str, ...]
    prompt: nn.Module
    host_resize: str
    mask_paste: str
    mask_threshold: float = 0.0


class ExportImageEncoder(nn.Module):
    """The image side of a family's ONNX export: (1, 3, h, w) float32 RGB pixels in [0, 255]
    -> ``preprocess`` (a function of the pixels that the family gives: normalise, pad or resize)
    -> :meth:`Localizer.encode_images` -> a tuple of its embeddings in ``names`` order (one
    tensor, or a dict's entries)."""

    def __init__(self, localizer: "Localizer", preprocess: Callable[[torch.Tensor], torch.Tensor],
                 names: Sequence[str]):
        super().__init__()
        self.localizer = localizer
        self.preprocess = preprocess
        self.names = tuple(names)

    def forward(self, pixels: torch.Tensor):
        out = self.localizer.encode_images(self.preprocess(pixels))
        return tuple(out[k] for k in self.names) if isinstance(out, dict) else (out,)


class ExportPrompt(nn.Module):
    """The prompt side of a family's ONNX export: ``(*embeddings, boxes (N, 4) float32 XYXY pixels,
    image_size (2,) float32 [H, W])`` -> ``(tokens, low_res_masks, iou_predictions)``:
    ``boxes_to_input`` (a tensor version of :meth:`Localizer.boxes_to_input` that the family
    gives), :meth:`Localizer.encode_boxes`, :meth:`Localizer.decode_prompts` with masks."""

    def __init__(self, localizer: "Localizer", boxes_to_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 names: Sequence[str], as_dict: bool):
        super().__init__()
        self.localizer = localizer
        self.boxes_to_input = boxes_to_input
        self.names = tuple(names)
        self.as_dict = as_dict

    def forward(self, *inputs: torch.Tensor):
        *embeddings, boxes, image_size = inputs
        embedding = dict(zip(self.names, embeddings)) if self.as_dict else embeddings[0]
        sparse, dense = self.localizer.encode_boxes(self.boxes_to_input(boxes, image_size))
        index = torch.zeros_like(boxes[:, 0], dtype=torch.int64)
        out = self.localizer.decode_prompts(embedding, sparse, dense, index, with_masks=True)
        return out.tokens, out.low_res_masks, out.iou_predictions


def image_embedding(embeddings: LocalizerEmbedding) -> torch.Tensor:
    """The image embedding of a localizer embedding: the tensor itself, or a dict's ``"image"``
    (the convention of every family whose decoder also reads other maps: SAM-HQ, SAM 2)."""
    return embeddings["image"] if isinstance(embeddings, dict) else embeddings


def paste_in_chunks(low_res_masks: torch.Tensor, output_size: Tuple[int, int],
                    paste: Callable[[torch.Tensor], torch.Tensor], chunk: int = MASK_PASTE_CHUNK) -> torch.Tensor:
    """``paste`` (a family's (k, 1, 4g, 4g) logits -> (k, H_out, W_out) bool) on ``chunk`` masks
    at a time, so that its float intermediates stay small.

    Returns:
        (K, H_out, W_out) bool on the masks' device.
    """
    out = torch.zeros(low_res_masks.shape[0], *output_size, dtype=torch.bool, device=low_res_masks.device)
    for start in range(0, low_res_masks.shape[0], chunk):
        part = low_res_masks[start:start + chunk]
        out[start:start + part.shape[0]] = paste(part)
    return out


class Localizer(nn.Module, abc.ABC):
    """A frozen promptable localization model as RegionSpot uses it: image -> embedding once,
    then boxes (or clicks, a mask) -> position-aware tokens, masks and predicted IoUs.

    Args:
        model: the frozen promptable model (set to eval mode, gradients off), kept as
            :attr:`sam` for every family (checkpoint keys ``localizer.sam.*``).
        token_source: one of :data:`~regionspot.weights_files.TOKEN_SOURCES` (paper Table 4b).
        box_chunk_size: prompts sent through the mask decoder at once; each holds a copy of its
            image's embedding, so this bounds memory (64 SAM boxes ~ 0.3 GB in float32).
        precision: ``ENCODER_PRECISION`` at inference ("auto": float16 on CUDA, float32 on the
            CPU).
        attention: ``SAM_ATTENTION``, "sdpa" or "official" (:meth:`set_attention`).
        identity: the model's architecture (e.g. SAM 2's config), recorded and shown in logs.

    Raises:
        ValueError: unknown ``token_source``, ``precision`` or ``attention``, or non-positive
            ``box_chunk_size`` (one line each, the same for every family).
    """

    #: The ``MODEL.REGIONSPOT.LOCALIZER`` name: a family class's own, and the name it was
    #: registered under when ``backbones.build_localizer`` built it.
    family: str = ""

    def __init__(self, model: nn.Module, token_source: str = "transformer", box_chunk_size: int = 64,
                 precision: str = "auto", attention: str = "sdpa", identity: Optional[Dict[str, object]] = None):
        super().__init__()
        self.token_source = check_token_source(token_source)
        if box_chunk_size <= 0:
            raise ValueError(f"box_chunk_size must be positive, got {box_chunk_size}")
        self.sam = model.eval().requires_grad_(False)
        self.box_chunk_size = box_chunk_size
        self.precision = check_encoder_precision(precision)
        self.identity = dict(identity or {})
        self.set_attention(attention)

    # ----------------------------------------------------------------- identity and switches
    @property
    def pair_name(self) -> str:
        """The localizer's name in a checkpoint's pair (``RegionSpot.pair``): a head trained on
        one localizer is refused by another. The family name; a family whose models differ in
        more than their widths (SAM 2's configs) adds the model. Without a family name, the class name."""
        return self.family or type(self).__name__

    @property
    def device(self) -> torch.device:
        """The device of the model's tensors."""
        for tensor in itertools.chain(self.sam.parameters(), self.sam.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in at inference (:attr:`precision` on this device)."""
        return resolve_encoder_precision(self.precision, self.device)

    def set_attention(self, kind: str) -> None:
        """The image encoder's attention kernel (``SAM_ATTENTION``): "sdpa" or "official", the
        same result up to rounding. The base records it; a family with a switch overrides.

        Raises:
            ValueError: another kind.
        """
        if kind not in SAM_ATTENTION_KINDS:
            raise ValueError(f"MODEL.REGIONSPOT.SAM_ATTENTION must be one of {SAM_ATTENTION_KINDS}, got {kind!r}")
        self.attention = kind

    def compile_encoder(self, **options) -> None:
        """``torch.compile`` the model's image encoder (``image_encoder``) in place (``COMPILE``);
        parameter names unchanged."""
        self.sam.image_encoder.compile(**options)

    @property
    def token_dim(self) -> int:
        """T, channels of one position-aware token (:func:`~regionspot.weights_files.token_width`
        of :attr:`decoder_width` and :attr:`token_source`)."""
        return token_width(self.decoder_width, self.token_source)

    # ----------------------------------------------------------------- what a family provides
    @property
    @abc.abstractmethod
    def input_size(self) -> int:
        """Side S of the model's square input, pixels."""

    @property
    @abc.abstractmethod
    def decoder_width(self) -> int:
        """Width of the mask decoder's two-way transformer (its mask tokens), 256 for SAM."""

    @abc.abstractmethod
    def preprocess(self, image: torch.Tensor, resized: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """One (3, H, W) uint8 RGB image (``resized``: the data mapper's resize of it, which a
        family may use) -> ((3, S, S) float32 pixels on :attr:`device`, (h, w) the size the
        image has inside them, the ``sam_input_size`` of :meth:`paste_masks`)."""

    @abc.abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> LocalizerEmbedding:
        """The image encoder on (B, 3, S, S) pixels: (B, C, g, g), or a dict of batched tensors
        with the image embedding under ``"image"``."""

    @abc.abstractmethod
    def boxes_to_input(self, boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(N, 4) float32 XYXY_ABS boxes of an (H, W) image -> the model's input frame, in the
        form :meth:`encode_boxes` takes (N, ...)."""

    @abc.abstractmethod
    def encode_boxes(self, boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The prompt encoder on n boxes of :meth:`boxes_to_input`: sparse (n, k, C) and dense
        (n, C, g, g) prompt embeddings."""

    @abc.abstractmethod
    def click_coordinates(self, points: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(K, 2) XY pixels of an (H, W) image -> the model's input frame."""

    @abc.abstractmethod
    def encode_clicks(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]], mask_input: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The prompt encoder on one region's clicks (``(1, K, 2)`` input-frame coordinates,
        ``(1, K)`` int64 labels, 1 positive / 0 negative) and/or low-resolution mask logits
        (1, 1, 4g, 4g): sparse (1, k, C) and dense (1, C, g, g) embeddings."""

    @abc.abstractmethod
    def mask_to_low_res(self, mask: torch.Tensor, sam_input_size: Tuple[int, int]) -> torch.Tensor:
        """An (H, W) float32 0/1 mask of the whole image -> (1, 1, 4g, 4g) float32 in the model's
        mask-input frame (thresholded at 0.5 by :meth:`mask_to_sam_input`)."""

    @abc.abstractmethod
    def decode_prompts(self, image_embeddings: LocalizerEmbedding, sparse: torch.Tensor, dense: torch.Tensor,
                       image_index: torch.Tensor, with_masks: bool) -> BoxPrompts:
        """The mask decoder's single-mask output on n encoded prompts, prompt i against image
        ``image_index[i]`` (ascending) of the batched ``image_embeddings``; the token is
        :meth:`select_token` of its mask token 0 after the two-way transformer.

        Returns:
            :class:`BoxPrompts` of the n prompts (masks and IoUs only ``with_masks``).
        """

    @abc.abstractmethod
    def hypernetwork(self, mask_token: torch.Tensor) -> torch.Tensor:
        """The decoder's hypernetwork MLP of mask token 0: (n, C) -> (n, C / 8) (the ``"mlp"`` source)."""

    @abc.abstractmethod
    def paste_masks(self, low_res_masks: torch.Tensor, resized_size: Tuple[int, int],
                    output_size: Tuple[int, int]) -> torch.Tensor:
        """(K, 1, 4g, 4g) mask logits of :meth:`prompt` -> (K, H_out, W_out) bool masks of an
        output frame (e.g. the original image), as the model's own predictor post-processes them
        (:func:`paste_in_chunks`). ``resized_size``: the (h, w) of :meth:`preprocess`."""

    @abc.abstractmethod
    def mask_generator(self, settings: Dict[str, object], image_shape: Tuple[int, int],
                       embedding: LocalizerEmbedding, input_size: Tuple[int, int]):
        """The automatic mask generator (``sam_auto`` proposals) for one image already encoded.

        Args:
            settings: generator keyword arguments (``MODEL.REGIONSPOT.SAM_AUTO``).
            image_shape: (H, W) of the image the generator is given.
            embedding: this localizer's embedding of that image (one image, no batch axis).
            input_size: (h, w) of the image inside the model's input (:meth:`preprocess`).

        Returns:
            An object whose ``generate((H, W, 3) uint8 array)`` gives regions as
            ``segment_anything``'s generator does (dicts with ``bbox`` XYWH, ``predicted_iou``,
            ``stability_score``, ``segmentation`` (H, W) bool), with ``counts`` of what each
            filter removed (:class:`~.proposals.sam_auto.FilterCounting`) for filter reports.
        """

    def onnx_modules(self) -> OnnxLocalizer:
        """The family's export hook (:class:`OnnxLocalizer`): its image encoder and prompt path as
        modules that ``torch.onnx.export`` traces (``regionspot-export onnx``).

        Raises:
            NotImplementedError: a family without an ONNX export (the message names it).
        """
        raise NotImplementedError(f"the localizer {self.pair_name!r} ({type(self).__name__}) has no ONNX export "
                                  f"(Localizer.onnx_modules)")

    # ----------------------------------------------------------------- the token-source rule
    def prompt_token(self, sparse: torch.Tensor) -> torch.Tensor:
        """The ``"prompt_encoder"`` token: the prompt's sparse embeddings (n, k, C) averaged
        (a box's two corner tokens for SAM). A family that pads its box prompts overrides."""
        return sparse.mean(dim=1)

    def select_token(self, mask_token: torch.Tensor, sparse: torch.Tensor,
                     hyper: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The position-aware token of n prompts, by :attr:`token_source` (paper Table 4b):
        ``"transformer"``: mask token 0 at the output of the two-way transformer (as released);
        ``"mlp"``: that token after its hypernetwork MLP (``hyper`` when the decoder computed it
        already, else :meth:`hypernetwork`); ``"prompt_encoder"``: :meth:`prompt_token`.

        Args:
            mask_token: (n, C); sparse: (n, k, C); hyper: optional (n, C / 8).

        Returns:
            (n, T) in the compute dtype.
        """
        if self.token_source == "mlp":
            return hyper if hyper is not None else self.hypernetwork(mask_token)
        if self.token_source == "prompt_encoder":
            return self.prompt_token(sparse)
        return mask_token

    def decode(self, image_embeddings: LocalizerEmbedding, sparse: torch.Tensor, dense: torch.Tensor,
               image_index: torch.Tensor, with_masks: bool) -> BoxPrompts:
        """:meth:`decode_prompts`, except that the ``"prompt_encoder"`` token without masks
        needs no decoder at all."""
        if self.token_source == "prompt_encoder" and not with_masks:
            return BoxPrompts(self.prompt_token(sparse).float(), None, None)
        return self.decode_prompts(image_embeddings, sparse, dense, image_index, with_masks)

    # ----------------------------------------------------------------- image side
    @torch.no_grad()
    @stage("sam_image_encoder")
    def encode(self, images: Sequence[torch.Tensor], sam_inputs: Optional[Sequence[Optional[torch.Tensor]]] = None,
               dtype: Optional[torch.dtype] = None) -> Tuple[LocalizerEmbedding, List[Tuple[int, int]]]:
        """The image encoder on B images in one call (:meth:`preprocess`, :meth:`encode_images`).

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB (sizes may differ), any device.
            sam_inputs: optional per image, the data mapper's resize of it.
            dtype: compute dtype (default :attr:`dtype`).

        Returns:
            (the batched embedding at that dtype, B (h, w) sizes inside the model's input).
        """
        sam_inputs = sam_inputs if sam_inputs is not None else [None] * len(images)
        prepared = [self.preprocess(image, resized) for image, resized in zip(images, sam_inputs)]
        with encoder_autocast(self.device, dtype or self.dtype):
            embeddings = self.encode_images(torch.stack([x for x, _ in prepared]))
        return embeddings, [size for _, size in prepared]

    @torch.no_grad()
    def extract_tokens(self, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor],
                       sam_inputs: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[torch.Tensor]:
        """Position-aware tokens of training boxes: the one extraction used by online training
        and by the SAM-token cache (``data/token_cache/``, ``tools/extract_sam_tokens.py``).

        Always float32, whatever ``ENCODER_PRECISION`` says, so that a cached token and one
        computed online agree to float rounding on every device (the released training ran SAM
        in float32 too).

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB (for a flipped training image, the flipped
                original image).
            boxes: B tensors (N_i, 4) float32, XYXY_ABS pixels of image i.
            sam_inputs: optional per image, the data mapper's resize of it.

        Returns:
            B tensors (N_i, :attr:`token_dim`) float32 on :attr:`device`.
        """
        embeddings, _ = self.encode(images, sam_inputs, dtype=torch.float32)
        prompts = self.prompt(embeddings, boxes, [tuple(im.shape[-2:]) for im in images], with_masks=False,
                              dtype=torch.float32)
        return [p.tokens for p in prompts]

    def training_tokens(self, batched_inputs: List[Dict], images: List[torch.Tensor]) -> List[torch.Tensor]:
        """Position-aware tokens of the training boxes (``RegionSpot.losses``): from the
        SAM-token cache when the mapper attached them (``instances.sam_tokens``), else
        :meth:`extract_tokens` (float32 like the cache) on ``"sam_image"`` (the original image,
        flipped as the augmentation flipped it; what the cache was made from) with
        ``instances.sam_boxes``, or on ``"image"`` with ``gt_boxes``.

        Returns:
            B tensors (N_i, T) float32 on :attr:`device`.
        """
        tokens: List[Optional[torch.Tensor]] = [None] * len(batched_inputs)
        online = []
        for i, x in enumerate(batched_inputs):
            instances = x["instances"]
            if instances.has("sam_tokens"):
                tokens[i] = instances.sam_tokens.to(self.device).float()
            else:
                online.append(i)
        if online:
            sam_images, boxes = [], []
            for i in online:
                x = batched_inputs[i]
                sam_images.append(x.get("sam_image", images[i]))
                instances = x["instances"]
                boxes.append((instances.sam_boxes if instances.has("sam_boxes") else instances.gt_boxes).tensor)
            extracted = self.extract_tokens(sam_images, boxes, [batched_inputs[i].get("sam_input") for i in online])
            for i, t in zip(online, extracted):
                tokens[i] = t
        return tokens

    # ----------------------------------------------------------------- prompt side
    def forward(self, image_embedding: LocalizerEmbedding, boxes: torch.Tensor, image_size: Tuple[int, int],
                with_masks: bool = True) -> BoxPrompts:
        """:meth:`prompt` on one image: its (C, g, g) embedding (or dict of such), (N, 4) float32
        XYXY_ABS boxes of the (H, W) = ``image_size`` image -> :class:`BoxPrompts`."""
        return self.prompt(stack_embeddings([image_embedding]), [boxes], [image_size], with_masks)[0]

    @torch.no_grad()
    @stage("sam_prompt_decoder")
    def prompt(self, image_embeddings: LocalizerEmbedding, boxes: Sequence[torch.Tensor],
               image_sizes: Sequence[Tuple[int, int]], with_masks: bool = True,
               dtype: Optional[torch.dtype] = None) -> List[BoxPrompts]:
        """Position-aware tokens of the boxes of B images, in as few decoder calls as memory allows.

        All boxes of the batch go through the prompt encoder and the mask decoder together,
        :attr:`box_chunk_size` at a time, each box against its own image's embedding.

        Args:
            image_embeddings: the batched embedding of :meth:`encode` (B images).
            boxes: B tensors (N_i, 4) float, XYXY_ABS pixels of image i, of size ``image_sizes[i]``.
            image_sizes: B (H_i, W_i).
            with_masks: also compute low-resolution masks and predicted IoUs (needed for
                ``MASK_ON`` and the TAP protocol only).
            dtype: compute dtype of the prompt encoder and mask decoder (default :attr:`dtype`).

        Returns:
            B :class:`BoxPrompts` (tokens (N_i, :attr:`token_dim`) float32).

        Raises:
            ValueError: the numbers of embeddings, box tensors and sizes differ.
        """
        num_embeddings = embedding_batch_size(image_embeddings)
        if not (num_embeddings == len(boxes) == len(image_sizes)):
            raise ValueError(f"{num_embeddings} image embeddings, {len(boxes)} box tensors and "
                             f"{len(image_sizes)} image sizes: expected one of each per image")
        with encoder_autocast(self.device, dtype or self.dtype):
            return self._prompt(image_embeddings, boxes, image_sizes, with_masks)

    def _prompt(self, image_embeddings: LocalizerEmbedding, boxes: Sequence[torch.Tensor],
                image_sizes: Sequence[Tuple[int, int]], with_masks: bool) -> List[BoxPrompts]:
        if not boxes:
            return []
        device = image_embedding(image_embeddings).device
        counts = [int(b.shape[0]) for b in boxes]
        in_frame = torch.cat([self.boxes_to_input(b.to(device).float(), tuple(size))
                              for b, size in zip(boxes, image_sizes)])
        image_index = torch.repeat_interleave(torch.arange(len(boxes), device=device),
                                              torch.tensor(counts, device=device))
        pieces = []
        for s in range(0, in_frame.shape[0], self.box_chunk_size):
            sparse, dense = self.encode_boxes(in_frame[s:s + self.box_chunk_size])
            pieces.append(self.decode(image_embeddings, sparse, dense, image_index[s:s + self.box_chunk_size],
                                      with_masks))
        if not pieces:
            pieces = [self._empty(image_embeddings, with_masks)]
        joined = [torch.cat(parts) if parts[0] is not None else None for parts in zip(*pieces)]
        split = [t.split(counts) if t is not None else [None] * len(counts) for t in joined]
        return [BoxPrompts(*per_image) for per_image in zip(*split)]

    def _empty(self, image_embeddings: LocalizerEmbedding, with_masks: bool) -> BoxPrompts:
        embedding = image_embedding(image_embeddings)
        device, side = embedding.device, embedding.shape[-1] * 4
        tokens = torch.zeros(0, self.token_dim, device=device)
        if not with_masks:
            return BoxPrompts(tokens, None, None)
        return BoxPrompts(tokens, torch.zeros(0, 1, side, side, device=device), torch.zeros(0, device=device))

    @abc.abstractmethod
    def prompt_points(self, image_embedding: LocalizerEmbedding, sam_input_size: Tuple[int, int],
                      image_size: Tuple[int, int], points: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> BoxPrompts:
        """The prompt encoder and single-mask decoder on clicks and/or a mask: one region.

        What the model's own predictor computes for clicks and a mask input with a single mask;
        every family states which predictor it matches and runs :meth:`prompt_clicks`, the
        shared path (``return self.prompt_clicks(...)``). Arguments, result and errors: those of
        :meth:`prompt_clicks`.

        Raises:
            NotImplementedError: a localizer that gives none.
        """
        raise NotImplementedError(f"the localizer {type(self).__name__} has no prompt_points(): point and mask "
                                  f"prompts need one")

    @torch.no_grad()
    @stage("sam_prompt_decoder")
    def prompt_clicks(self, image_embedding: LocalizerEmbedding, sam_input_size: Tuple[int, int],
                      image_size: Tuple[int, int], points: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> BoxPrompts:
        """:meth:`prompt_points` of every family: clicks and/or a mask -> one region.

        The clicks in the model's input frame (:meth:`click_coordinates`) and the mask as its
        low-resolution mask input (:meth:`mask_to_sam_input`) go through the family's
        :meth:`encode_clicks` and :meth:`decode_prompts`, at :attr:`dtype`; the token is mask
        token 0 at the output of the two-way transformer, as for a box prompt. The head was
        trained on box-prompted tokens only, so the predictor recognises the box of this mask
        by default (docs/app.md, "Prompts").

        Args:
            image_embedding: the image's embedding (C, g, g) (or (1, C, g, g); or a dict of such).
            sam_input_size: (h, w) of the image inside the model's input (:meth:`preprocess`).
            image_size: (H, W) of the frame the points are given in (the image that was encoded).
            points: (K, 2) float32 XY pixels of that frame, or None (mask only).
            labels: (K,) int64, 1 for a positive click (on the object), 0 for a negative one.
            mask: a previous mask of the object, (H', W') bool covering the whole image at any
                resolution (e.g. the image's own pixels), or None (:meth:`mask_to_sam_input`).

        Returns:
            :class:`BoxPrompts` with tokens (1, T) float32, low_res_masks (1, 1, 4g, 4g) and
            iou_predictions (1,).

        Raises:
            ValueError: neither points nor a mask; points not (K, 2) finite or labels not (K,)
                of 0/1.
        """
        device = self.device
        if points is None and mask is None:
            raise ValueError("prompt_points needs points (K, 2) with labels (K,), a mask (H, W), or both")
        point_input = None
        if points is not None:
            points = torch.as_tensor(points, dtype=torch.float32, device=device)
            if points.dim() != 2 or points.shape[1] != 2 or points.shape[0] == 0 or not torch.isfinite(points).all():
                raise ValueError(f"points must be a non-empty (K, 2) array of finite XY pixels, got shape "
                                 f"{tuple(points.shape)}")
            labels = torch.as_tensor(labels if labels is not None else [], device=device)
            if labels.shape != (points.shape[0],) or not bool(((labels == 0) | (labels == 1)).all()):
                raise ValueError(f"labels must be ({points.shape[0]},) of 1 (positive) or 0 (negative), got "
                                 f"{labels.tolist()}")
            point_input = (self.click_coordinates(points, tuple(image_size))[None], labels.to(torch.int64)[None])
        mask_input = None if mask is None else self.mask_to_sam_input(mask, sam_input_size)
        embedding = stack_embeddings([image_embedding]) if embedding_dims(image_embedding) == 3 else image_embedding
        with encoder_autocast(device, self.dtype):
            sparse, dense = self.encode_clicks(point_input, mask_input)
            return self.decode_prompts(embedding, sparse, dense, torch.zeros(1, dtype=torch.int64, device=device),
                                       with_masks=True)

    def mask_to_sam_input(self, mask: torch.Tensor, sam_input_size: Tuple[int, int],
                          logit: float = MASK_PROMPT_LOGIT) -> torch.Tensor:
        """A binary mask of the whole image as the model's ``mask_input``: (1, 1, 4g, 4g)
        float32 logits, :meth:`mask_to_low_res` then +``logit`` inside (> 0.5) and -``logit``
        outside (the model takes its own low-resolution logits here; ``logit`` =
        :data:`MASK_PROMPT_LOGIT` makes a confident mask of the same sign).

        Raises:
            ValueError: ``mask`` is not a non-empty 2-D array.
        """
        mask = torch.as_tensor(mask, device=self.device)
        if mask.dim() != 2 or mask.numel() == 0:
            raise ValueError(f"mask must be an (H, W) bool array covering the image, got shape {tuple(mask.shape)}")
        low_res = self.mask_to_low_res(mask.float(), sam_input_size)
        return torch.where(low_res > 0.5, logit, -logit).float()
