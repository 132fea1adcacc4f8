"""Position-aware tokens and masks from frozen SAM (paper Sec. 3, "localization model").

SAM's image encoder runs once per image; each box is then its own prompt to SAM's prompt
encoder and mask decoder, which give one position-aware token and one mask per box.

SAM implements the localizer interface (:class:`~.localizer.Localizer`, which holds what every
family shares: batching, chunking, precision, the token-source rule, the token extraction of
training). The mask decoder runs on the boxes of a whole batch of images at once (each box
reads its own image's embedding), in chunks of ``box_chunk_size`` boxes. Its steps are those of
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

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..transforms import resize_for_sam  # noqa: F401  (SAM's resize, shared with the data mapper)
from ..weights_files import TOKEN_SOURCES  # noqa: F401  (shared with the SAM-token cache's identity)
from .fast_attention import set_sam_attention
from .localizer import (  # noqa: F401  (BoxPrompts and the constants: where SAM's callers import them)
    MASK_PASTE_CHUNK,
    MASK_PROMPT_LOGIT,
    BoxPrompts,
    ExportImageEncoder,
    ExportPrompt,
    Localizer,
    OnnxLocalizer,
    paste_in_chunks,
)


class SamPositionTokens(Localizer):
    """RegionSpot's localizer on SAM (``segment_anything``): frozen SAM turned into a box ->
    (position-aware token, mask) encoder (paper Sec. 3, "localization model"); the released pair.

    The image side (:meth:`~.localizer.Localizer.encode`) runs SAM's image encoder once per
    image; the prompt side (:meth:`~.localizer.Localizer.prompt`) turns boxes into tokens, and
    masks with SAM's predicted IoU when asked. Both run at the part's precision
    (``ENCODER_PRECISION``, :mod:`.precision`) and attention (``SAM_ATTENTION``,
    :mod:`.fast_attention`); :meth:`~.localizer.Localizer.extract_tokens` is the one token
    extraction of training, online and for the SAM-token cache alike, always in float32.

    Args:
        sam: a ``segment_anything.modeling.Sam`` (any image-encoder size).
        token_source, box_chunk_size, precision, attention: as for :class:`~.localizer.Localizer`
            (attention: "sdpa" switches SAM's ViT blocks to :mod:`.fast_attention`).

    Raises:
        ValueError: unknown ``token_source``, ``precision`` or ``attention``, or non-positive
            ``box_chunk_size``.
    """

    family = "sam"

    def __init__(self, sam: nn.Module, token_source: str = "transformer", box_chunk_size: int = 64,
                 precision: str = "auto", attention: str = "sdpa"):
        super().__init__(sam, token_source, box_chunk_size, precision, attention)
        from segment_anything.utils.transforms import ResizeLongestSide

        self.transform = ResizeLongestSide(sam.image_encoder.img_size)

    # ----------------------------------------------------------------- switches and sizes
    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    def set_attention(self, kind: str) -> None:
        """SAM's image-encoder attention: "sdpa" (:mod:`.fast_attention`) or "official".

        Raises:
            ValueError: another kind.
        """
        super().set_attention(kind)
        set_sam_attention(self.sam.image_encoder, kind)

    @property
    def input_size(self) -> int:
        """Side of SAM's square input (1024 for the official models), pixels."""
        return self.sam.image_encoder.img_size

    @property
    def decoder_width(self) -> int:
        """SAM's mask-decoder width (``transformer_dim``, 256): tokens are 256-d, or 32-d for ``"mlp"``."""
        return self.sam.mask_decoder.transformer_dim

    # ----------------------------------------------------------------- image side
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

    # ----------------------------------------------------------------- prompt side
    def boxes_to_input(self, boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(N, 4) XYXY_ABS boxes of an (H, W) image -> SAM's resized input frame (``ResizeLongestSide``)."""
        return self.transform.apply_boxes_torch(boxes, tuple(image_size))

    def encode_boxes(self, boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM's prompt encoder on (n, 4) boxes of SAM's input frame: (n, 2, 256) corner and
        (n, 256, g, g) dense ("no mask") embeddings."""
        return self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)

    def hypernetwork(self, mask_token: torch.Tensor) -> torch.Tensor:
        """SAM's hypernetwork MLP 0 (``output_hypernetworks_mlps[0]``): (n, 256) -> (n, 32)."""
        return self.sam.mask_decoder.output_hypernetworks_mlps[0](mask_token)

    def decode_prompts(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
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
        decoder = self.sam.mask_decoder
        n = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        queries = torch.cat([output_tokens[None].expand(n, -1, -1), sparse], dim=1)
        source = image_embeddings[image_index] + dense
        image_pe = self.sam.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1)
        hs, keys = decoder.transformer(source, image_pe, queries)
        mask_token = hs[:, 1]  # [IoU token, mask tokens..., prompt tokens]: mask token 0
        hyper = self.hypernetwork(mask_token) if with_masks else None
        token = self.select_token(mask_token, sparse, hyper)
        if not with_masks:
            return BoxPrompts(token.float(), None, None)
        _, c, h, w = source.shape
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(n, c, h, w))
        masks = (hyper[:, None, :] @ upscaled.flatten(2)).view(n, 1, *upscaled.shape[-2:])
        iou = decoder.iou_prediction_head(hs[:, 0])[:, 0]
        return BoxPrompts(token.float(), masks.float(), iou.float())

    def onnx_modules(self) -> OnnxLocalizer:
        """SAM's ONNX export (:class:`~.localizer.OnnxLocalizer`): the host resizes the image as
        ``ResizeLongestSide``; the image encoder normalises and pads; masks are pasted as
        ``Sam.postprocess_masks`` does (upsample to S, crop the padding, resize)."""
        names = self.onnx_embedding_names
        return OnnxLocalizer(ExportImageEncoder(self, self.sam.preprocess, names), names,
                             ExportPrompt(self, self.onnx_boxes_to_input, names, as_dict=len(names) > 1),
                             host_resize="longest_side", mask_paste="crop_padding",
                             mask_threshold=float(self.sam.mask_threshold))

    #: The names of the exported embeddings: SAM's one tensor (SAM-HQ: its dict's keys).
    onnx_embedding_names: Tuple[str, ...] = ("image_embedding",)

    def onnx_boxes_to_input(self, boxes: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        """:meth:`boxes_to_input` with the image size as a (2,) float32 tensor [H, W] (for the
        ONNX graph): ``ResizeLongestSide.get_preprocess_shape``, then each coordinate scaled."""
        h, w = image_size[0], image_size[1]
        scale = self.input_size / torch.maximum(h, w)
        new_h, new_w = torch.floor(h * scale + 0.5), torch.floor(w * scale + 0.5)
        return boxes * torch.stack([new_w / w, new_h / h, new_w / w, new_h / h])

    # ----------------------------------------------------------------- clicks and masks
    def prompt_points(self, image_embedding: torch.Tensor, sam_input_size: Tuple[int, int],
                      image_size: Tuple[int, int], points: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> BoxPrompts:
        """SAM's prompt encoder and single-mask decoder on clicks and/or a mask: one region
        (:meth:`~.localizer.Localizer.prompt_clicks`, whose arguments it takes).

        What ``SamPredictor.predict(point_coords, point_labels, mask_input=...,
        multimask_output=False)`` computes (``tests/test_position_tokens.py`` checks the mask
        logits and predicted IoU against it), with SAM's own prompt encoder (points padded with
        SAM's "not a point" when there is no box) and mask decoder; ``mask`` enters SAM as its
        low-resolution ``mask_input``.

        Raises:
            ValueError: neither points nor a mask; points not (K, 2) finite or labels not (K,)
                of 0/1.
        """
        return self.prompt_clicks(image_embedding, sam_input_size, image_size, points, labels, mask)

    def click_coordinates(self, points: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(K, 2) XY pixels of an (H, W) image -> SAM's resized input frame (``ResizeLongestSide``)."""
        return self.transform.apply_coords_torch(points, image_size)

    def encode_clicks(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]], mask_input: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM's prompt encoder on one region's clicks (``(1, K, 2)`` coordinates in SAM's input
        frame, ``(1, K)`` labels; padded with SAM's "not a point" as there is no box) and/or
        low-resolution mask logits (1, 1, 4g, 4g): its sparse and dense embeddings."""
        return self.sam.prompt_encoder(points=points, boxes=None, masks=mask_input)

    def mask_to_low_res(self, mask: torch.Tensor, sam_input_size: Tuple[int, int]) -> torch.Tensor:
        """The inverse of :meth:`paste_masks`' geometry for an (H, W) float mask: resized
        (bilinear) to the image's size inside SAM's input, zero-padded to S x S like the image,
        resized to SAM's mask-input size 4g x 4g: (1, 1, 4g, 4g) float32."""
        h, w = sam_input_size
        side = self.input_size
        resized = torch.nn.functional.interpolate(mask[None, None], size=(int(h), int(w)), mode="bilinear",
                                                  align_corners=False)
        padded = torch.nn.functional.pad(resized, (0, side - int(w), 0, side - int(h)))
        low = self.sam.prompt_encoder.mask_input_size
        return torch.nn.functional.interpolate(padded, size=tuple(low), mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------- masks out
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
        def paste(chunk: torch.Tensor) -> torch.Tensor:
            masks = self.sam.postprocess_masks(chunk, tuple(resized_size), tuple(output_size))
            return masks[:, 0] > self.sam.mask_threshold

        return paste_in_chunks(low_res_masks, tuple(output_size), paste, MASK_PASTE_CHUNK)
