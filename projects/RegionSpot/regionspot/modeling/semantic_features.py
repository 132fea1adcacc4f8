"""The semantic feature map of the whole image from frozen CLIP (paper Sec. 3, "ViL model").

:class:`ClipSemanticFeatures` serves OpenAI CLIP's and OpenCLIP's own ViTs;
:class:`TimmSemanticFeatures` serves OpenCLIP models with timm ViT towers (EVA02, SigLIP).

The released implementation feeds the full image to OpenAI CLIP's ViT and keeps the output
tokens of the last residual block: class token included (switchable, paper Table 4a),
without ``ln_post`` and without the ``proj`` projection. Shapes: ViT-B/16 at 224 px ->
197 x 768; ViT-L/14 at 224 -> 257 x 1024; at 336 -> 577 x 1024.

Input: the image is divided by 255 and resized (squashed, aspect not kept, no crop) to
S x S by bilinear interpolation, then normalised with CLIP's mean/std. The released weights
were trained with a non-antialiased resize (torchvision < 0.17 on tensors); antialiasing is
an explicit option here, off by default, instead of a library default.
"""

import abc
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..transforms import resize_for_clip  # noqa: F401  (the released resize, shared with the data mapper)
from .precision import check_encoder_precision, encoder_autocast, resolve_encoder_precision
from .profiling import stage

logger = logging.getLogger(__name__)

CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_positional_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a ViT positional embedding to a new square patch grid.

    Args:
        pos: (1 + g0 * g0, D) embedding, class position first.
        grid: new grid side g.

    Returns:
        (1 + g * g, D), class position unchanged, patch positions resized bicubically
        (align_corners=False), as the released code does for S != the native resolution.
    """
    g0 = int(round((pos.shape[0] - 1) ** 0.5))
    if g0 == grid:
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    patch_pos = patch_pos.reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos])


class SemanticEncoder(nn.Module, abc.ABC):
    """The semantic-encoder interface (the vision-language model's image side), the counterpart
    of the localizer's :class:`~.localizer.Localizer`. What every family shares is written here:
    the frozen model (``clip``), the input side S, the pixel normalisation, the precision
    switch, and the resize + normalise + encode path (:meth:`encode`). A family gives
    :meth:`forward` ((B, 3, S, S) pixels -> (B, L, D) float32 feature map), :attr:`width` (D),
    :attr:`embed_dim` (E) and :attr:`num_tokens` (L), and calls :meth:`_setup` in its
    ``__init__``."""

    def _setup(self, clip_model: nn.Module, input_size: int, use_class_token: bool, antialias: bool,
               precision: str, pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> None:
        self.precision = check_encoder_precision(precision)
        self.clip = clip_model.eval().requires_grad_(False)
        self.input_size = input_size
        self.use_class_token = use_class_token
        self.antialias = antialias
        self.register_buffer("pixel_mean", torch.tensor(tuple(pixel_mean)).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(tuple(pixel_std)).view(3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype CLIP's image tower computes in (:attr:`precision` on this device)."""
        return resolve_encoder_precision(self.precision, self.device)

    def compile_encoder(self, **options) -> None:
        """``torch.compile`` the feature-map forward in place (``COMPILE``); parameter names unchanged."""
        self.compile(**options)

    @property
    @abc.abstractmethod
    def width(self) -> int:
        """D, channels of the feature map."""

    @property
    @abc.abstractmethod
    def embed_dim(self) -> int:
        """E, the model's joint image-text embedding size."""

    @property
    @abc.abstractmethod
    def num_tokens(self) -> int:
        """L, rows of the feature map."""

    @abc.abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels of :meth:`preprocess` -> (B, L, D) float32 semantic feature map."""

    @torch.no_grad()
    @stage("clip_semantic")
    def encode(self, images: Sequence[torch.Tensor],
               clip_inputs: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """Semantic feature maps of B images in one call, at :attr:`dtype`.

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB.
            clip_inputs: optional per image, (3, S, S) float32 in [0, 1] made by
                :func:`resize_for_clip` in the mapper.

        Returns:
            (B, L, D) float32.
        """
        pixels = self.preprocess(images, clip_inputs)
        with encoder_autocast(self.device, self.dtype):
            return self(pixels).float()

    def preprocess(self, images: Sequence[torch.Tensor],
                   resized: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """Resize and normalise images for CLIP.

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB (sizes may differ).
            resized: optional, per image, :func:`resize_for_clip` of it made beforehand (by the
                test mapper in a data-loader worker); used when it is (3, S, S) float32, else
                the image is resized here, on CLIP's device.

        Returns:
            (B, 3, S, S) float32 on CLIP's device.
        """
        device = self.pixel_mean.device
        resized = resized if resized is not None else [None] * len(images)
        out = []
        for image, x in zip(images, resized):
            size = (3, self.input_size, self.input_size)
            if x is None or tuple(x.shape) != size or x.dtype != torch.float32:
                x = resize_for_clip(image.to(device, non_blocking=True), self.input_size, self.antialias)
            out.append((x.to(device, non_blocking=True) - self.pixel_mean) / self.pixel_std)
        return torch.stack(out)


class ClipSemanticFeatures(SemanticEncoder):
    """RegionSpot's semantic encoder: frozen CLIP ViT -> semantic feature map V (all tokens of
    the last block), at the part's precision (``ENCODER_PRECISION``).

    Args:
        clip_model: an OpenAI ``clip.model.CLIP`` with a ViT image tower, or an OpenCLIP model
            with OpenCLIP's class-token ViT (:mod:`.open_clip_model`), whose blocks run
            batch-first.
        input_size: S, the square input side in pixels (224 or 336 in the paper); must be a
            multiple of the patch size.
        use_class_token: keep the class token as the first row of the feature map.
        antialias: antialias the resize to S x S (False reproduces the released weights).
        precision: ``ENCODER_PRECISION`` ("auto": float16 on CUDA, float32 on the CPU).
        pixel_mean, pixel_std: the model's RGB normalisation of pixels in [0, 1] (OpenAI CLIP's
            by default; OpenCLIP models bring their own).

    Raises:
        ValueError: ``input_size`` is not a positive multiple of the patch size; an unknown
            ``precision``.
    """

    def __init__(self, clip_model: nn.Module, input_size: int = 224, use_class_token: bool = True,
                 antialias: bool = False, precision: str = "auto",
                 pixel_mean: Sequence[float] = CLIP_PIXEL_MEAN, pixel_std: Sequence[float] = CLIP_PIXEL_STD):
        super().__init__()
        visual = clip_model.visual
        patch = visual.conv1.kernel_size[0]
        if input_size <= 0 or input_size % patch:
            raise ValueError(f"CLIP input size must be a positive multiple of the patch size {patch}, "
                             f"got {input_size}")
        self._setup(clip_model, input_size, use_class_token, antialias, precision, pixel_mean, pixel_std)
        pos = resize_positional_embedding(visual.positional_embedding.detach(), input_size // patch)
        self.register_buffer("positional_embedding", pos, persistent=False)

    @property
    def width(self) -> int:
        """D, channels of the feature map (768 for ViT-B/16, 1024 for ViT-L/14)."""
        return self.clip.visual.conv1.out_channels

    @property
    def embed_dim(self) -> int:
        """E, CLIP's joint image-text embedding size (512 for ViT-B/16, 768 for ViT-L/14)."""
        return self.clip.text_projection.shape[1]

    @property
    def num_tokens(self) -> int:
        """L, rows of the feature map: (S / patch)^2, plus 1 with the class token."""
        return self.positional_embedding.shape[0] - (0 if self.use_class_token else 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Semantic feature map.

        Args:
            pixels: (B, 3, S, S) from :meth:`preprocess`.

        Returns:
            (B, L, D) float32 tokens of the last block (class token first when kept), before
            ``ln_post``/``proj``.
        """
        visual = self.clip.visual
        dtype = visual.conv1.weight.dtype
        x = visual.conv1(pixels.to(dtype))  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        if getattr(visual.transformer, "batch_first", False):  # OpenCLIP's blocks are (B, L, D)
            x = visual.transformer(x)
        else:
            x = visual.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # OpenAI CLIP's are (L, B, D)
        if not self.use_class_token:
            x = x[:, 1:]
        return x.float()


class TimmSemanticFeatures(SemanticEncoder):
    """RegionSpot's semantic encoder on an OpenCLIP model whose image tower is a timm ViT
    (``open_clip.timm_model.TimmModel``: ``.trunk`` a timm ``VisionTransformer`` (SigLIP, with
    ``global_pool='map'`` and no class token) or ``Eva`` (EVA02), ``.head`` OpenCLIP's
    pooling/projection): the semantic feature map is every token of the trunk's last block,
    before the trunk's final ``norm``, its pooling and the projections, as for CLIP's ViT.

    The tokens come from timm's public ``forward_intermediates(pixels, indices=1, norm=False,
    output_fmt="NLC", intermediates_only=True, return_prefix_tokens=...)`` (timm >= 1.0), so the
    trunk's own patch embedding, positional embedding (absolute, or EVA02's rotary one) and
    blocks run unchanged; pushing the map through ``trunk.norm``, ``trunk.forward_head`` and
    ``visual.head`` gives OpenCLIP's ``encode_image`` (tests/test_open_clip_timm.py).

    Other OpenCLIP towers of these two timm classes take the same path: timm ViTs with a CNN
    stem (``HybridEmbed``: ViTamin, MobileCLIP-B; "patch" below is then the stem's stride),
    average-pooled ViTs, Perception Encoder (``Eva``).

    Rows: the trunk's prefix tokens first (its class token, and register tokens where it has
    them) when ``use_class_token`` and the trunk has a class token, then the (S / patch)^2 patch
    tokens in raster order. A trunk without a class token (SigLIP: attention-pooled) gives its
    patch tokens only, whatever ``use_class_token`` says (logged once at build).

    Input size: ``input_size`` other than the tower's own is set with OpenCLIP's
    ``TimmModel.set_input_size`` (timm's ``set_input_size``: the absolute positional embedding
    resampled bicubically by timm, EVA02's rotary grid rebuilt), which changes the loaded
    model in place (``encode_image`` then takes S x S pixels too).

    Args:
        clip_model: an OpenCLIP model with a timm ViT tower (checked by
            :func:`~regionspot.modeling.open_clip_model.check_image_tower`).
        input_size: S, the square input side in pixels (``CLIP_INPUT_SIZE``); a positive multiple
            of the patch size.
        use_class_token, antialias, precision, pixel_mean, pixel_std: as for
            :class:`ClipSemanticFeatures` (the model's own normalisation from its
            ``preprocess_cfg``).

    Raises:
        ValueError: ``input_size`` not a positive multiple of the patch size, or a size the
            trunk cannot be set to; an unknown ``precision``.
    """

    def __init__(self, clip_model: nn.Module, input_size: int = 224, use_class_token: bool = True,
                 antialias: bool = False, precision: str = "auto",
                 pixel_mean: Sequence[float] = CLIP_PIXEL_MEAN, pixel_std: Sequence[float] = CLIP_PIXEL_STD):
        super().__init__()
        visual = clip_model.visual
        trunk = visual.trunk
        native = tuple(trunk.patch_embed.img_size)
        grid = tuple(trunk.patch_embed.grid_size)
        # the input pixels per token: the patch size (timm PatchEmbed), or the CNN stem's stride
        # (HybridEmbed: ViTamin, MobileCLIP), read as input size / token grid
        stride = (native[0] // grid[0], native[1] // grid[1])
        if stride[0] != stride[1] or native[0] != native[1]:
            raise ValueError(f"MODEL.REGIONSPOT.CLIP_INPUT_SIZE: this timm tower is not square (patch "
                             f"{stride[0]}x{stride[1]}, input {native[0]}x{native[1]}); RegionSpot feeds S x S images")
        patch = stride[0]
        if input_size <= 0 or input_size % patch:
            raise ValueError(f"MODEL.REGIONSPOT.CLIP_INPUT_SIZE must be a positive multiple of the tower's patch size "
                             f"{patch}, got {input_size}")
        if native != (input_size, input_size):
            logger.info("OpenCLIP timm tower %s: input set from %d to %d px (CLIP_INPUT_SIZE; timm's set_input_size)",
                        type(trunk).__name__, native[0], input_size)
            visual.set_input_size(input_size)
            if (tuple(trunk.patch_embed.img_size) != (input_size, input_size)
                    or tuple(trunk.patch_embed.grid_size) != (input_size // patch,) * 2):
                raise ValueError(f"MODEL.REGIONSPOT.CLIP_INPUT_SIZE {input_size}: this timm tower "
                                 f"({type(trunk).__name__}) stays at its own {native[0]} px; set CLIP_INPUT_SIZE "
                                 f"{native[0]}")
        self._setup(clip_model, input_size, use_class_token, antialias, precision, pixel_mean, pixel_std)
        self.has_class_token = getattr(trunk, "cls_token", None) is not None
        self.keep_prefix = bool(use_class_token and self.has_class_token and trunk.num_prefix_tokens)
        if use_class_token and not self.has_class_token:
            logger.info("OpenCLIP timm tower %s has no class token (it pools with %r): USE_CLASS_TOKEN has nothing to "
                        "keep, the semantic feature map is its %d patch tokens", type(trunk).__name__,
                        getattr(trunk, "global_pool", "?"), (input_size // patch) ** 2)
        self._grid = input_size // patch

    @property
    def width(self) -> int:
        """D, channels of the feature map: the trunk's embedding width (1024 for EVA02-L, 1152
        for SigLIP SO400M)."""
        return int(self.clip.visual.trunk.embed_dim)

    @property
    def embed_dim(self) -> int:
        """E, the model's joint image-text embedding size (its text tower's output width)."""
        from .text_classifier import text_embed_dim

        return text_embed_dim(self.clip)

    @property
    def num_tokens(self) -> int:
        """L, rows of the feature map: (S / patch)^2, plus the prefix tokens when kept."""
        prefix = self.clip.visual.trunk.num_prefix_tokens if self.keep_prefix else 0
        return self._grid * self._grid + prefix

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Semantic feature map.

        Args:
            pixels: (B, 3, S, S) from :meth:`preprocess`.

        Returns:
            (B, L, D) float32 tokens of the trunk's last block before its final norm (prefix
            tokens first when kept).
        """
        trunk = self.clip.visual.trunk
        dtype = next(trunk.parameters()).dtype
        (last,) = trunk.forward_intermediates(pixels.to(dtype), indices=1, norm=False, output_fmt="NLC",
                                              intermediates_only=True, return_prefix_tokens=self.keep_prefix)
        if self.keep_prefix:
            patches, prefix = last
            last = torch.cat([prefix, patches], dim=1)
        return last.float()
