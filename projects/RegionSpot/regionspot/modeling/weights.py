"""Loading the frozen foundation models from their official weight files.

RegionSpot never downloads weights: the config points to local copies of the files that
Meta (SAM) and OpenAI (CLIP) publish. The architecture is read from the file itself, so the
same code loads the official ViT-B/L/H SAM and ViT-B/16, ViT-L/14, ViT-L/14@336px CLIP, and
the small random models that :mod:`regionspot.modeling.random_backbones` writes in exactly
those formats for tests and the CPU sample.

Formats (as published):
- SAM ``sam_vit_{b,l,h}_*.pth``: a plain ``torch.save`` of the ``Sam`` state dict
  (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
- CLIP ``ViT-*.pt``: a TorchScript archive; ``clip.load(path, jit=False)`` rebuilds an
  ``nn.Module`` from its state dict. A plain state-dict file is accepted too.
"""

import logging
import os
from functools import partial
from typing import Dict

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Where the official files are published; named in the error for a missing file.
SAM_WEIGHTS_URLS: Dict[str, str] = {
    "sam_vit_b_01ec64.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "sam_vit_l_0b3195.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "sam_vit_h_4b8939.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}
CLIP_WEIGHTS_NAMES: Dict[str, str] = {
    "ViT-B-16.pt": "ViT-B/16",
    "ViT-L-14.pt": "ViT-L/14",
    "ViT-L-14-336px.pt": "ViT-L/14@336px",
}


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable or does not hold the expected model."""


def _clip_url(file_name: str) -> str:
    import clip.clip as clip_module  # the package's own table of official download URLs

    name = CLIP_WEIGHTS_NAMES.get(file_name)
    return clip_module._MODELS.get(name, "https://github.com/openai/CLIP") if name else (
        "https://github.com/openai/CLIP (clip.available_models())"
    )


def require_file(path: str, what: str) -> str:
    """Return ``path`` if it is a readable file, else raise a :class:`WeightsError`.

    Args:
        path: local path from the config (``~`` is expanded).
        what: ``"SAM"`` or ``"CLIP"``, used to name the official file and its URL.

    Raises:
        WeightsError: the file does not exist; the message names the expected file, the
            config key and where the official copy is published.
    """
    path = os.path.expanduser(path or "")
    if path and os.path.isfile(path):
        return path
    base = os.path.basename(path)
    if what == "SAM":
        key = "MODEL.REGIONSPOT.SAM_WEIGHTS"
        url = SAM_WEIGHTS_URLS.get(base, "https://github.com/facebookresearch/segment-anything"
                                         "#model-checkpoints")
        expected = base if base in SAM_WEIGHTS_URLS else "sam_vit_b_01ec64.pth (or vit_l / vit_h)"
    else:
        key = "MODEL.REGIONSPOT.CLIP_WEIGHTS"
        url = _clip_url(base)
        expected = base if base in CLIP_WEIGHTS_NAMES else ", ".join(CLIP_WEIGHTS_NAMES)
    raise WeightsError(
        f"{what} weights file not found: {path!r} (set by {key}). Expected the official "
        f"file {expected}; download it from {url} and point {key} at it."
    )


def _torch_load(path: str, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and EOF errors of a corrupt or foreign file
        raise WeightsError(f"cannot read {what} weights file {path!r}: {type(e).__name__}: {e}") from e


def sam_architecture(state_dict: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Read the SAM image-encoder hyper-parameters from a SAM state dict.

    The official builders (``segment_anything.build_sam``) hard-code them per variant; here
    they come from tensor shapes, so vit_b/l/h and small random models share one path:
    embed_dim from the patch embedding, depth from the block count, head_dim from the
    relative position tables, global-attention blocks from the tables whose length is
    ``2 * grid - 1`` (window-attention blocks have ``2 * window - 1``).

    Returns:
        dict with embed_dim, depth, num_heads, global_attn_indexes, window_size, img_size,
        patch_size, out_chans.

    Raises:
        WeightsError: the dict is not a SAM state dict.
    """
    try:
        patch = state_dict["image_encoder.patch_embed.proj.weight"]  # (C, 3, p, p)
        pos = state_dict["image_encoder.pos_embed"]  # (1, grid, grid, C)
        out_chans = state_dict["image_encoder.neck.0.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"not a SAM state dict: key {e} is missing") from e
    embed_dim, patch_size, grid = patch.shape[0], patch.shape[-1], pos.shape[1]
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    global_idx, window = [], None
    head_dim = None
    for i in range(depth):
        table = state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"]  # (2 * size - 1, head_dim)
        head_dim = table.shape[1]
        size = (table.shape[0] + 1) // 2
        if size == grid:
            global_idx.append(i)
        else:
            window = size
    return dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attn_indexes=global_idx,
        window_size=window if window is not None else 14,
        img_size=grid * patch_size,
        patch_size=patch_size,
        out_chans=out_chans,
    )


def build_sam(arch: Dict[str, object]) -> nn.Module:
    """Build an (untrained) ``segment_anything.modeling.Sam`` for the given encoder hyper-parameters.

    The prompt encoder and mask decoder are SAM's standard ones (prompt dim ``out_chans``,
    two-way transformer depth 2, 8 heads, MLP 2048), as in ``segment_anything.build_sam``.
    """
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

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
        WeightsError: missing, unreadable, or not a SAM state dict (keys or shapes differ).
    """
    path = require_file(path, "SAM")
    state = _torch_load(path, "SAM")
    if not isinstance(state, dict):
        raise WeightsError(f"SAM weights file {path!r} does not hold a state dict")
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
