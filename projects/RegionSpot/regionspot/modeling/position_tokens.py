"""Position-aware tokens and masks from frozen SAM (paper Sec. 3, "localization model").

SAM's image encoder runs once per image; each box is then its own prompt to SAM's prompt
encoder and mask decoder, which give one position-aware token and one mask per box.

The mask decoder runs on the boxes of a whole batch of images at once (each box reads its
own image's embedding), in chunks of ``box_chunk_size`` boxes. Its steps are those of
``segment_anything``'s ``MaskDecoder.predict_masks`` with SAM's own submodules (prompt
encoder, two-way transformer, upscaling, hypernetwork MLP 0, IoU head), written out so that
boxes of different images can share a call; ``tests/test_position_tokens.py`` checks tokens,
masks and IoUs against ``SamPredictor.predict_torch``. When masks are not needed (box AP
without ``MASK_ON``, the released protocol) the upscaling, hypernetwork and IoU head are
skipped: the token comes out of the transformer, the same value either way.

Token sources (paper Table 4b):
- ``"transformer"`` (default, as released): mask token 0 at the output of the mask decoder's
  two-way transformer (``hs[:, 1]``), 256-d, before the hypernetwork MLP.
- ``"prompt_encoder"``: the box prompt's sparse embedding (two corner tokens) averaged, 256-d.
- ``"mlp"``: mask token 0 after its hypernetwork MLP, ``transformer_dim // 8`` = 32-d.
"""

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..structures import embedding_batch_size, embedding_dims, stack_embeddings
from ..transforms import resize_for_sam  # noqa: F401  (SAM's resize, shared with the data mapper)
from ..weights_files import TOKEN_SOURCES  # noqa: F401  (shared with the SAM-token cache's identity)
from .fast_attention import SAM_ATTENTION_KINDS, set_sam_attention
from .precision import check_encoder_precision, encoder_autocast, resolve_encoder_precision
from .profiling import stage

# Masks pasted per call of Sam.postprocess_masks: each costs two float32 frames (S x S and the
# output size) before thresholding, so pasting in chunks bounds that memory.
MASK_PASTE_CHUNK = 16
# The mask logit given to SAM for a binary mask prompt (+ inside, - outside): SAM's own
# low-resolution logits of a confident mask are of this order.
MASK_PROMPT_LOGIT = 10.0


def _any_tensor(embeddings) -> torch.Tensor:
    """A tensor of a batched localizer embedding (SAM's tensor, or one of a dict's tensors,
    :data:`~regionspot.structures.LocalizerEmbedding`): its batch size and device are the batch's."""
    return next(iter(embeddings.values())) if isinstance(embeddings, dict) else embeddings


class BoxPrompts(NamedTuple):
    """What SAM gives for N box prompts of one image (:meth:`SamPositionTokens.prompt`).

    Attributes:
        tokens: (N, T) float32 position-aware tokens.
        low_res_masks: (N, 1, 4g, 4g) float32 mask logits of SAM's single-mask output, in the
            padded S x S frame at 1/4 resolution (see :meth:`SamPositionTokens.paste_masks`);
            None when masks were not asked for.
        iou_predictions: (N,) float32, SAM's predicted IoU of each mask (its IoU head; TAP's
            protocol fuses it into the score, the released protocol does not use it); None
            when masks were not asked for.
    """

    tokens: torch.Tensor
    low_res_masks: Optional[torch.Tensor]
    iou_predictions: Optional[torch.Tensor]


class SamPositionTokens(nn.Module):
    """RegionSpot's localizer: frozen SAM turned into a box -> (position-aware token, mask)
    encoder (paper Sec. 3, "localization model").

    The image side (:meth:`encode`) runs SAM's image encoder once per image; the prompt side
    (:meth:`prompt`) turns boxes into tokens, and masks with SAM's predicted IoU when asked.
    Both run at the part's precision (``ENCODER_PRECISION``, :mod:`.precision`) and attention
    (``SAM_ATTENTION``, :mod:`.fast_attention`); :meth:`extract_tokens` is the one token
    extraction of training, online and for the SAM-token cache alike, always in float32.

    Args:
        sam: a ``segment_anything.modeling.Sam`` (any image-encoder size).
        token_source: one of :data:`TOKEN_SOURCES`.
        box_chunk_size: boxes sent through the mask decoder at once; each box holds a copy of
            its image's embedding, so this bounds memory (64 boxes ~ 0.3 GB in float32).
        precision: ``ENCODER_PRECISION`` of SAM at inference ("auto": float16 on CUDA, float32
            on the CPU).
        attention: ``SAM_ATTENTION``, "sdpa" or "official" (same result up to rounding).

    Raises:
        ValueError: unknown ``token_source``, ``precision`` or ``attention``, or non-positive
            ``box_chunk_size``.
    """

    def __init__(self, sam: nn.Module, token_source: str = "transformer", box_chunk_size: int = 64,
                 precision: str = "auto", attention: str = "sdpa"):
        super().__init__()
        from segment_anything.utils.transforms import ResizeLongestSide

        if token_source not in TOKEN_SOURCES:
            raise ValueError(f"token_source must be one of {TOKEN_SOURCES}, got {token_source!r}")
        if box_chunk_size <= 0:
            raise ValueError(f"box_chunk_size must be positive, got {box_chunk_size}")
        self.sam = sam.eval().requires_grad_(False)
        self.token_source = token_source
        self.box_chunk_size = box_chunk_size
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.precision = check_encoder_precision(precision)
        self.set_attention(attention)

    # ----------------------------------------------------------------- speed switches
    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype SAM computes in at inference (:attr:`precision` on this device)."""
        return resolve_encoder_precision(self.precision, self.device)

    def set_attention(self, kind: str) -> None:
        """SAM's image-encoder attention: "sdpa" (:mod:`.fast_attention`) or "official".

        Raises:
            ValueError: another kind.
        """
        if kind not in SAM_ATTENTION_KINDS:
            raise ValueError(f"MODEL.REGIONSPOT.SAM_ATTENTION must be one of {SAM_ATTENTION_KINDS}, got {kind!r}")
        set_sam_attention(self.sam.image_encoder, kind)
        self.attention = kind

    def compile_encoder(self, **options) -> None:
        """``torch.compile`` SAM's image encoder in place (``COMPILE``); parameter names unchanged."""
        self.sam.image_encoder.compile(**options)

    # ----------------------------------------------------------------- image side
    @torch.no_grad()
    @stage("sam_image_encoder")
    def encode(self, images: Sequence[torch.Tensor], sam_inputs: Optional[Sequence[Optional[torch.Tensor]]] = None,
               dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """SAM's image encoder on B images in one call.

        Same resize and normalisation as ``SamPredictor.set_image`` (:meth:`preprocess`); the
        resize is taken from ``sam_inputs[i]`` when the mapper made it.

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB (sizes may differ), any device.
            sam_inputs: optional per image, :func:`resize_for_sam` of it.
            dtype: compute dtype (default :attr:`dtype`).

        Returns:
            ((B, 256, g, g) embeddings at that dtype, B (h, w) sizes inside SAM's padded input).
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
        and by the SAM-token cache (``data/token_cache.py``, ``tools/extract_sam_tokens.py``).

        Always float32, whatever ``ENCODER_PRECISION`` says, so that a cached token and one
        computed online agree to float rounding on every device (the released training ran SAM
        in float32 too).

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB (for a flipped training image, the flipped
                original image).
            boxes: B tensors (N_i, 4) float32, XYXY_ABS pixels of image i.
            sam_inputs: optional per image, :func:`resize_for_sam` of it.

        Returns:
            B tensors (N_i, :attr:`token_dim`) float32 on SAM's device.
        """
        embeddings, _ = self.encode(images, sam_inputs, dtype=torch.float32)
        prompts = self.prompt(embeddings, boxes, [tuple(im.shape[-2:]) for im in images], with_masks=False,
                              dtype=torch.float32)
        return [p.tokens for p in prompts]

    def training_tokens(self, batched_inputs: List[Dict], images: List[torch.Tensor]) -> List[torch.Tensor]:
        """Position-aware tokens of the training boxes (``RegionSpot.losses``): from the
        SAM-token cache when the mapper attached them (``instances.sam_tokens``), else
        :meth:`extract_tokens` (float32 like the cache) on ``"sam_image"``
        (the original image, flipped as the augmentation flipped it; what the cache was made
        from) with ``instances.sam_boxes``, or on ``"image"`` with ``gt_boxes``.

        Returns:
            B tensors (N_i, T) float32 on SAM's device.
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
            extracted = self.extract_tokens(sam_images, boxes, [batched_inputs[i].get("sam_input")
                                                                         for i in online])
            for i, t in zip(online, extracted):
                tokens[i] = t
        return tokens

    @property
    def input_size(self) -> int:
        """Side of SAM's square input (1024 for the official models), pixels."""
        return self.sam.image_encoder.img_size

    @property
    def token_dim(self) -> int:
        """Channels of one position-aware token: 256, or 32 for the ``"mlp"`` source."""
        dim = self.sam.mask_decoder.transformer_dim
        return dim // 8 if self.token_source == "mlp" else dim

    def preprocess(self, image: torch.Tensor, resized: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Resize, normalise and pad one image for SAM's image encoder.

        Same steps as ``SamPredictor.set_image``: :func:`resize_for_sam` (long side ->
        :attr:`input_size`), then ``Sam.preprocess`` (pixel mean/std, zero padding to a square)
        on SAM's device.

        Args:
            image: (3, H, W) uint8 RGB, any device.
            resized: optional :func:`resize_for_sam` of ``image`` made beforehand (by the test
                mapper, in a data-loader worker); used when its long side is :attr:`input_size`,
                else ignored.

        Returns:
            pixels: (3, S, S) float32 on SAM's device, S = :attr:`input_size`.
            resized_size: (h, w) of the image inside ``pixels`` before padding.
        """
        if resized is None or max(resized.shape[-2:]) != self.input_size or resized.dtype != torch.uint8:
            resized = resize_for_sam(image, self.input_size)
        device = self.sam.pixel_mean.device
        x = resized.to(device, non_blocking=True).float()
        return self.sam.preprocess(x[None])[0], tuple(resized.shape[-2:])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings, computed once per image.

        Args:
            pixels: (B, 3, S, S) float32 from :meth:`preprocess`.

        Returns:
            (B, 256, S / 16, S / 16) image embeddings (float32, or lower under autocast).
        """
        return self.sam.image_encoder(pixels)

    def forward(self, image_embedding: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                with_masks: bool = True) -> BoxPrompts:
        """Position-aware tokens (and masks, IoU predictions) of one image's boxes.

        Args:
            image_embedding: (256, g, g) SAM embedding of the image.
            boxes: (N, 4) float32, XYXY_ABS pixels of the image that :meth:`preprocess`
                was given, whose size is ``image_size`` = (H, W).
            with_masks: also compute the low-resolution masks and predicted IoUs.

        Returns:
            :class:`BoxPrompts`.
        """
        return self.prompt(image_embedding[None], [boxes], [image_size], with_masks)[0]

    @torch.no_grad()
    @stage("sam_prompt_decoder")
    def prompt(self, image_embeddings: torch.Tensor, boxes: Sequence[torch.Tensor],
               image_sizes: Sequence[Tuple[int, int]], with_masks: bool = True,
               dtype: Optional[torch.dtype] = None) -> List[BoxPrompts]:
        """Position-aware tokens of the boxes of B images, in as few decoder calls as memory allows.

        All boxes of the batch go through the prompt encoder and the mask decoder together,
        :attr:`box_chunk_size` at a time, each box against its own image's embedding.

        Args:
            image_embeddings: (B, 256, g, g) SAM embeddings (or the localizer's dict of such
                batched tensors, :data:`~regionspot.structures.LocalizerEmbedding`).
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

    def _prompt(self, image_embeddings: torch.Tensor, boxes: Sequence[torch.Tensor],
                image_sizes: Sequence[Tuple[int, int]], with_masks: bool) -> List[BoxPrompts]:
        device = _any_tensor(image_embeddings).device
        counts = [int(b.shape[0]) for b in boxes]
        in_sam = [self.transform.apply_boxes_torch(b.to(device).float(), tuple(size))
                  for b, size in zip(boxes, image_sizes)]
        all_boxes = torch.cat(in_sam) if in_sam else torch.zeros(0, 4, device=device)
        image_index = torch.repeat_interleave(torch.arange(len(boxes), device=device),
                                              torch.tensor(counts, device=device))
        pieces = [self._decode(image_embeddings, all_boxes[s:s + self.box_chunk_size],
                               image_index[s:s + self.box_chunk_size], with_masks)
                  for s in range(0, all_boxes.shape[0], self.box_chunk_size)]
        if not pieces:
            pieces = [self._empty(image_embeddings, with_masks)]
        joined = [torch.cat(parts) if parts[0] is not None else None for parts in zip(*pieces)]
        split = [t.split(counts) if t is not None else [None] * len(counts) for t in joined]
        return [BoxPrompts(*per_image) for per_image in zip(*split)]

    def _empty(self, image_embeddings: torch.Tensor, with_masks: bool) -> BoxPrompts:
        device = image_embeddings.device
        side = image_embeddings.shape[-1] * 4
        if not with_masks:
            return BoxPrompts(torch.zeros(0, self.token_dim, device=device), None, None)
        return BoxPrompts(torch.zeros(0, self.token_dim, device=device),
                          torch.zeros(0, 1, side, side, device=device), torch.zeros(0, device=device))

    def _decode(self, image_embeddings: torch.Tensor, boxes_sam: torch.Tensor, image_index: torch.Tensor,
                with_masks: bool) -> BoxPrompts:
        """SAM's prompt encoder and single-mask decoder on one chunk of n boxes.

        Args:
            image_embeddings: (B, 256, g, g).
            boxes_sam: (n, 4) boxes in SAM's resized input frame.
            image_index: (n,) int64, the image of each box.
        """
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes_sam, masks=None)
        return self._decode_prompts(image_embeddings, sparse, dense, image_index, with_masks)

    def _decode_prompts(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                        image_index: torch.Tensor, with_masks: bool) -> BoxPrompts:
        """SAM's single-mask decoder on n encoded prompts (boxes, or clicks and masks).

        ``MaskDecoder.predict_masks`` with ``multimask_output=False``, except that each prompt's
        source is its own image's embedding (``image_embeddings[image_index]``) and only the
        single-mask output (mask token 0) is computed.

        Args:
            image_embeddings: (B, 256, g, g).
            sparse, dense: the prompt encoder's (n, k, 256) and (n, 256, g, g) embeddings.
            image_index: (n,) int64, the image of each prompt.
        """
        if self.token_source == "prompt_encoder" and not with_masks:
            return BoxPrompts(sparse.mean(dim=1).float(), None, None)  # the two box-corner embeddings
        decoder = self.sam.mask_decoder
        n = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        queries = torch.cat([output_tokens[None].expand(n, -1, -1), sparse], dim=1)
        source = image_embeddings[image_index] + dense
        image_pe = self.sam.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1)
        hs, keys = decoder.transformer(source, image_pe, queries)
        mask_token = hs[:, 1]  # [IoU token, mask tokens..., prompt tokens]: mask token 0
        hyper = decoder.output_hypernetworks_mlps[0](mask_token) if (with_masks or self.token_source == "mlp") else None
        token = {"transformer": mask_token, "mlp": hyper}.get(self.token_source)
        if token is None:
            token = sparse.mean(dim=1)
        if not with_masks:
            return BoxPrompts(token.float(), None, None)
        _, c, h, w = source.shape
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(n, c, h, w))
        masks = (hyper[:, None, :] @ upscaled.flatten(2)).view(n, 1, *upscaled.shape[-2:])
        iou = decoder.iou_prediction_head(hs[:, 0])[:, 0]
        return BoxPrompts(token.float(), masks.float(), iou.float())

    @torch.no_grad()
    @stage("sam_prompt_decoder")
    def prompt_points(self, image_embedding: torch.Tensor, sam_input_size: Tuple[int, int],
                      image_size: Tuple[int, int], points: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> BoxPrompts:
        """SAM's prompt encoder and single-mask decoder on clicks and/or a mask: one region.

        What ``SamPredictor.predict(point_coords, point_labels, mask_input=...,
        multimask_output=False)`` computes (``tests/test_position_tokens.py`` checks the mask
        logits and predicted IoU against it), with SAM's own prompt encoder (points padded with
        SAM's "not a point" when there is no box) and mask decoder; the token is mask token 0
        at the output of the two-way transformer, as for a box prompt (:meth:`_decode`). The
        head was trained on box-prompted tokens only, so the predictor recognises the box of
        this mask by default (docs/app.md, "Prompts").

        Args:
            image_embedding: (256, g, g) SAM embedding of the image (or (1, 256, g, g)).
            sam_input_size: (h, w) of the image inside SAM's padded input (:meth:`preprocess`).
            image_size: (H, W) of the frame the points are given in (the image that was encoded).
            points: (K, 2) float32 XY pixels of that frame, or None (mask only).
            labels: (K,) int64, 1 for a positive click (on the object), 0 for a negative one.
            mask: a previous mask of the object, (H', W') bool covering the whole image at any
                resolution (e.g. the image's own pixels), or None. It enters SAM as its
                low-resolution ``mask_input`` (:meth:`mask_to_sam_input`).

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
            return self._decode_prompts(embedding, sparse, dense, torch.zeros(1, dtype=torch.int64, device=device),
                                        with_masks=True)

    def click_coordinates(self, points: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(K, 2) XY pixels of an (H, W) image -> SAM's resized input frame (``ResizeLongestSide``)."""
        return self.transform.apply_coords_torch(points, image_size)

    def encode_clicks(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]], mask_input: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM's prompt encoder on one region's clicks (``(1, K, 2)`` coordinates in SAM's input
        frame, ``(1, K)`` labels; padded with SAM's "not a point" as there is no box) and/or
        low-resolution mask logits (1, 1, 4g, 4g): its sparse and dense embeddings."""
        return self.sam.prompt_encoder(points=points, boxes=None, masks=mask_input)

    def mask_to_sam_input(self, mask: torch.Tensor, sam_input_size: Tuple[int, int],
                          logit: float = MASK_PROMPT_LOGIT) -> torch.Tensor:
        """A binary mask of the whole image as SAM's ``mask_input``: (1, 1, 4g, 4g) float32 logits.

        The inverse of :meth:`paste_masks`' geometry: resized (bilinear) to the image's size
        inside SAM's input, zero-padded to S x S like the image, resized to 4g x 4g, then
        +``logit`` inside and -``logit`` outside (SAM takes its own low-resolution logits here;
        ``logit`` = :data:`MASK_PROMPT_LOGIT` makes a confident mask of the same sign).

        Raises:
            ValueError: ``mask`` is not a non-empty 2-D array.
        """
        mask = torch.as_tensor(mask, device=self.device)
        if mask.dim() != 2 or mask.numel() == 0:
            raise ValueError(f"mask must be an (H, W) bool array covering the image, got shape {tuple(mask.shape)}")
        h, w = sam_input_size
        side = self.input_size
        resized = torch.nn.functional.interpolate(mask.float()[None, None], size=(int(h), int(w)), mode="bilinear",
                                                  align_corners=False)
        padded = torch.nn.functional.pad(resized, (0, side - int(w), 0, side - int(h)))
        low = self.sam.prompt_encoder.mask_input_size
        low_res = torch.nn.functional.interpolate(padded, size=tuple(low), mode="bilinear", align_corners=False)
        return torch.where(low_res > 0.5, logit, -logit).float()

    def mask_generator(self, settings: Dict[str, object], image_shape: Tuple[int, int], embedding: torch.Tensor,
                       input_size: Tuple[int, int]):
        """SAM's automatic mask generator (``sam_auto`` proposals) for one image already encoded.

        A ``segment_anything.SamAutomaticMaskGenerator`` that counts what each of its filters
        removes (:func:`~.proposals.sam_auto.counting_mask_generator_class`) and whose predictor
        reuses ``embedding`` instead of running SAM's image encoder again (crops, with
        ``CROP_N_LAYERS`` > 0, are encoded by SAM itself).

        Args:
            settings: ``SamAutomaticMaskGenerator`` keyword arguments (``MODEL.REGIONSPOT.SAM_AUTO``).
            image_shape: (H, W) of the image the generator is given.
            embedding: (256, g, g), this localizer's embedding of that image.
            input_size: (h, w) of the image inside SAM's padded input (:meth:`preprocess`).
        """
        from segment_anything import SamPredictor

        from .proposals.sam_auto import counting_mask_generator_class, embedded_predictor

        generator = counting_mask_generator_class()(self.sam, output_mode="binary_mask", **settings)
        generator.predictor = embedded_predictor(SamPredictor, self.sam, image_shape, embedding, input_size)
        return generator

    def paste_masks(
        self,
        low_res_masks: torch.Tensor,
        resized_size: Tuple[int, int],
        output_size: Tuple[int, int],
    ) -> torch.Tensor:
        """Binary masks in an output frame, as SAM post-processes them.

        ``Sam.postprocess_masks`` (upscale to S, crop the padding, resize to the image size),
        threshold at 0, :data:`MASK_PASTE_CHUNK` masks at a time so the float intermediates
        stay small. Call it only for the boxes that are kept after post-processing.

        Args:
            low_res_masks: (K, 1, 4g, 4g) from :meth:`prompt`.
            resized_size: (h, w) returned by :meth:`preprocess`.
            output_size: (H_out, W_out) of the frame to paste into (e.g. the original image).

        Returns:
            (K, H_out, W_out) bool.
        """
        if low_res_masks.shape[0] == 0:
            return torch.zeros(0, *output_size, dtype=torch.bool, device=low_res_masks.device)
        out = torch.empty(low_res_masks.shape[0], *output_size, dtype=torch.bool, device=low_res_masks.device)
        for start in range(0, low_res_masks.shape[0], MASK_PASTE_CHUNK):
            chunk = low_res_masks[start:start + MASK_PASTE_CHUNK]
            masks = self.sam.postprocess_masks(chunk, tuple(resized_size), tuple(output_size))
            out[start:start + chunk.shape[0]] = masks[:, 0] > self.sam.mask_threshold
        return out
