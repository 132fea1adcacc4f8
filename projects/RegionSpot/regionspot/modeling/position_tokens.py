"""Position-aware tokens and masks from frozen SAM (paper Sec. 3, "localization model").

SAM's image encoder runs once per image; each box is then its own prompt to SAM's prompt
encoder and mask decoder, which give one position-aware token and one mask per box. The
token is read out of the official ``segment_anything`` modules with forward hooks, so the
computation is exactly SAM's own (``SamPredictor.predict_torch``), not a copy of it.

Token sources (paper Table 4b):
- ``"transformer"`` (default, as released): mask token 0 at the output of the mask decoder's
  two-way transformer (``hs[:, 1]``), 256-d, before the hypernetwork MLP.
- ``"prompt_encoder"``: the box prompt's sparse embedding (two corner tokens) averaged, 256-d.
- ``"mlp"``: mask token 0 after its hypernetwork MLP, ``transformer_dim // 8`` = 32-d.
"""

import contextlib
from typing import List, NamedTuple, Tuple

import numpy as np
import torch
from torch import nn

TOKEN_SOURCES = ("transformer", "prompt_encoder", "mlp")

# Masks pasted per call of Sam.postprocess_masks: each costs two float32 frames (S x S and the
# output size) before thresholding, so pasting in chunks bounds that memory.
MASK_PASTE_CHUNK = 16


class BoxPrompts(NamedTuple):
    """What SAM gives for N box prompts of one image (:meth:`SamPositionTokens.forward`).

    Attributes:
        tokens: (N, T) float32 position-aware tokens.
        low_res_masks: (N, 1, 4g, 4g) float32 mask logits of SAM's single-mask output, in the
            padded S x S frame at 1/4 resolution (see :meth:`SamPositionTokens.paste_masks`).
        iou_predictions: (N,) float32, SAM's predicted IoU of each mask (its IoU head; TAP's
            protocol fuses it into the score, the released protocol does not use it).
    """

    tokens: torch.Tensor
    low_res_masks: torch.Tensor
    iou_predictions: torch.Tensor


@contextlib.contextmanager
def _capture_output(module: nn.Module, store: List):
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        yield store
    finally:
        handle.remove()


class SamPositionTokens(nn.Module):
    """Frozen SAM turned into a box -> (position-aware token, mask) encoder.

    Args:
        sam: a ``segment_anything.modeling.Sam`` (any image-encoder size).
        token_source: one of :data:`TOKEN_SOURCES`.
        box_chunk_size: boxes sent through the mask decoder at once; SAM copies the image
            embedding once per box, so this bounds memory (64 boxes ~ 0.3 GB in float32).

    Raises:
        ValueError: unknown ``token_source`` or non-positive ``box_chunk_size``.
    """

    def __init__(self, sam: nn.Module, token_source: str = "transformer", box_chunk_size: int = 64):
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

    @property
    def input_size(self) -> int:
        """Side of SAM's square input (1024 for the official models), pixels."""
        return self.sam.image_encoder.img_size

    @property
    def token_dim(self) -> int:
        """Channels of one position-aware token: 256, or 32 for the ``"mlp"`` source."""
        dim = self.sam.mask_decoder.transformer_dim
        return dim // 8 if self.token_source == "mlp" else dim

    def preprocess(self, image: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Resize, normalise and pad one image for SAM's image encoder.

        Same steps as ``SamPredictor.set_image``: ``ResizeLongestSide.apply_image`` on the
        uint8 image (long side -> :attr:`input_size`), then ``Sam.preprocess`` (pixel
        mean/std, zero padding to a square).

        Args:
            image: (3, H, W) uint8 RGB, any device.

        Returns:
            pixels: (3, S, S) float32 on SAM's device, S = :attr:`input_size`.
            resized_size: (h, w) of the image inside ``pixels`` before padding.
        """
        array = image.permute(1, 2, 0).cpu().numpy()
        resized = self.transform.apply_image(np.ascontiguousarray(array))
        device = self.sam.pixel_mean.device
        x = torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous().float()
        return self.sam.preprocess(x[None])[0], tuple(resized.shape[:2])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings, computed once per image.

        Args:
            pixels: (B, 3, S, S) float32 from :meth:`preprocess`.

        Returns:
            (B, 256, S / 16, S / 16) image embeddings (float32, or float16 under autocast).
        """
        return self.sam.image_encoder(pixels)

    def forward(
        self, image_embedding: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int]
    ) -> BoxPrompts:
        """Position-aware tokens, low-resolution masks and IoU predictions for one image's boxes.

        Args:
            image_embedding: (256, g, g) SAM embedding of the image.
            boxes: (N, 4) float32, XYXY_ABS pixels of the image that :meth:`preprocess`
                was given, whose size is ``image_size`` = (H, W).

        Returns:
            :class:`BoxPrompts` (tokens (N, :attr:`token_dim`), low-res masks, IoU predictions).
        """
        n = boxes.shape[0]
        device = image_embedding.device
        if n == 0:
            side = image_embedding.shape[-1] * 4
            return BoxPrompts(torch.zeros(0, self.token_dim, device=device),
                              torch.zeros(0, 1, side, side, device=device), torch.zeros(0, device=device))
        boxes_sam = self.transform.apply_boxes_torch(boxes.to(device).float(), image_size)
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        tokens, masks, ious = [], [], []
        for chunk in boxes_sam.split(self.box_chunk_size):
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=chunk, masks=None)
            decoder = self.sam.mask_decoder
            hooked = {"transformer": decoder.transformer,
                      "mlp": decoder.output_hypernetworks_mlps[0]}.get(self.token_source)
            store: List = []
            with contextlib.ExitStack() as stack:
                if hooked is not None:
                    stack.enter_context(_capture_output(hooked, store))
                low_res, iou = decoder(
                    image_embeddings=image_embedding[None],
                    image_pe=image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
            if self.token_source == "transformer":
                token = store[0][0][:, 1]  # hs: [IoU token, 4 mask tokens, prompts] -> mask token 0
            elif self.token_source == "mlp":
                token = store[0]
            else:
                token = sparse.mean(dim=1)  # the two box-corner embeddings
            tokens.append(token.float())
            masks.append(low_res.float())
            ious.append(iou[:, 0].float())
        return BoxPrompts(torch.cat(tokens), torch.cat(masks), torch.cat(ious))

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
            low_res_masks: (K, 1, 4g, 4g) from :meth:`forward`.
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
