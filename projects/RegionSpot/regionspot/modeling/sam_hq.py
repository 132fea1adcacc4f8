"""SAM-HQ as RegionSpot's localizer (``MODEL.REGIONSPOT.LOCALIZER sam_hq``).

SAM-HQ (Ke et al., "Segment Anything in High Quality", NeurIPS 2023; package
``segment-anything-hq``, import ``segment_anything_hq``) is SAM with its image encoder, prompt
encoder and two-way transformer unchanged and frozen, and a mask decoder (``MaskDecoderHQ``)
that adds

- one more output token, the HQ token (``hf_token``), a query of the same two-way transformer,
  with its own hypernetwork MLP (``hf_mlp``);
- HQ features: the early ViT features (the output of the image encoder's first
  global-attention block, ``(g, g, vit_dim)``) upsampled by ``compress_vit_feat``, plus the
  image embedding upsampled by ``embedding_encoder``; the HQ mask is the HQ token's
  hypernetwork output against ``embedding_maskfeature(SAM's upscaled embedding) + HQ features``.

Everything is built from the package's own modules (imported, never copied) and the official
files (``sam_hq_vit_{b,l,h}.pth``: a plain ``torch.save`` of the HQ ``Sam`` state dict, SAM's
keys plus ``mask_decoder.hf_token``, ``hf_mlp``, ``compress_vit_feat``, ``embedding_encoder``,
``embedding_maskfeature``) are loaded strictly: the package's ``build_sam`` uses
``strict=False`` and would run with random tensors where the file lacks them.

The position-aware token is, as for SAM, mask token 0 at the output of the decoder's two-way
transformer (``hs[:, 1]``). The HQ token is one more query of that transformer, and every query
attends to every other in its self-attention (and the prompt's and image's tokens attend to
it), so the token is not plain SAM's with the same SAM weights: measured on the tiny random
model of the tests (same SAM tensors, random HQ tensors), relative L2 difference 0.30-0.31 and
cosine 0.95 (``tests/test_sam_hq.py`` prints it; removing the HQ query gives SAM's token
exactly). Random weights say nothing of the trained files' size of the change; either way a
head trained on SAM's tokens is not a head for SAM-HQ's (the checkpoint's pair). Masks are what
the package's ``SamPredictor`` gives with ``multimask_output=False, hq_token_only=False`` (SAM's
mask 0 plus the HQ mask, as logits), and the predicted IoU is SAM's IoU head on the IoU token.
"""

import logging
import warnings
from typing import Dict, Tuple

import torch
from torch import nn

from ..weights_files import WeightsError, localizer_architecture, require_file
from .position_tokens import BoxPrompts, SamPositionTokens

logger = logging.getLogger(__name__)

SAM_HQ_KEY = "MODEL.REGIONSPOT.SAM_WEIGHTS"


def hq_package():
    """``segment_anything_hq``, imported without the warnings its light model's module raises on
    import (timm's deprecated ``timm.models.layers`` path, its TinyViT names re-registered in
    timm's registry); nothing of the package is changed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Overwriting tiny_vit", category=UserWarning)
        import segment_anything_hq
        import segment_anything_hq.modeling  # noqa: F401
    return segment_anything_hq


def build_sam_hq(arch: Dict[str, object]) -> nn.Module:
    """Build an (untrained) ``segment_anything_hq.modeling.Sam`` with the HQ mask decoder.

    The same hyper-parameters as ``segment_anything_hq.build_sam._build_sam`` (SAM's prompt
    encoder and two-way transformer: depth 2, 8 heads, MLP 2048), the image encoder's read from
    the file (:func:`regionspot.weights_files.sam_hq_architecture`, with ``vit_dim``).
    """
    from .weights import build_sam

    hq_package()
    return build_sam(arch, hq=True)


def _names(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_sam_hq(path: str) -> nn.Module:
    """Load a frozen SAM-HQ (``segment_anything_hq.modeling.Sam``, eval mode, float32, CPU).

    Args:
        path: an official ``sam_hq_vit_{b,l,h}.pth`` (https://huggingface.co/lkeab/hq-sam) or a
            file in the same format (:func:`regionspot.testing.random_backbones.write_random_sam_hq`).

    Raises:
        WeightsError (one line naming the file and ``MODEL.REGIONSPOT.SAM_WEIGHTS``): missing or
            unreadable; a plain SAM file (use ``LOCALIZER sam``); the light HQ-SAM (TinyViT
            encoder, ``sam_hq_vit_tiny.pth``), which is not supported; keys missing, unexpected
            (named) or of other shapes.
    """
    from .weights import _torch_load

    path = require_file(path, "SAM")
    state = _torch_load(path, "SAM-HQ")
    if not isinstance(state, dict):
        raise WeightsError(f"SAM-HQ weights file {path!r} ({SAM_HQ_KEY}) does not hold a state dict")
    if any(k.startswith("image_encoder.layers.") for k in state):
        raise WeightsError(f"{path} ({SAM_HQ_KEY}) is the light HQ-SAM (TinyViT image encoder, sam_hq_vit_tiny.pth), "
                           "which LOCALIZER sam_hq does not support: use sam_hq_vit_b, _l or _h")
    arch = localizer_architecture("sam_hq", state, path)
    sam = build_sam_hq(arch)
    try:
        result = sam.load_state_dict(state, strict=False)  # checked below, naming the keys
    except RuntimeError as e:  # shape mismatches
        detail = " ".join(str(e).split())
        raise WeightsError(f"SAM-HQ weights file {path!r} ({SAM_HQ_KEY}) does not match SAM-HQ's layout: "
                           f"{detail[:400]}") from e
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing keys {_names(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected keys {_names(result.unexpected_keys)}")
        raise WeightsError(f"SAM-HQ weights file {path!r} ({SAM_HQ_KEY}) does not match SAM-HQ's layout: "
                           + "; ".join(parts))
    logger.info("Loaded SAM-HQ from %s (%s)", path, arch)
    return sam.requires_grad_(False)


class SamHqPositionTokens(SamPositionTokens):
    """RegionSpot's localizer on SAM-HQ: position-aware tokens, masks and IoU of box prompts.

    SAM-HQ is SAM with one more decoder: it implements the localizer interface
    (:class:`~.localizer.Localizer`) through SAM's class, whose ViT code path it shares
    (preprocessing, box and click frames, mask prompts and pasting, SDPA attention:
    :mod:`.fast_attention` switches its blocks). The image embedding is a dict (see
    :meth:`encode_images`), and :meth:`decode_prompts` runs ``MaskDecoderHQ``'s steps for
    prompts of several images at once.

    Memory: tokens alone (training, the SAM-token cache) cost what SAM's do. With masks, each box
    also holds its copy of its image's HQ features and ``embedding_maskfeature``'s maps, at 4g x 4g
    like SAM's upscaled embedding. That is 32 + 64 + 32 channels more than SAM's 32, about 4x
    SAM's per-box mask memory (8 MB per box and map of 32 channels at g = 64 in float32), as in
    the package's own decoder: lower ``BOX_CHUNK_SIZE`` if masks of many boxes do not fit.

    Args:
        sam: a ``segment_anything_hq.modeling.Sam`` with ``MaskDecoderHQ`` (:func:`load_sam_hq`).
        other arguments: as :class:`SamPositionTokens`.
    """

    family = "sam_hq"
    onnx_embedding_names = ("image", "interm")  # encode_images' dict, exported in this order

    def __init__(self, sam: nn.Module, *args, **kwargs):
        MaskDecoderHQ = hq_package().modeling.MaskDecoderHQ

        if not isinstance(getattr(sam, "mask_decoder", None), MaskDecoderHQ):
            raise ValueError(f"SamHqPositionTokens needs a SAM-HQ model (MaskDecoderHQ), got "
                             f"{type(getattr(sam, 'mask_decoder', sam)).__name__}")
        super().__init__(sam, *args, **kwargs)

    def encode_images(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """SAM-HQ's image side, computed once per image.

        Args:
            pixels: (B, 3, S, S) float32 from :meth:`preprocess`.

        Returns:
            ``{"image": (B, 256, g, g) image embeddings, "interm": (B, g, g, vit_dim)}``:
            ``interm`` is the output of the image encoder's first global-attention block, the
            early ViT features the HQ decoder reads (``interm_embeddings[0]`` of the package).
        """
        image, interm = self.sam.image_encoder(pixels)
        return {"image": image, "interm": interm[0]}

    def hq_features(self, image_embeddings: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The HQ features of B images (``MaskDecoderHQ.forward``'s first step).

        Returns:
            (B, 256 / 8, 4g, 4g): ``embedding_encoder(image) + compress_vit_feat(interm)``.
        """
        decoder = self.sam.mask_decoder
        vit_features = image_embeddings["interm"].permute(0, 3, 1, 2)
        return decoder.embedding_encoder(image_embeddings["image"]) + decoder.compress_vit_feat(vit_features)

    def decode_prompts(self, image_embeddings: Dict[str, torch.Tensor], sparse: torch.Tensor, dense: torch.Tensor,
                       image_index: torch.Tensor, with_masks: bool) -> BoxPrompts:
        """SAM-HQ's single-mask HQ decoder on n encoded prompts (boxes, or clicks and masks from
        ``prompt_points``).

        ``MaskDecoderHQ.forward`` with ``multimask_output=False, hq_token_only=False``, except
        that each prompt reads its own image's embedding and HQ features
        (``[image_index]``) and only mask token 0 and the HQ token are turned into masks.

        Args:
            image_embeddings: ``{"image": (B, 256, g, g), "interm": (B, g, g, vit_dim)}``.
            sparse, dense: the prompt encoder's (n, k, 256) and (n, 256, g, g) embeddings.
            image_index: (n,) int64, the image of each prompt.
        """
        decoder = self.sam.mask_decoder
        n = sparse.shape[0]
        # [IoU token, 4 mask tokens, HQ token] as in MaskDecoderHQ.predict_masks, then the prompt
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight, decoder.hf_token.weight])
        queries = torch.cat([output_tokens[None].expand(n, -1, -1), sparse], dim=1)
        embeddings = image_embeddings["image"]
        source = embeddings[image_index] + dense
        image_pe = self.sam.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1)
        hs, keys = decoder.transformer(source, image_pe, queries)
        mask_token = hs[:, 1]  # mask token 0
        hyper = self.hypernetwork(mask_token) if with_masks else None
        token = self.select_token(mask_token, sparse, hyper)
        if not with_masks:
            return BoxPrompts(token.float(), None, None)
        _, c, h, w = source.shape
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(n, c, h, w))
        masks_sam = (hyper[:, None, :] @ upscaled.flatten(2)).view(n, 1, *upscaled.shape[-2:])
        # HQ features of the chunk's images only, then one per box
        images, per_box = torch.unique(image_index, return_inverse=True)
        hq = self.hq_features({k: v[images] for k, v in image_embeddings.items()})[per_box]
        upscaled_hq = decoder.embedding_maskfeature(upscaled) + hq
        hq_hyper = decoder.hf_mlp(hs[:, 1 + decoder.mask_tokens.num_embeddings])  # the HQ token
        masks_hq = (hq_hyper[:, None, :] @ upscaled_hq.flatten(2)).view(n, 1, *upscaled.shape[-2:])
        iou = decoder.iou_prediction_head(hs[:, 0])[:, 0]
        return BoxPrompts(token.float(), (masks_sam + masks_hq).float(), iou.float())

    def mask_generator(self, settings: Dict[str, object], image_shape: Tuple[int, int],
                       embedding: Dict[str, torch.Tensor], input_size: Tuple[int, int]):
        """SAM-HQ's automatic mask generator (``sam_auto``) for one image already encoded:
        ``segment_anything_hq.SamAutomaticMaskGenerator`` counting its filters, with the
        package's ``SamPredictor`` reusing ``embedding`` (``{"image": (256, g, g), "interm":
        (g, g, vit_dim)}``) instead of running the image encoder again.

        Args: as :meth:`SamPositionTokens.mask_generator`.
        """
        package = hq_package()
        from .proposals.sam_auto import counting_mask_generator_class, embedded_predictor

        generator_class = counting_mask_generator_class(package.SamAutomaticMaskGenerator)
        generator = generator_class(self.sam, output_mode="binary_mask", **settings)
        generator.predictor = embedded_predictor(package.SamPredictor, self.sam, image_shape, embedding, input_size)
        return generator
