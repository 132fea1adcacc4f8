"""Loading the frozen foundation models from their official weight files.

RegionSpot never downloads weights: the config points to local copies of the files that
Meta (SAM) and OpenAI (CLIP) publish. The architecture is read from the file itself, so the
same code loads the official ViT-B/L/H SAM and ViT-B/16, ViT-L/14, ViT-L/14@336px CLIP, and
the small random models that :mod:`regionspot.testing.random_backbones` writes in exactly
those formats for tests and the CPU sample.

Formats (as published):
- SAM ``sam_vit_{b,l,h}_*.pth``: a plain ``torch.save`` of the ``Sam`` state dict
  (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
- CLIP ``ViT-*.pt``: a TorchScript archive; ``clip.load(path, jit=False)`` rebuilds an
  ``nn.Module`` from its state dict. A plain state-dict file is accepted too.
"""

import logging
from functools import partial
from typing import Dict

import torch
from torch import nn

from ..weights_files import (  # noqa: F401  (shared with the SAM-token cache; re-exported)
    CLIP_WEIGHTS_NAMES,
    SAM_WEIGHTS_URLS,
    WeightsError,
    require_file,
    sam_architecture,
)

logger = logging.getLogger(__name__)


def _torch_load(path: str, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and EOF errors of a corrupt or foreign file
        raise WeightsError(f"cannot read {what} weights file {path!r}: {type(e).__name__}: {e}") from e


def build_sam(arch: Dict[str, object], hq: bool = False) -> nn.Module:
    """Build an (untrained) ``segment_anything.modeling.Sam`` for the given encoder hyper-parameters.

    The prompt encoder and mask decoder are SAM's standard ones (prompt dim ``out_chans``,
    two-way transformer depth 2, 8 heads, MLP 2048), as in ``segment_anything.build_sam``.
    With ``hq``, SAM-HQ's: ``segment_anything_hq``'s modules and its ``MaskDecoderHQ`` reading
    ViT features of width ``arch["vit_dim"]``, as ``segment_anything_hq.build_sam`` builds it
    (import the package through :func:`regionspot.modeling.sam_hq.hq_package` first).
    """
    if hq:
        from segment_anything_hq.modeling import ImageEncoderViT, PromptEncoder, Sam, TwoWayTransformer
        from segment_anything_hq.modeling import MaskDecoderHQ as MaskDecoder

        decoder_args = {"vit_dim": arch["vit_dim"]}
    else:
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

        decoder_args = {}
    img_size, patch_size, dim = arch["img_size"], arch["patch_size"], arch["out_chans"]
    grid = img_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch["depth"],
            embed_dim=arch["embed_dim"],
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=arch["num_heads"],
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(arch["global_attn_indexes"]),
            window_size=arch["window_size"],
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            **decoder_args,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def load_sam(path: str) -> nn.Module:
    """Load a frozen SAM (``segment_anything.modeling.Sam``, eval mode, float32, CPU) from a file.

    Args:
        path: an official ``sam_vit_{b,l,h}_*.pth`` or a file in the same format.

    Raises:
        WeightsError: missing, unreadable, or not a SAM state dict (keys or shapes differ); a
            SAM-HQ or SAM 2 file (one line saying to set ``LOCALIZER sam_hq`` / ``sam2``).
    """
    path = require_file(path, "SAM")
    state = _torch_load(path, "SAM")
    if not isinstance(state, dict):
        raise WeightsError(f"SAM weights file {path!r} does not hold a state dict")
    if "mask_decoder.hf_token.weight" in state:
        raise WeightsError(f"{path} (MODEL.REGIONSPOT.SAM_WEIGHTS) is a SAM-HQ file (its mask decoder has the HQ "
                           "token mask_decoder.hf_token), not a plain SAM file: set MODEL.REGIONSPOT.LOCALIZER sam_hq")
    inner = state.get("model") if isinstance(state.get("model"), dict) else state
    if any(k.startswith("image_encoder.trunk.") for k in inner):
        raise WeightsError(f"{path} (MODEL.REGIONSPOT.SAM_WEIGHTS) is a SAM 2 file (a Hiera image encoder), not a "
                           "SAM file: set MODEL.REGIONSPOT.LOCALIZER sam2")
    arch = sam_architecture(state)
    sam = build_sam(arch)
    try:
        sam.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"SAM weights file {path!r} does not match SAM's layout: {e}") from e
    logger.info("Loaded SAM from %s (%s)", path, arch)
    return sam.requires_grad_(False)


def load_clip(path: str) -> nn.Module:
    """Load a frozen OpenAI CLIP (``clip.model.CLIP``, eval mode, float32, CPU) from a file.

    Uses ``clip.load(path, device="cpu", jit=False)``, which reads the official TorchScript
    archives and plain state dicts and infers the architecture from the tensors.

    Raises:
        WeightsError: missing, unreadable, or not a CLIP ViT checkpoint.
    """
    import clip

    path = require_file(path, "CLIP")
    try:
        model, _ = clip.load(path, device="cpu", jit=False)
    except Exception as e:
        raise WeightsError(f"cannot load CLIP weights file {path!r}: {type(e).__name__}: {e}") from e
    if not hasattr(model.visual, "conv1") or not hasattr(model.visual, "transformer"):
        raise WeightsError(f"CLIP weights file {path!r} is not a ViT CLIP (ResNet CLIPs are not supported)")
    logger.info("Loaded CLIP from %s (width %d, %d layers, %d px)", path, model.visual.conv1.out_channels,
                model.visual.transformer.layers, model.visual.input_resolution)
    return model.float().eval().requires_grad_(False)
