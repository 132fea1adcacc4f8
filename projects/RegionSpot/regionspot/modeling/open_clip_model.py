"""OpenCLIP (``open_clip`` package) as RegionSpot's vision-language model (``VL_MODEL open_clip``).

Two kinds of image tower are accepted (:func:`check_image_tower`):

- OpenCLIP's own ViT (``open_clip.transformer.VisionTransformer``: patch embedding, class
  token, positional embedding, pre-LayerNorm, transformer, token pooling): its last block's
  tokens form the semantic feature map exactly as for OpenAI CLIP (class token first, before
  ``ln_post``/``proj``), so :class:`~regionspot.modeling.semantic_features.ClipSemanticFeatures`
  serves both;
- a timm ViT-family trunk in OpenCLIP's ``TimmModel`` (timm ``VisionTransformer``: SigLIP /
  SigLIP 2, attention-pooled (``global_pool='map'``) without a class token; timm ``Eva``:
  EVA02-CLIP, with a class token and rotary positions): the trunk's last block's tokens before
  its final norm (:class:`~regionspot.modeling.semantic_features.TimmSemanticFeatures`).

Refused with the reason: ResNets (``ModifiedResNet``), timm towers that are not ViTs (ConvNeXt,
ResNet, ...) or use OpenCLIP's 2-D attention pools, and OpenCLIP's own ViTs that pool by
attention or average instead of their class token.

Weights (``CLIP_WEIGHTS``), never downloaded:

- a folder in the layout OpenCLIP publishes on the Hugging Face hub (``open_clip_config.json``
  with ``model_cfg`` and ``preprocess_cfg``, and ``open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``): the architecture, the pixel normalisation and the tokenizer
  are read from the folder (``open_clip.create_model("local-dir:<folder>")``);
- or a weights file with ``OPENCLIP_MODEL`` naming one of OpenCLIP's built-in architectures
  (``open_clip.create_model(OPENCLIP_MODEL, pretrained=<file>)``), e.g. ``ViT-B-16`` with a
  LAION-2B ``open_clip_pytorch_model.bin``.

The tokenizer is the model's own (``open_clip.get_tokenizer``). A tokenizer that OpenCLIP
would fetch from the hub (``hf_tokenizer_name`` in the config) is read from a local folder
(``OPENCLIP_TOKENIZER``); without one the error names that key.
"""

import json
import os
from typing import Callable, NamedTuple, Optional, Tuple

from torch import nn

from ..weights_files import WeightsError

CONFIG_FILE = "open_clip_config.json"


class OpenClipModel(NamedTuple):
    """A loaded OpenCLIP model and what RegionSpot needs beside it.

    Attributes:
        model: the ``open_clip`` CLIP module (eval mode, float32, frozen).
        tokenizer: ``fn(list of str) -> (N, context_length) int64`` token ids.
        pixel_mean, pixel_std: the model's image normalisation (RGB, for pixels in [0, 1]).
        weights_file: the weights file loaded (for the cache identity).
        name: the architecture (built-in name, or the folder's).
        tower: the image tower's kind, ``"vit"`` (OpenCLIP's own ViT) or ``"timm"`` (a timm
            ViT / Eva trunk); :func:`check_image_tower`.
    """

    model: nn.Module
    tokenizer: Callable
    pixel_mean: Tuple[float, float, float]
    pixel_std: Tuple[float, float, float]
    weights_file: str
    name: str
    tower: str = "vit"


def _find_weights(folder: str) -> Optional[str]:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def check_image_tower(model: nn.Module, where: str) -> str:
    """Which semantic encoder an OpenCLIP model's image tower takes, or a refusal.

    Returns:
        ``"vit"``: OpenCLIP's own class-token ViT (``open_clip.transformer.VisionTransformer``,
        :class:`~regionspot.modeling.semantic_features.ClipSemanticFeatures`); ``"timm"``: a timm
        ViT-family trunk in OpenCLIP's ``TimmModel`` (timm ``VisionTransformer``, e.g. SigLIP, or
        ``Eva``, e.g. EVA02; :class:`~regionspot.modeling.semantic_features.TimmSemanticFeatures`).

    Raises:
        WeightsError: (one line naming ``where`` and ``CLIP_WEIGHTS``) a ResNet (``ModifiedResNet``),
            a timm tower that is not a ViT (ConvNeXt, ResNet, ...) or has OpenCLIP's 2-D attention
            pool, an OpenCLIP ViT that pools with attention or an average instead of its class token.
    """
    visual = getattr(model, "visual", None)
    kind = type(visual).__name__
    if hasattr(visual, "trunk"):  # open_clip.timm_model.TimmModel
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer

        trunk = visual.trunk
        if not isinstance(trunk, (VisionTransformer, Eva)):
            raise WeightsError(f"{where}: its timm image tower is {type(trunk).__name__}, not a ViT: MODEL.REGIONSPOT."
                               "VL_MODEL open_clip takes OpenCLIP's own ViT or a timm VisionTransformer / Eva tower "
                               "(e.g. ViT-B-16-SigLIP, EVA02-L-14)")
        if "pool" in getattr(visual, "head", {}):
            raise WeightsError(f"{where}: its timm tower pools with OpenCLIP's 2-D attention pool (timm_pool "
                               "abs_attn / rot_attn), a CNN head RegionSpot's semantic feature map does not support")
        return "timm"
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")
    missing = [name for name in needed if not hasattr(visual, name)]
    if missing:
        raise WeightsError(f"{where}: an OpenCLIP model without a ViT image tower ({kind}; "
                           f"lacks {', '.join(missing)}): MODEL.REGIONSPOT.VL_MODEL open_clip needs OpenCLIP's "
                           "own ViT (e.g. ViT-B-16, ViT-L-14) or a timm ViT tower (SigLIP, EVA02)")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise WeightsError(f"{where}: this OpenCLIP ViT pools with {getattr(visual, 'pool_type', 'attn_pool')!r}, "
                           "not its class token; RegionSpot's semantic feature map needs a class-token ViT")
    return "vit"


def load_open_clip(weights: str, model_name: str = "", tokenizer_dir: str = "") -> OpenClipModel:
    """Load an OpenCLIP model from local files (see the module docstring).

    Args:
        weights: ``CLIP_WEIGHTS``, a hub-layout folder or a weights file.
        model_name: ``OPENCLIP_MODEL``, a built-in architecture; required with a file, ignored
            with a folder (whose config says it).
        tokenizer_dir: ``OPENCLIP_TOKENIZER``, a local folder with a Hugging Face tokenizer, for
            models whose tokenizer OpenCLIP would download.

    Raises:
        WeightsError: a missing file or folder, a folder without config or weights, a file
            without ``OPENCLIP_MODEL``, an unknown architecture, weights that do not fit it, a
            tower that is not a class-token ViT, a hub tokenizer without ``OPENCLIP_TOKENIZER``.
    """
    import open_clip

    path = os.path.expanduser(weights)
    if os.path.isdir(path):
        config_file = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config_file):
            raise WeightsError(f"MODEL.REGIONSPOT.CLIP_WEIGHTS {weights!r} is a folder without {CONFIG_FILE}: an "
                               "OpenCLIP folder holds the config and the weights as published on the hub")
        weights_file = _find_weights(path)
        if weights_file is None:
            raise WeightsError(f"MODEL.REGIONSPOT.CLIP_WEIGHTS {weights!r} holds {CONFIG_FILE} but no "
                               "open_clip_model.safetensors / open_clip_pytorch_model.bin")
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        name, spec, kwargs = os.path.basename(os.path.normpath(path)), f"local-dir:{path}", {}
        text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
    elif os.path.isfile(path):
        if not model_name:
            raise WeightsError(f"MODEL.REGIONSPOT.CLIP_WEIGHTS {weights!r} is a weights file: set "
                               "MODEL.REGIONSPOT.OPENCLIP_MODEL to its architecture (e.g. ViT-B-16), or give the "
                               f"folder with {CONFIG_FILE}")
        if model_name not in open_clip.list_models():
            raise WeightsError(f"MODEL.REGIONSPOT.OPENCLIP_MODEL {model_name!r} is not an OpenCLIP architecture")
        weights_file, name, spec, kwargs = path, model_name, model_name, {"pretrained": path}
        text_cfg = open_clip.get_model_config(model_name).get("text_cfg", {})
    else:
        raise WeightsError(f"MODEL.REGIONSPOT.CLIP_WEIGHTS {weights!r} does not exist (an OpenCLIP folder or "
                           "weights file)")
    hub_tokenizer = text_cfg.get("hf_tokenizer_name")
    if hub_tokenizer and not tokenizer_dir:
        raise WeightsError(f"{name}: its tokenizer {hub_tokenizer!r} lives on the Hugging Face hub; set "
                           "MODEL.REGIONSPOT.OPENCLIP_TOKENIZER to a local folder holding it")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(spec, **kwargs)
    except (RuntimeError, ValueError, KeyError) as e:
        raise WeightsError(f"MODEL.REGIONSPOT.CLIP_WEIGHTS {weights!r} could not be loaded as OpenCLIP {name}: "
                           f"{' '.join(str(e).split())[:300]}") from None
    tower = check_image_tower(model, f"MODEL.REGIONSPOT.CLIP_WEIGHTS {weights!r} (OpenCLIP {name})")
    if hub_tokenizer:
        # as open_clip.get_tokenizer builds it, with the config's tokenizer_kwargs (SigLIP's
        # clean="canonicalize") and tokenizer_mode, from the local folder instead of the hub
        try:
            tokenizer = open_clip.tokenizer.HFTokenizer(
                os.path.expanduser(tokenizer_dir), context_length=model.context_length,
                tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))
        except ImportError as e:
            raise WeightsError(f"MODEL.REGIONSPOT.OPENCLIP_TOKENIZER {tokenizer_dir!r}: a Hugging Face tokenizer "
                               f"needs the transformers package: pip install -e .[hub-tokenizers] ({e})") from None
    else:
        tokenizer = open_clip.get_tokenizer(spec if spec.startswith("local-dir:") else model_name)
    normalize = [t for t in getattr(preprocess, "transforms", []) if type(t).__name__ == "Normalize"]
    mean = tuple(float(v) for v in (normalize[0].mean if normalize else open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in (normalize[0].std if normalize else open_clip.OPENAI_DATASET_STD))
    model = model.float().eval().requires_grad_(False)
    return OpenClipModel(model, tokenizer, mean, std, weights_file, name, tower)
