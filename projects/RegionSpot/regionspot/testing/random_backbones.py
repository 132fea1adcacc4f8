"""Randomly initialised SAM, SAM-HQ, CLIP and RPN, in memory or written in the official file formats.

No pretrained weights can be downloaded where this project is tested, so the tests, the CPU
sample job and the benchmark use randomly initialised backbones. They go through exactly the
loading code of the official files (:mod:`regionspot.modeling.weights`): SAM and SAM-HQ as
plain state-dict ``.pth`` files, CLIP as a TorchScript archive like OpenAI's ``ViT-*.pt`` (or a plain
state dict), an RPN as a Detectron2 checkpoint (``.pth``) or model-zoo pickle (``.pkl``).
Numbers computed with them measure the pipeline, never accuracy.
"""

import os
from typing import Dict

import torch
from torch import nn

from ..io import atomic_write
from ..modeling.weights import build_sam

# Image-encoder hyper-parameters: the official variants (segment_anything.build_sam) and a
# small one for CPU tests (~0.4M-parameter encoder, 256 px input, same prompt encoder/decoder).
SAM_PRESETS: Dict[str, Dict[str, object]] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=[7, 15, 23, 31]),
    "tiny": dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=[1], img_size=256),
}

# clip.model.CLIP arguments of OpenAI's ViT models and of a small one for CPU tests.
CLIP_PRESETS: Dict[str, Dict[str, int]] = {
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, transformer_width=512, transformer_heads=8,
                     transformer_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                     vision_patch_size=14, transformer_width=768, transformer_heads=12,
                     transformer_layers=12),
    "ViT-L/14@336px": dict(embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
                           vision_patch_size=14, transformer_width=768, transformer_heads=12,
                           transformer_layers=12),
    "tiny": dict(embed_dim=32, image_resolution=224, vision_layers=2, vision_width=64,
                 vision_patch_size=16, transformer_width=64, transformer_heads=1,
                 transformer_layers=2),
    # Tiny models of the ViT-L/14 family (patch 14, at 224 and 336 px) for the BL configs.
    "tiny-p14": dict(embed_dim=32, image_resolution=224, vision_layers=2, vision_width=64,
                     vision_patch_size=14, transformer_width=64, transformer_heads=1,
                     transformer_layers=2),
    "tiny-p14-336": dict(embed_dim=32, image_resolution=336, vision_layers=2, vision_width=64,
                         vision_patch_size=14, transformer_width=64, transformer_heads=1,
                         transformer_layers=2),
}


# The variants of the paper (and a small one for CPU tests), and other pairs of foundation models:
# (localizer, VL model, CLIP input side). A localizer is a SAM preset ("vit_b", SAM_PRESETS) or
# "<family>:<preset>" for SAM-HQ ("sam_hq:vit_b", SAM_PRESETS) and SAM 2.1 ("sam2:hiera_s",
# SAM2_PRESETS); a VL model is an OpenAI CLIP preset (CLIP_PRESETS) or "open_clip:<architecture>"
# (an OpenCLIP built-in architecture, or "tiny": OPEN_CLIP_PRESETS).
VARIANTS: Dict[str, tuple] = {
    "small": ("tiny", "tiny", 224),
    "bb": ("vit_b", "ViT-B/16", 224),
    "bl": ("vit_b", "ViT-L/14", 224),
    "bl336": ("vit_b", "ViT-L/14@336px", 336),
    "samhq_bl": ("sam_hq:vit_b", "ViT-L/14", 224),
    "sam2s_bl": ("sam2:hiera_s", "ViT-L/14", 224),
    "sam2s_openclip_l": ("sam2:hiera_s", "open_clip:ViT-L-14", 224),
    "small_samhq": ("sam_hq:tiny", "tiny", 224),
    "small_sam2": ("sam2:tiny", "tiny", 224),
    "small_openclip": ("tiny", "open_clip:tiny", 224),
}


def localizer_family(spec: str) -> tuple:
    """(family, preset) of a :data:`VARIANTS` localizer spec ("vit_b" -> ("sam", "vit_b"))."""
    family, _, preset = spec.rpartition(":")
    return family or "sam", preset


def random_localizer(spec: str, seed: int = 0, *, token_source: str = "transformer", box_chunk_size: int = 64,
                     precision: str = "auto", attention: str = "sdpa") -> nn.Module:
    """The localizer module of a :data:`VARIANTS` localizer spec around a RANDOM model."""
    family, preset = localizer_family(spec)
    if family == "sam":
        from ..modeling.position_tokens import SamPositionTokens

        return SamPositionTokens(random_sam(preset, seed=seed), token_source, box_chunk_size, precision, attention)
    if family == "sam_hq":
        from ..modeling.sam_hq import SamHqPositionTokens

        return SamHqPositionTokens(random_sam_hq(preset, seed=seed), token_source, box_chunk_size, precision,
                                   attention)
    if family == "sam2":
        from ..modeling.sam2_localizer import Sam2PositionTokens

        return Sam2PositionTokens(random_sam2(preset, seed=seed), token_source, box_chunk_size, precision, attention)
    raise ValueError(f"unknown localizer family {family!r} in {spec!r}")


def random_vl_model(spec: str, input_size: int, seed: int = 0, *, precision: str = "auto", with_text: bool = True):
    """(semantic encoder, text classifier) of a :data:`VARIANTS` VL spec around a RANDOM model
    (text classifier None without ``with_text``: a hub tokenizer, e.g. SigLIP's, is not fetched)."""
    from ..modeling.semantic_features import ClipSemanticFeatures
    from ..modeling.text_classifier import TextClassifier

    if not spec.startswith("open_clip:"):
        clip_model = random_clip(spec, seed=seed)
        return (ClipSemanticFeatures(clip_model, input_size, precision=precision),
                TextClassifier(clip_model, f"random-{spec}-seed{seed}"))
    import open_clip

    arch = spec.split(":", 1)[1]
    torch.manual_seed(seed)
    if arch in OPEN_CLIP_PRESETS:
        from open_clip.model import CLIP

        model, tokenizer_name = CLIP(**OPEN_CLIP_PRESETS[arch]).eval(), "ViT-B-16"
    else:
        model, tokenizer_name = open_clip.create_model(arch, pretrained=None).eval(), arch
    model.requires_grad_(False)
    from ..modeling.open_clip_model import check_image_tower
    from ..modeling.semantic_features import TimmSemanticFeatures

    encoder_class = TimmSemanticFeatures if check_image_tower(model, arch) == "timm" else ClipSemanticFeatures
    mean, std = getattr(model.visual, "image_mean", None), getattr(model.visual, "image_std", None)
    semantic = encoder_class(model, input_size, precision=precision,
                             **({"pixel_mean": mean, "pixel_std": std} if mean and std else {}))
    if not with_text:
        return semantic, None
    return semantic, TextClassifier(model, f"random-open_clip-{arch}-seed{seed}",
                                    tokenizer=open_clip.get_tokenizer(tokenizer_name))


def random_regionspot(variant: str = "small", seed: int = 0, *, mask_on: bool = False, protocol=None,
                      encoder_precision: str = "auto", sam_attention: str = "sdpa", box_chunk_size: int = 64,
                      token_source: str = "transformer"):
    """A RegionSpot model of a variant (:data:`VARIANTS`) with RANDOM SAM, CLIP and head, for
    benchmarks and tests: the real shapes and operations, meaningless outputs. Its parts are
    built as :meth:`~regionspot.modeling.meta_arch.RegionSpot.from_config` builds them (ground-
    truth proposals, no text cache)."""
    from ..modeling.head import RegionSpotHead
    from ..modeling.losses import RegionSpotCriterion
    from ..modeling.meta_arch import RegionSpot
    from ..modeling.proposals.generator import RegionProposalGenerator

    localizer_spec, vl_spec, clip_size = VARIANTS[variant]
    localizer = random_localizer(localizer_spec, seed, token_source=token_source, box_chunk_size=box_chunk_size,
                                 precision=encoder_precision, attention=sam_attention)
    semantic_encoder, text_classifier = random_vl_model(vl_spec, clip_size, seed, precision=encoder_precision)
    torch.manual_seed(seed)
    head = RegionSpotHead(localizer.token_dim, semantic_encoder.width, semantic_encoder.embed_dim)
    return RegionSpot(localizer=localizer, semantic_encoder=semantic_encoder, head=head,
                      proposal_generator=RegionProposalGenerator("gt", localizer=localizer),
                      text_classifier=text_classifier, criterion=RegionSpotCriterion(), protocol=protocol,
                      mask_on=mask_on, pair={"localizer": localizer_family(localizer_spec)[0],
                                             "vl_model": vl_spec.split(":")[0] if ":" in vl_spec else "openai_clip"})


def random_sam(preset: str = "tiny", seed: int = 0) -> nn.Module:
    """A randomly initialised ``segment_anything.modeling.Sam`` (eval mode, float32, CPU).

    Args:
        preset: a key of :data:`SAM_PRESETS` ("vit_b", "vit_l", "vit_h" or "tiny").
    """
    p = dict(SAM_PRESETS[preset])
    torch.manual_seed(seed)
    arch = dict(window_size=14, img_size=1024, patch_size=16, out_chans=256)
    arch.update(p)
    sam = build_sam(arch)
    # SAM initialises its relative-position tables to zero; the trained ones are not. Random
    # values make the relative-position term count in the tests and the benchmark.
    with torch.no_grad():
        for name, param in sam.image_encoder.named_parameters():
            if "rel_pos" in name:
                param.normal_(0.0, 0.02)
    return sam


def random_clip(preset: str = "tiny", seed: int = 0) -> nn.Module:
    """A randomly initialised OpenAI ``clip.model.CLIP`` (eval mode, float32, CPU).

    Args:
        preset: a key of :data:`CLIP_PRESETS`.
    """
    from clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(context_length=77, vocab_size=49408, **CLIP_PRESETS[preset])
    return model.float().eval()


def _atomic_save(obj, path: str, jit: bool = False) -> None:
    atomic_write(path, (lambda f: torch.jit.save(obj, f)) if jit else (lambda f: torch.save(obj, f)))


def write_random_sam(path: str, preset: str = "tiny", seed: int = 0) -> str:
    """Write a random SAM as a plain state-dict file, the format of ``sam_vit_b_01ec64.pth``."""
    _atomic_save(random_sam(preset, seed).state_dict(), path)
    return path


SAM2_TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sam2_tiny.yaml")
# SAM 2 presets: the tiny test model, or the sam2 package's official configs (random weights
# at the real architecture's size, for benchmarks).
SAM2_PRESETS = {
    "tiny": SAM2_TINY_CONFIG,
    "hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def random_sam2(preset: str = "tiny", seed: int = 0) -> nn.Module:
    """A randomly initialised SAM 2.1 (``sam2``'s ``SAM2Base``, eval mode, float32, CPU) of a
    :data:`SAM2_PRESETS` architecture."""
    from ..modeling.sam2_localizer import build_sam2_model, sam2_config_path

    torch.manual_seed(seed)
    return build_sam2_model(sam2_config_path(SAM2_PRESETS[preset]))


def write_random_sam2(path: str, preset: str = "tiny", seed: int = 0) -> str:
    """Write a random SAM 2.1 in the official checkpoint format (``sam2.1_hiera_*.pt``:
    ``{"model": state_dict}``). The "tiny" preset has no official config: point
    ``MODEL.REGIONSPOT.SAM2_CONFIG`` at :data:`SAM2_TINY_CONFIG`."""
    _atomic_save({"model": random_sam2(preset, seed).state_dict()}, path)
    return path


def random_sam_hq(preset: str = "tiny", seed: int = 0) -> nn.Module:
    """A randomly initialised SAM-HQ (``segment_anything_hq.modeling.Sam`` with ``MaskDecoderHQ``,
    eval mode, float32, CPU) of a :data:`SAM_PRESETS` image encoder; the HQ decoder reads the
    encoder's width (``vit_dim`` = ``embed_dim``), as ``segment_anything_hq.build_sam`` builds it.

    Its SAM part (image encoder, prompt encoder, SAM's decoder tensors) equals :func:`random_sam`
    of the same preset and seed, tensor for tensor, so that the two families can be compared on
    the same SAM weights; the HQ tensors are drawn after them.
    """
    from ..modeling.sam_hq import build_sam_hq

    sam = random_sam(preset, seed)
    arch = dict(window_size=14, img_size=1024, patch_size=16, out_chans=256)
    arch.update(SAM_PRESETS[preset])
    arch["vit_dim"] = arch["embed_dim"]
    torch.manual_seed(seed + 1)
    hq = build_sam_hq(arch)
    result = hq.load_state_dict(sam.state_dict(), strict=False)
    if result.unexpected_keys or not all(k.startswith("mask_decoder.") for k in result.missing_keys):
        raise RuntimeError(f"SAM-HQ does not hold SAM's tensors: {result}")  # only the HQ decoder's are new
    return hq


def write_random_sam_hq(path: str, preset: str = "tiny", seed: int = 0) -> str:
    """Write a random SAM-HQ as a plain state-dict file, the format of ``sam_hq_vit_b.pth``
    (SAM's keys plus ``mask_decoder.hf_token``, ``hf_mlp``, ``compress_vit_feat``,
    ``embedding_encoder``, ``embedding_maskfeature``)."""
    _atomic_save(random_sam_hq(preset, seed).state_dict(), path)
    return path


class _ClipArchive(nn.Module):
    """Wraps a CLIP for tracing so the archive's state dict matches OpenAI's files: the model's
    tensors at top level plus ``input_resolution``, ``context_length`` and ``vocab_size``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.register_buffer("input_resolution", torch.tensor(model.visual.input_resolution))
        self.register_buffer("context_length", torch.tensor(model.context_length))
        self.register_buffer("vocab_size", torch.tensor(model.vocab_size))
        self._model = [model]  # not a submodule: keeps the parameter names unprefixed

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        return self._model[0](image, text)


def write_random_clip(path: str, preset: str = "tiny", seed: int = 0, jit: bool = True) -> str:
    """Write a random CLIP in OpenAI's format.

    Args:
        jit: True writes a traced TorchScript archive like the official ``ViT-B-16.pt``;
            False writes a plain state dict (the other form ``clip.load`` accepts).
    """
    model = random_clip(preset, seed)
    if not jit:
        _atomic_save(model.state_dict(), path)
        return path
    res = model.visual.input_resolution
    image = torch.zeros(1, 3, res, res)
    text = torch.zeros(1, model.context_length, dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(_ClipArchive(model), (image, text), check_trace=False)
    _atomic_save(traced, path, jit=True)
    return path


def write_random_rpn(path: str, cfg, seed: int = 0, fmt: str = "pth") -> str:
    """Write a randomly initialised Detectron2 RPN (backbone + RPN head of ``cfg``).

    Args:
        cfg: a config describing the RPN (``MODEL.BACKBONE`` / ``RESNETS`` / ``FPN`` /
            ``ANCHOR_GENERATOR`` / ``RPN``).
        fmt: "pth": a Detectron2 checkpoint (``{"model": state_dict, "iteration": 0}``, what
            ``DetectionCheckpointer.save`` writes); "pkl": the model-zoo layout
            (``{"model": {name: numpy array}, "__author__": ...}`` pickled).
    """
    import pickle

    from ..modeling.proposals.rpn import RPNProposalGenerator

    if fmt not in ("pth", "pkl"):
        raise ValueError(f"fmt must be 'pth' or 'pkl', got {fmt!r}")
    torch.manual_seed(seed)
    state = RPNProposalGenerator(cfg, None).state_dict()
    if fmt == "pth":
        atomic_write(path, lambda f: torch.save({"model": state, "iteration": 0}, f))
    else:
        payload = {"model": {k: v.numpy() for k, v in state.items()}, "__author__": "RegionSpot random RPN"}
        atomic_write(path, lambda f: pickle.dump(payload, f))
    return path


# OpenCLIP model configs (open_clip.model.CLIP arguments) of small ViTs for CPU tests: widths
# other than the tiny OpenAI CLIP's, so that a head built for one pair does not fit the other.
# "tiny-eva" and "tiny-siglip" have timm image towers as OpenCLIP's EVA02-*-CLIP and *-SigLIP
# configs do ("timm_model_name", "timm_pool", "timm_proj", custom text tower); their trunk is the
# real timm architecture (EVA02-B-16's ``eva02_base_patch16_clip_224``, ViT-B-16-SigLIP's
# ``vit_base_patch16_siglip_224``) made small by the ``model_args`` of TIMM_TRUNKS, which
# write_random_open_clip puts in a timm ``config.json`` that the OpenCLIP config names as
# ``local-dir:<folder>`` (timm's own way to create a model from a local folder). The text towers
# use OpenCLIP's bundled tokenizer (real SigLIP models take theirs from the hub:
# OPENCLIP_TOKENIZER).
OPEN_CLIP_PRESETS: Dict[str, Dict[str, object]] = {
    "tiny": {"embed_dim": 24,
             "vision_cfg": {"image_size": 224, "layers": 2, "width": 48, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2}},
    "tiny-eva": {"embed_dim": 40, "custom_text": True,
                 "vision_cfg": {"image_size": 224, "timm_model_name": "eva", "timm_model_pretrained": False,
                                "timm_pool": "token", "timm_proj": None},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
    "tiny-siglip": {"embed_dim": 56, "custom_text": True, "init_logit_bias": -10,
                    "vision_cfg": {"image_size": 224, "timm_model_name": "siglip", "timm_model_pretrained": False,
                                   "timm_pool": "map", "timm_proj": "none"},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                                 "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                                 "norm_kwargs": {"eps": 1e-6}}},
}

# timm trunks of the timm-tower presets: the architecture and the arguments that shrink it.
# SigLIP's trunk has no class token and pools with attention ("map"); its width is the model's
# embed_dim (timm_proj "none", as in ViT-B-16-SigLIP).
TIMM_TRUNKS: Dict[str, Dict[str, object]] = {
    "eva": {"architecture": "eva02_base_patch16_clip_224", "model_args": {"embed_dim": 48, "depth": 2, "num_heads": 2}},
    "siglip": {"architecture": "vit_base_patch16_siglip_224",
               "model_args": {"embed_dim": 56, "depth": 2, "num_heads": 2}},
}


def write_random_open_clip(folder: str, preset: str = "tiny", seed: int = 0, model_cfg=None,
                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> str:
    """Write a random OpenCLIP model in the layout OpenCLIP publishes on the Hugging Face hub:
    ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and
    ``open_clip_model.safetensors``, the folder that ``CLIP_WEIGHTS`` names for ``VL_MODEL
    open_clip``.

    A preset with a timm tower (``vision_cfg.timm_model_name`` a key of :data:`TIMM_TRUNKS`)
    also gets ``<folder>/timm_trunk/config.json`` (timm's hub config: ``architecture``,
    ``model_args``), and its config names the trunk ``local-dir:<absolute folder>/timm_trunk``:
    the folder is not relocatable, which a test fixture need not be.

    Args:
        model_cfg: an OpenCLIP model config instead of the preset's (e.g. to write a tower
            RegionSpot refuses); its ``timm_model_name`` may name any timm architecture.
        mean, std: the ``preprocess_cfg`` normalisation (not OpenAI's, so that tests see it used).
    """
    import json
    import os

    from open_clip.model import CLIP, CustomTextCLIP
    from safetensors.torch import save

    cfg = json.loads(json.dumps(model_cfg or OPEN_CLIP_PRESETS[preset]))
    os.makedirs(folder, exist_ok=True)
    trunk = TIMM_TRUNKS.get(cfg["vision_cfg"].get("timm_model_name") or "")
    if trunk is not None:
        trunk_dir = os.path.join(os.path.abspath(folder), "timm_trunk")
        os.makedirs(trunk_dir, exist_ok=True)
        timm_config = dict(trunk, pretrained_cfg={})
        atomic_write(os.path.join(trunk_dir, "config.json"), lambda f: f.write(json.dumps(timm_config).encode()))
        cfg["vision_cfg"]["timm_model_name"] = f"local-dir:{trunk_dir}"
    torch.manual_seed(seed)
    model_kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    model = (CustomTextCLIP if cfg.get("custom_text") else CLIP)(**model_kwargs)
    if trunk is not None:
        # timm initialises norms to weight 1, bias 0, where a LayerNorm is nearly idempotent: a
        # feature map taken after the trunk's final norm would then pass the parity test. Random
        # affine norms make every norm count.
        with torch.no_grad():
            for module in model.visual.modules():
                if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                    module.weight.copy_(1 + 0.5 * torch.randn_like(module.weight))
                    if module.bias is not None:
                        module.bias.copy_(0.1 * torch.randn_like(module.bias))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(folder, "open_clip_model.safetensors"), lambda f: f.write(save(state)))
    config = {"model_cfg": cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std)}}
    atomic_write(os.path.join(folder, "open_clip_config.json"), lambda f: f.write(json.dumps(config).encode()))
    return folder
