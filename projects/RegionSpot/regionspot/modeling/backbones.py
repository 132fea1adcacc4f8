"""Which frozen foundation models RegionSpot joins: the localizer and the vision-language model.

The paper calls RegionSpot generic (Fig. 1c, Sec. 1): any promptable localization model and
any vision-language model, joined by the trained head. Each family is a builder registered in
one of two Detectron2 registries and chosen by a config key, so that a new family is one
registered function and a yaml line, and ``RegionSpot.from_config`` never names a model:

- ``MODEL.REGIONSPOT.LOCALIZER`` (:data:`LOCALIZER_REGISTRY`): ``"sam"`` (SAM ViT-B/L/H from
  ``SAM_WEIGHTS``, architecture read from the file; the released pair), ``"sam_hq"`` (SAM-HQ
  ViT-B/L/H from its official files, :mod:`.sam_hq`) or ``"sam2"`` (SAM 2 / 2.1 Hiera models,
  :mod:`.sam2_localizer`). A builder takes the config and returns a
  :class:`~regionspot.modeling.localizer.Localizer` (the interface every family implements:
  ``encode``, ``prompt``, ``prompt_points``, ``paste_masks``, ``mask_generator`` for the
  ``sam_auto`` proposal source, ``token_dim``, ``input_size``, ``pair_name``); its family's
  weights-file reader (the SAM-token cache's identity) is registered with it
  (``register_localizer(name, architecture=fn)``) unless ``weights_files`` holds it already.
- ``MODEL.REGIONSPOT.VL_MODEL`` (:data:`VL_MODEL_REGISTRY`): ``"openai_clip"`` (OpenAI CLIP
  ViT from ``CLIP_WEIGHTS``, the released pair) or ``"open_clip"`` (an OpenCLIP model with
  OpenCLIP's own ViT or a timm ViT / Eva image tower such as SigLIP or EVA02,
  :mod:`.open_clip_model`). A builder takes the config and returns a
  :class:`VisionLanguageModel`: the semantic encoder (image -> semantic feature map, with
  ``width`` and ``embed_dim``) and the text classifier (vocabulary -> text embeddings in the
  same embedding space), which share the one frozen model.

The head's widths follow what the builders return (token width, feature-map width, text
embedding width), so a pair of other models gives a head of other shapes.
"""

import logging
from typing import Callable, Dict, NamedTuple, Optional

from detectron2.utils.registry import Registry
from torch import nn

from ..config_defaults import ConfigError
from ..weights_files import register_architecture_reader
from .localizer import Localizer

logger = logging.getLogger(__name__)

LOCALIZER_REGISTRY = Registry("REGIONSPOT_LOCALIZER")
LOCALIZER_REGISTRY.__doc__ = "Localizer builders: fn(cfg) -> Localizer (MODEL.REGIONSPOT.LOCALIZER)."

VL_MODEL_REGISTRY = Registry("REGIONSPOT_VL_MODEL")
VL_MODEL_REGISTRY.__doc__ = ("Vision-language model builders: fn(cfg) -> VisionLanguageModel "
                             "(MODEL.REGIONSPOT.VL_MODEL).")


class VisionLanguageModel(NamedTuple):
    """What a vision-language model builder returns: two views of one frozen model.

    Attributes:
        semantic_encoder: a :class:`~regionspot.modeling.semantic_features.SemanticEncoder`
            (``encode(images, clip_inputs) -> (B, L, D)``, ``width`` (D), ``embed_dim`` (E)):
            ``ClipSemanticFeatures`` or ``TimmSemanticFeatures``.
        text_classifier: ``embed(names) -> (C, E)`` and the rest of
            :class:`~regionspot.modeling.text_classifier.TextClassifier`.
        identity: the family and architecture (``"openai_clip"``, ``"open_clip:<name>"``),
            recorded in checkpoints: a head trained on one embedding space is refused on another.
    """

    semantic_encoder: nn.Module
    text_classifier: object
    identity: str = "openai_clip"


def register_localizer(name: str, architecture: Optional[Callable[[Dict], Dict[str, object]]] = None):
    """Decorator: register ``fn(cfg) -> Localizer`` as the ``MODEL.REGIONSPOT.LOCALIZER`` family
    ``name``: the one registration a new family needs.

    Args:
        name: the config value.
        architecture: optional ``fn(state_dict) -> dict`` reading the family's weights files
            (with ``"out_chans"``, the mask decoder's width), registered with
            :func:`~regionspot.weights_files.register_architecture_reader` for the SAM-token
            cache's identity (SAM's, SAM-HQ's and SAM 2's readers live in ``weights_files``).
    """
    if architecture is not None:
        register_architecture_reader(name)(architecture)
    return _register(LOCALIZER_REGISTRY, name)


def register_vl_model(name: str):
    """Decorator: register ``fn(cfg) -> VisionLanguageModel`` as the ``MODEL.REGIONSPOT.VL_MODEL``
    family ``name``."""
    return _register(VL_MODEL_REGISTRY, name)


def _register(registry: Registry, name: str):
    def decorator(fn):
        # fvcore's Registry.register keys by the function's __name__; families are keyed by the
        # config value instead ("sam", "openai_clip"), so register under that name.
        registry._do_register(name, fn)
        return fn

    return decorator


def _lookup(registry: Registry, key: str, name: str):
    if name not in registry:
        known = ", ".join(repr(k) for k, _ in sorted(registry))
        raise ConfigError(f"{key} {name!r} is not a known model family (known: {known})")
    return registry.get(name)


def build_localizer(cfg) -> Localizer:
    """The localizer named by ``MODEL.REGIONSPOT.LOCALIZER``, built from the config; its
    ``family`` is that name (its :attr:`~.localizer.Localizer.pair_name` in checkpoints).

    Raises:
        ConfigError: an unknown name (the message names the key and the known families).
        TypeError: the family's builder returned something that is not a :class:`Localizer`.
    """
    name = cfg.MODEL.REGIONSPOT.LOCALIZER
    localizer = _lookup(LOCALIZER_REGISTRY, "MODEL.REGIONSPOT.LOCALIZER", name)(cfg)
    if not isinstance(localizer, Localizer):
        raise TypeError(f"the builder of MODEL.REGIONSPOT.LOCALIZER {name!r} returned a {type(localizer).__name__}, "
                        f"not a regionspot.modeling.localizer.Localizer")
    localizer.family = name
    return localizer


def build_vl_model(cfg) -> VisionLanguageModel:
    """The vision-language model named by ``MODEL.REGIONSPOT.VL_MODEL``, built from the config.

    Raises:
        ConfigError: an unknown name (the message names the key and the known families).
    """
    return _lookup(VL_MODEL_REGISTRY, "MODEL.REGIONSPOT.VL_MODEL", cfg.MODEL.REGIONSPOT.VL_MODEL)(cfg)


@register_localizer("sam")
def build_sam_localizer(cfg) -> Localizer:
    """SAM (``segment_anything``) from ``SAM_WEIGHTS``: the released RegionSpot's localizer.

    The position-aware token is ``TOKEN_SOURCE`` (mask token 0 after the mask decoder's
    transformer, as released); ``BOX_CHUNK_SIZE``, ``ENCODER_PRECISION`` and ``SAM_ATTENTION``
    are the part's speed switches, ``COMPILE`` compiles its image encoder.
    """
    from .position_tokens import SamPositionTokens
    from .weights import load_sam

    return _vit_sam_localizer(cfg, load_sam, SamPositionTokens, "SAM")


def _vit_sam_localizer(cfg, load, localizer_class, what: str) -> Localizer:
    """A localizer around a ViT SAM (SAM, SAM-HQ) loaded from ``SAM_WEIGHTS``, with the part's
    switches; warns when the loader's resize (``SAM_INPUT_SIZE``) is not the model's input."""
    rs = cfg.MODEL.REGIONSPOT
    sam = load(rs.SAM_WEIGHTS)
    if rs.LOADER_RESIZE and rs.SAM_INPUT_SIZE != sam.image_encoder.img_size:
        logger.warning("MODEL.REGIONSPOT.SAM_INPUT_SIZE is %d but this %s's input is %d px: the loader's "
                       "resize is not used and the model resizes each image again; set SAM_INPUT_SIZE %d",
                       rs.SAM_INPUT_SIZE, what, sam.image_encoder.img_size, sam.image_encoder.img_size)
    return _compiled(cfg, localizer_class(sam, rs.TOKEN_SOURCE, rs.BOX_CHUNK_SIZE, rs.ENCODER_PRECISION,
                                          rs.SAM_ATTENTION))


def _compiled(cfg, part: nn.Module) -> nn.Module:
    """``part`` with its image encoder compiled when ``MODEL.REGIONSPOT.COMPILE`` asks."""
    if cfg.MODEL.REGIONSPOT.COMPILE:
        part.compile_encoder()
    return part


@register_localizer("sam2")
def build_sam2_localizer(cfg) -> Localizer:
    """SAM 2 / SAM 2.1 (``sam2`` package) from ``SAM_WEIGHTS`` (an official
    ``sam2.1_hiera_{tiny,small,base_plus,large}.pt``; the package config chosen from its tensors,
    or ``SAM2_CONFIG``), :mod:`.sam2_localizer`. Same token sources, box chunks, precision and
    ``COMPILE`` as SAM; its images are resized to its square input by the localizer itself
    (the data mapper's ``LOADER_RESIZE`` keeps SAM's aspect ratio and is not used)."""
    from .sam2_localizer import Sam2PositionTokens, load_sam2

    rs = cfg.MODEL.REGIONSPOT
    model, arch = load_sam2(rs.SAM_WEIGHTS, rs.SAM2_CONFIG)
    return _compiled(cfg, Sam2PositionTokens(model, rs.TOKEN_SOURCE, rs.BOX_CHUNK_SIZE, rs.ENCODER_PRECISION,
                                             rs.SAM_ATTENTION, identity=arch))


@register_localizer("sam_hq")
def build_sam_hq_localizer(cfg) -> Localizer:
    """SAM-HQ (``segment_anything_hq``) from ``SAM_WEIGHTS`` (``sam_hq_vit_{b,l,h}.pth``, loaded
    strictly, architecture read from the file; :mod:`.sam_hq`). The token is mask token 0 after
    the HQ decoder's two-way transformer (``TOKEN_SOURCE`` as for SAM); masks are SAM's mask
    plus the HQ mask; the speed switches are SAM's (its image encoder is SAM's ViT)."""
    from .sam_hq import SamHqPositionTokens, load_sam_hq

    return _vit_sam_localizer(cfg, load_sam_hq, SamHqPositionTokens, "SAM-HQ")


@register_vl_model("openai_clip")
def build_openai_clip(cfg) -> VisionLanguageModel:
    """OpenAI CLIP (``clip`` package, TorchScript or state-dict file) from ``CLIP_WEIGHTS``: the
    released RegionSpot's vision-language model. Its image tower gives the semantic feature map
    at ``CLIP_INPUT_SIZE``; its text tower, the text embeddings (prompt ensemble,
    ``CLASS_NAME_STYLE``, ``TEXT_CACHE_DIR``)."""
    from .semantic_features import ClipSemanticFeatures
    from .text_classifier import TextClassifier
    from .weights import load_clip

    rs = cfg.MODEL.REGIONSPOT
    clip_model = load_clip(rs.CLIP_WEIGHTS)
    semantic_encoder = _compiled(cfg, ClipSemanticFeatures(clip_model, rs.CLIP_INPUT_SIZE, rs.USE_CLASS_TOKEN,
                                                           rs.CLIP_RESIZE_ANTIALIAS, rs.ENCODER_PRECISION))
    return VisionLanguageModel(semantic_encoder, TextClassifier.from_config(cfg, clip_model), "openai_clip")


@register_vl_model("open_clip")
def build_open_clip(cfg) -> VisionLanguageModel:
    """An OpenCLIP model with a ViT image tower (``open_clip`` package) from ``CLIP_WEIGHTS`` (a
    hub-layout folder, or a file with ``OPENCLIP_MODEL``; :mod:`.open_clip_model`): OpenCLIP's
    own ViT (:class:`.ClipSemanticFeatures`) or a timm ViT / Eva tower such as SigLIP or EVA02
    (:class:`.TimmSemanticFeatures`). Its image tower gives the semantic feature map at
    ``CLIP_INPUT_SIZE`` (OpenCLIP's ViT: the positional embedding resized as for OpenAI CLIP;
    timm: timm's ``set_input_size``) with its own pixel normalisation; its text tower and
    tokenizer, the text embeddings (same prompt ensemble, class-name style and cache; the cache
    identity names the architecture and the weights file)."""
    from .open_clip_model import load_open_clip
    from .semantic_features import ClipSemanticFeatures, TimmSemanticFeatures
    from .text_classifier import TextClassifier
    from .text_embeddings import weights_fingerprint

    rs = cfg.MODEL.REGIONSPOT
    loaded = load_open_clip(rs.CLIP_WEIGHTS, rs.OPENCLIP_MODEL, rs.OPENCLIP_TOKENIZER)
    encoder_class = TimmSemanticFeatures if loaded.tower == "timm" else ClipSemanticFeatures
    semantic_encoder = _compiled(cfg, encoder_class(loaded.model, rs.CLIP_INPUT_SIZE, rs.USE_CLASS_TOKEN,
                                                    rs.CLIP_RESIZE_ANTIALIAS, rs.ENCODER_PRECISION,
                                                    pixel_mean=loaded.pixel_mean, pixel_std=loaded.pixel_std))
    text_classifier = TextClassifier.from_config(
        cfg, loaded.model, weights_id=f"open_clip:{loaded.name}:{weights_fingerprint(loaded.weights_file)}",
        tokenizer=loaded.tokenizer)
    return VisionLanguageModel(semantic_encoder, text_classifier, f"open_clip:{loaded.name}")
