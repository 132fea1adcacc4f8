"""SAM 2 / SAM 2.1 as RegionSpot's localizer (``MODEL.REGIONSPOT.LOCALIZER sam2``).

The ``sam2`` package (imported, never copied) provides the model: a Hiera image encoder with
an FPN neck, SAM's prompt encoder, and a mask decoder that also reads two high-resolution
feature maps. RegionSpot uses its image path only (the video memory modules are loaded with
the file but never run). The steps are those of ``sam2.SAM2ImagePredictor``:

- image: resized to the model's square input (``image_size``, 1024 for the official models)
  *without* keeping the aspect ratio, scaled to [0, 1] and normalised with ImageNet's mean/std
  (``SAM2Transforms``); ``forward_image`` gives the 256-d embedding at stride 16 and the two
  high-resolution maps (stride 4 and 8, already projected by the decoder's ``conv_s0/conv_s1``);
  ``no_mem_embed`` is added to the embedding, as the predictor does for a single image;
- box: its corners become two points labelled 2 and 3 (``SAM2ImagePredictor._predict``), in
  the resized square's pixels;
- decoder: ``MaskDecoder.predict_masks`` (the package's own method). Its output tokens are
  ``[object-score token, IoU token, mask tokens 0-3]`` when ``pred_obj_scores`` (every SAM 2
  model), so mask token 0 sits at ``s + 1`` with ``s = 1``. The position-aware token is mask
  token 0 at the output of the two-way transformer, as for SAM (paper Sec. 3);
- single mask: mask token 0's mask and IoU, except that SAM 2's decoder falls back to the best
  of its three multi-mask outputs when mask 0 is unstable (``dynamic_multimask_via_stability``,
  which ``build_sam2`` turns on for inference); the IoU head ends in a sigmoid (values in [0, 1]);
- masks: bilinear upsampling of the 1/4-resolution logits straight to the output size
  (``SAM2Transforms.postprocess_masks``; no padding to crop), threshold 0.

``tests/test_sam2_localizer.py`` checks tokens, masks and IoUs against
``SAM2ImagePredictor`` and ``sam_auto`` against ``SAM2AutomaticMaskGenerator``.

Architecture: the official checkpoints (``sam2.1_hiera_{tiny,small,base_plus,large}.pt``,
``{"model": state_dict}``) do not hold Hiera's head counts or attention windows, so the
package's config is chosen from the widths and block counts the tensors do hold
(:func:`regionspot.weights_files.sam2_architecture`); ``MODEL.REGIONSPOT.SAM2_CONFIG`` names
a config yaml (a path, or a path inside the ``sam2`` package such as
``configs/sam2.1/sam2.1_hiera_s.yaml``) for any other model.
"""

import logging
import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..weights_files import WeightsError, localizer_state_dict, require_file, sam2_architecture
from .localizer import BoxPrompts, ExportImageEncoder, ExportPrompt, Localizer, OnnxLocalizer, paste_in_chunks

logger = logging.getLogger(__name__)

# What build_sam2 sets for inference (apply_postprocessing=True): single-mask outputs fall back
# to the best multi-mask output when unstable.
INFERENCE_OVERRIDES = {
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}


def sam2_config_path(name: str) -> str:
    """A SAM 2 config yaml: an existing path, or a path inside the ``sam2`` package.

    Raises:
        WeightsError: neither exists (the message names ``MODEL.REGIONSPOT.SAM2_CONFIG``).
    """
    import sam2

    expanded = os.path.expanduser(name)
    if os.path.isfile(expanded):
        return expanded
    inside = os.path.join(os.path.dirname(sam2.__file__), name)
    if os.path.isfile(inside):
        return inside
    raise WeightsError(f"MODEL.REGIONSPOT.SAM2_CONFIG {name!r} is neither a file nor a config of the sam2 package "
                       f"(e.g. configs/sam2.1/sam2.1_hiera_s.yaml)")


def build_sam2_model(config_file: str) -> nn.Module:
    """An untrained ``sam2.modeling.sam2_base.SAM2Base`` from a config yaml, with the inference
    settings ``sam2.build_sam.build_sam2`` applies (:data:`INFERENCE_OVERRIDES`).

    The yaml is read with OmegaConf and instantiated with Hydra's ``instantiate``, as
    ``build_sam2`` does, but from a file path (``build_sam2`` only finds configs inside the
    package through Hydra's search path).
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config_file)
    extra = cfg.model.get("sam_mask_decoder_extra_args") or {}
    cfg.model.sam_mask_decoder_extra_args = OmegaConf.merge(extra, INFERENCE_OVERRIDES)
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True).eval()


def load_sam2(path: str, config: str = "") -> Tuple[nn.Module, Dict[str, object]]:
    """Load a frozen SAM 2 (``SAM2Base``, eval mode, float32, CPU) from an official checkpoint.

    Args:
        path: ``sam2.1_hiera_*.pt`` or ``sam2_hiera_*.pt`` (``{"model": state_dict}``), or a
            file in the same format (a bare state dict is accepted too).
        config: ``MODEL.REGIONSPOT.SAM2_CONFIG``; empty: chosen from the tensors.

    Returns:
        (model, architecture dict of :func:`~regionspot.weights_files.sam2_architecture` with
        the config used).

    Raises:
        WeightsError: missing or unreadable file, not a SAM 2 checkpoint (a SAM or SAM-HQ
            file is named as such), an encoder shape with no official config and no
            ``SAM2_CONFIG``, or tensors that do not fit the config (missing/unexpected keys
            or shapes named). Loading is strict: nothing is silently left random.
    """
    import sam2

    path = require_file(path, "SAM 2")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read SAM 2 weights file {path!r}: {type(e).__name__}: {e}") from e
    state = localizer_state_dict(loaded)
    if not isinstance(state, dict):
        raise WeightsError(f"SAM 2 weights file {path!r} does not hold a state dict")
    if "image_encoder.patch_embed.proj.weight" in state:
        kind = "SAM-HQ (LOCALIZER sam_hq)" if "mask_decoder.hf_token.weight" in state else "SAM (LOCALIZER sam)"
        raise WeightsError(f"MODEL.REGIONSPOT.SAM_WEIGHTS {path!r} is a {kind} file, not SAM 2 (LOCALIZER sam2)")
    try:
        arch = sam2_architecture(state)
    except WeightsError as e:
        raise WeightsError(f"MODEL.REGIONSPOT.SAM_WEIGHTS {path!r} (LOCALIZER sam2): {e}") from e
    name = config or arch["config"]
    config_file = sam2_config_path(name) if name else None
    if config_file is None:
        raise WeightsError(f"MODEL.REGIONSPOT.SAM_WEIGHTS {path!r}: a SAM {arch['version']} Hiera of width "
                           f"{arch['embed_dim']} and stages {arch['stages']} has no official config; set "
                           f"MODEL.REGIONSPOT.SAM2_CONFIG to its yaml")
    model = build_sam2_model(config_file)
    try:
        model.load_state_dict(state)  # strict: nothing of the model left random, nothing of the file ignored
    except RuntimeError as e:  # torch lists missing keys, unexpected keys and shape mismatches, a line each
        lines = [line.strip() for line in str(e).splitlines()]
        shapes = [line for line in lines if line.startswith("size mismatch")]
        keys = {kind: next((line.split(":", 1)[1].count('"') // 2 for line in lines if line.startswith(kind)), 0)
                for kind in ("Missing key(s)", "Unexpected key(s)")}
        raise WeightsError(f"SAM 2 weights file {path!r} does not fit the config {config_file}: {len(shapes)} "
                           f"tensors of other shapes, {keys['Missing key(s)']} missing, "
                           f"{keys['Unexpected key(s)']} unexpected (e.g. {(shapes or lines[1:] or [''])[0][:200]})"
                           ) from e
    package_dir = os.path.dirname(sam2.__file__)
    if config_file.startswith(package_dir):
        arch = dict(arch, config=os.path.relpath(config_file, package_dir))
    else:
        arch = dict(arch, config=config_file)
    logger.info("Loaded SAM %s from %s (Hiera width %d, stages %s; %s)", arch["version"], path, arch["embed_dim"],
                arch["stages"], arch["config"])
    return model.requires_grad_(False), arch


class Sam2PositionTokens(Localizer):
    """RegionSpot's localizer on SAM 2 / 2.1: box -> (position-aware token, mask, IoU), a peer of
    SAM's :class:`~.position_tokens.SamPositionTokens` implementing the localizer interface
    (:class:`~.localizer.Localizer`: batching, chunking, precision and the token-source rule
    are the interface's).

    The image embedding (:meth:`encode_images`) is a dict: ``"image"`` (B, 256, g, g) and the
    decoder's high-resolution maps ``"high_res_0"`` (B, 32, 4g, 4g) and ``"high_res_1"``
    (B, 64, 2g, 2g). Sizes returned by :meth:`preprocess` are the image's own (H, W): SAM 2
    resizes every image to its square input, so the image fills it and nothing is padded.

    Args:
        model: a ``sam2.modeling.sam2_base.SAM2Base`` (:func:`load_sam2`).
        token_source, box_chunk_size, precision: as for :class:`~.localizer.Localizer`.
        attention: ``SAM_ATTENTION``; Hiera already computes attention with
            ``scaled_dot_product_attention``, so "sdpa" and "official" are the same here.
        identity: the architecture dict of :func:`load_sam2` (recorded, shown in logs; its
            config names the model in :attr:`pair_name`).

    Raises:
        ValueError: unknown ``token_source``, ``precision`` or ``attention``, or non-positive
            ``box_chunk_size``.
    """

    family = "sam2"

    def __init__(self, model: nn.Module, token_source: str = "transformer", box_chunk_size: int = 64,
                 precision: str = "auto", attention: str = "sdpa", identity: Optional[Dict[str, object]] = None):
        super().__init__(model, token_source, box_chunk_size, precision, attention, identity)
        from sam2.utils.transforms import SAM2Transforms

        # the predictor's transforms: square resize + ImageNet normalisation, box and mask frames
        with warnings.catch_warnings():  # SAM2Transforms scripts its resize: torch.jit.script is deprecated
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated.*")
            self.transforms = SAM2Transforms(resolution=model.image_size, mask_threshold=0.0)

    @property
    def pair_name(self) -> str:
        """``"sam2:<config>"`` (e.g. ``sam2:sam2.1_hiera_s``), recorded in checkpoints
        (``RegionSpot.pair``): a head trained on one SAM 2 is refused by another."""
        config = str(self.identity.get("config") or "")
        return f"{self.family}:{os.path.splitext(os.path.basename(config))[0]}" if config else self.family

    @property
    def device(self) -> torch.device:
        return self.sam.no_mem_embed.device

    @property
    def input_size(self) -> int:
        """Side of SAM 2's square input (``image_size``, 1024 for the official models), pixels."""
        return int(self.sam.image_size)

    @property
    def decoder_width(self) -> int:
        """The mask decoder's transformer width (256): tokens are 256-d, or 32-d for ``"mlp"``."""
        return self.sam.sam_mask_decoder.transformer_dim

    # ----------------------------------------------------------------- image side
    def preprocess(self, image: torch.Tensor, resized: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """One image as ``SAM2ImagePredictor.set_image`` prepares it.

        Args:
            image: (3, H, W) uint8 RGB, any device.
            resized: ignored (the data mapper's resize keeps SAM's aspect ratio; SAM 2 squashes).

        Returns:
            pixels: (3, S, S) float32 on the model's device; (H, W) of ``image``.
        """
        x = image.to(self.device, non_blocking=True).float() / 255.0
        return self.transforms.transforms(x), tuple(image.shape[-2:])

    def encode_images(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """SAM 2's image encoder (``SAM2Base.forward_image``), as the image predictor uses it.

        Args:
            pixels: (B, 3, S, S) float32 from :meth:`preprocess`.

        Returns:
            ``{"image": (B, C, g, g) with no_mem_embed added, "high_res_0": (B, C/8, 4g, 4g),
            "high_res_1": (B, C/4, 2g, 2g)}``, g = S / 16, C = 256.
        """
        model = self.sam
        backbone_out = model.forward_image(pixels)
        _, feats, _, sizes = model._prepare_backbone_features(backbone_out)
        if model.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(pixels.shape[0], -1, *size) for f, size in zip(feats, sizes)]
        return {"image": maps[-1], "high_res_0": maps[0], "high_res_1": maps[1]}

    # ----------------------------------------------------------------- ONNX export
    onnx_embedding_names = ("image", "high_res_0", "high_res_1")  # encode_images' dict, exported in this order

    def onnx_modules(self) -> OnnxLocalizer:
        """SAM 2's ONNX export (:class:`~.localizer.OnnxLocalizer`): the image encoder takes the
        image as it is and squashes it to S x S itself (:meth:`onnx_preprocess`); masks are resized
        from the whole square to the output size (``SAM2Transforms.postprocess_masks``)."""
        names = self.onnx_embedding_names
        return OnnxLocalizer(ExportImageEncoder(self, self.onnx_preprocess, names), names,
                             ExportPrompt(self, self.onnx_boxes_to_input, names, as_dict=True),
                             host_resize="none", mask_paste="whole_input", mask_threshold=0.0)

    def onnx_preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`preprocess` on (1, 3, H, W) float32 pixels in [0, 255], written with tensor ops for
        the ONNX graph (``SAM2Transforms.transforms`` is TorchScript): /255, torchvision's
        ``Resize((S, S))`` on a tensor (bilinear, antialiased), ``Normalize``."""
        size = self.input_size
        x = torch.nn.functional.interpolate(pixels / 255.0, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
        mean = torch.tensor(self.transforms.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.transforms.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def onnx_boxes_to_input(self, boxes: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        """:meth:`boxes_to_input` with the image size as a (2,) float32 tensor [H, W] (for the
        ONNX graph): corners divided by (W, H), times S (``SAM2Transforms.transform_coords``)."""
        corners = boxes.reshape(-1, 2, 2)
        return corners / torch.stack([image_size[1], image_size[0]]) * self.input_size

    # ----------------------------------------------------------------- prompt side
    def boxes_to_input(self, boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(N, 4) XYXY_ABS boxes of an (H, W) image -> (N, 2, 2) corners in SAM 2's input frame
        (``SAM2Transforms.transform_boxes``)."""
        return self.transforms.transform_boxes(boxes, normalize=True, orig_hw=tuple(image_size))

    def encode_boxes(self, corners: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's prompt encoder on n boxes given as (n, 2, 2) corners, two points labelled 2
        and 3 (``SAM2ImagePredictor._predict``): (n, 3, 256) sparse (with the "not a point" pad)
        and (n, 256, g, g) dense embeddings."""
        n = corners.shape[0]
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=corners.device).expand(n, -1)
        return self.sam.sam_prompt_encoder(points=(corners, labels), boxes=None, masks=None)

    def prompt_token(self, sparse: torch.Tensor) -> torch.Tensor:
        """The ``"prompt_encoder"`` token: the two corner embeddings averaged (not the pad point)."""
        return sparse[:, :2].mean(dim=1)

    def hypernetwork(self, mask_token: torch.Tensor) -> torch.Tensor:
        """SAM 2's hypernetwork MLP 0 (``output_hypernetworks_mlps[0]``): (n, 256) -> (n, 32)."""
        return self.sam.sam_mask_decoder.output_hypernetworks_mlps[0](mask_token)

    def decode_prompts(self, image_embeddings: Dict[str, torch.Tensor], sparse: torch.Tensor, dense: torch.Tensor,
                       image_index: torch.Tensor, with_masks: bool) -> BoxPrompts:
        """SAM 2's mask decoder on n encoded prompts (boxes, or clicks and masks).

        Args:
            image_embeddings: the batch's dict (:meth:`encode_images`).
            sparse, dense: the prompt encoder's (n, k, 256) and (n, 256, g, g) embeddings.
            image_index: (n,) int64 ascending, the image of each prompt.
        """
        model = self.sam
        decoder = model.sam_mask_decoder
        n = sparse.shape[0]
        image_pe = model.sam_prompt_encoder.get_dense_pe()
        s = 1 if decoder.pred_obj_scores else 0
        if not with_masks:  # the transformer only: predict_masks' first steps, for prompts of several images
            weights = [decoder.obj_score_token.weight] if s else []
            output_tokens = torch.cat(weights + [decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
            queries = torch.cat([output_tokens[None].expand(n, -1, -1), sparse], dim=1)
            source = image_embeddings["image"][image_index] + dense
            hs, _ = decoder.transformer(source, image_pe.expand(n, -1, -1, -1), queries)
            return BoxPrompts(self.select_token(hs[:, s + 1], sparse).float(), None, None)
        tokens, masks, ious = [], [], []
        for i in image_index.unique_consecutive().tolist():  # the package's decoder, one image at a time
            rows = (image_index == i).nonzero()[:, 0]
            high_res = [image_embeddings["high_res_0"][i:i + 1], image_embeddings["high_res_1"][i:i + 1]]
            all_masks, all_iou, mask_tokens, _ = decoder.predict_masks(
                image_embeddings=image_embeddings["image"][i:i + 1], image_pe=image_pe,
                sparse_prompt_embeddings=sparse[rows], dense_prompt_embeddings=dense[rows], repeat_image=True,
                high_res_features=high_res)
            if decoder.dynamic_multimask_via_stability and not decoder.training:
                mask, iou = decoder._dynamic_multimask_via_stability(all_masks, all_iou)
            else:
                mask, iou = all_masks[:, 0:1], all_iou[:, 0:1]
            tokens.append(self.select_token(mask_tokens[:, 0], sparse[rows]))
            masks.append(mask)
            ious.append(iou[:, 0])
        return BoxPrompts(torch.cat(tokens).float(), torch.cat(masks).float(), torch.cat(ious).float())

    # ----------------------------------------------------------------- clicks and masks
    def prompt_points(self, image_embedding: Dict[str, torch.Tensor], sam_input_size: Tuple[int, int],
                      image_size: Tuple[int, int], points: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> BoxPrompts:
        """SAM 2's prompt encoder and mask decoder on clicks and/or a mask: one region
        (:meth:`~.localizer.Localizer.prompt_clicks`, whose arguments it takes), as
        ``SAM2ImagePredictor.predict(point_coords, point_labels, mask_input=...,
        multimask_output=False)`` computes it (``tests/test_sam2_localizer.py`` checks it).

        Raises:
            ValueError: neither points nor a mask; points not (K, 2) finite or labels not (K,)
                of 0/1.
        """
        return self.prompt_clicks(image_embedding, sam_input_size, image_size, points, labels, mask)

    def click_coordinates(self, points: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(K, 2) XY pixels of an (H, W) image -> SAM 2's square input frame (normalised by the
        image's size, times the input side: ``SAM2Transforms.transform_coords``)."""
        return self.transforms.transform_coords(points, normalize=True, orig_hw=tuple(image_size))

    def encode_clicks(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]], mask_input: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's prompt encoder on one region's clicks and/or low-resolution mask logits, as
        ``SAM2ImagePredictor._predict`` calls it (points padded with "not a point")."""
        if points is not None:
            points = (points[0], points[1].to(torch.int))
        return self.sam.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)

    def mask_to_low_res(self, mask: torch.Tensor, sam_input_size: Tuple[int, int]) -> torch.Tensor:
        """An (H, W) float mask in SAM 2's mask-input frame: SAM 2's input is the whole image
        squashed to a square, so the mask is resized (bilinear) straight to 4g x 4g
        (``sam_input_size`` unused): (1, 1, 4g, 4g) float32."""
        low = tuple(self.sam.sam_prompt_encoder.mask_input_size)
        return torch.nn.functional.interpolate(mask[None, None], size=low, mode="bilinear", align_corners=False)

    # ----------------------------------------------------------------- masks out
    def paste_masks(self, low_res_masks: torch.Tensor, resized_size: Tuple[int, int],
                    output_size: Tuple[int, int]) -> torch.Tensor:
        """Binary masks in an output frame, as ``SAM2ImagePredictor`` post-processes them
        (bilinear upsampling of the whole square to ``output_size``, threshold 0; no hole or
        sprinkle filling, the predictor's default), :data:`~.localizer.MASK_PASTE_CHUNK` at a time.

        Args:
            low_res_masks: (K, 1, 4g, 4g) from :meth:`prompt`.
            resized_size: unused (the image fills SAM 2's input).
            output_size: (H_out, W_out).

        Returns:
            (K, H_out, W_out) bool.
        """
        return paste_in_chunks(low_res_masks, tuple(output_size),
                               lambda chunk: self.transforms.postprocess_masks(chunk, tuple(output_size))[:, 0] > 0)

    def mask_generator(self, settings: Dict[str, object], image_shape: Tuple[int, int],
                       embedding: Dict[str, torch.Tensor], input_size: Tuple[int, int]):
        """``sam2.SAM2AutomaticMaskGenerator`` for one encoded image (``sam_auto`` proposals),
        counting what each of its filters removes and reusing ``embedding``.

        Args:
            settings: generator keyword arguments (``MODEL.REGIONSPOT.SAM_AUTO``).
            image_shape: (H, W) of the image the generator is given.
            embedding: this localizer's embedding of that image (dict of (C, h, w) tensors).
            input_size: unused (SAM 2's input is always the whole square).
        """
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        generator = sam2_counting_generator_class()(self.sam, output_mode="binary_mask", **settings)
        features = {"image_embed": embedding["image"][None],
                    "high_res_feats": [embedding["high_res_0"][None], embedding["high_res_1"][None]]}

        class EmbeddedImagePredictor(SAM2ImagePredictor):
            def set_image(self, image) -> None:
                if tuple(image.shape[:2]) != tuple(image_shape):  # a crop: let SAM 2 encode it
                    return super().set_image(image)
                self.reset_predictor()
                self._orig_hw = [tuple(image_shape)]
                self._features = features
                self._is_image_set = True
                return None

        previous = generator.predictor
        generator.predictor = EmbeddedImagePredictor(self.sam, mask_threshold=previous.mask_threshold,
                                                     max_hole_area=previous._transforms.max_hole_area,
                                                     max_sprinkle_area=previous._transforms.max_sprinkle_area)
        generator.predictor._bb_feat_sizes = predictor_feature_sizes(self.sam)
        return generator


def predictor_feature_sizes(model: nn.Module) -> List[Tuple[int, int]]:
    """``SAM2ImagePredictor._bb_feat_sizes`` for a model's input size (the predictor hard-codes
    those of a 1024-px input): strides 4, 8 and 16."""
    side = int(model.image_size)
    return [(side // 4, side // 4), (side // 8, side // 8), (side // 16, side // 16)]


_SAM2_COUNTING_GENERATOR = None


def sam2_counting_generator_class():
    """``sam2.SAM2AutomaticMaskGenerator`` counting what each of its filters removes
    (:class:`~.proposals.sam_auto.FilterCounting`).

    ``_process_batch`` is sam2 1.1.0's, step for step (without the mask-to-mask refinement,
    ``use_m2m``, which RegionSpot does not turn on), with the counts added; a test checks
    that the regions equal those of the package's own generator.
    """
    global _SAM2_COUNTING_GENERATOR
    if _SAM2_COUNTING_GENERATOR is not None:
        return _SAM2_COUNTING_GENERATOR
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.utils.amg import (
        MaskData,
        batched_mask_to_box,
        calculate_stability_score,
        is_box_near_crop_edge,
        mask_to_rle_pytorch,
        uncrop_masks,
    )

    from .proposals.sam_auto import FilterCounting

    class CountingSam2MaskGenerator(FilterCounting, SAM2AutomaticMaskGenerator):
        def _process_batch(self, points, im_size, crop_box, orig_size, normalize=False):
            if self.use_m2m:
                raise ValueError("use_m2m is not supported by RegionSpot's sam_auto")
            orig_h, orig_w = orig_size
            points = torch.as_tensor(points, dtype=torch.float32, device=self.predictor.device)
            in_points = self.predictor._transforms.transform_coords(points, normalize=normalize, orig_hw=im_size)
            in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)
            masks, iou_preds, low_res_masks = self.predictor._predict(
                in_points[:, None, :], in_labels[:, None], multimask_output=self.multimask_output, return_logits=True)
            data = MaskData(masks=masks.flatten(0, 1), iou_preds=iou_preds.flatten(0, 1),
                            points=points.repeat_interleave(masks.shape[1], dim=0),
                            low_res_masks=low_res_masks.flatten(0, 1))
            del masks
            self.counts["generated"] += len(data["iou_preds"])
            if self.pred_iou_thresh > 0.0:
                self.filter_counted(data, data["iou_preds"] > self.pred_iou_thresh, "pred_iou")
            data["stability_score"] = calculate_stability_score(data["masks"], self.mask_threshold,
                                                                self.stability_score_offset)
            if self.stability_score_thresh > 0.0:
                self.filter_counted(data, data["stability_score"] >= self.stability_score_thresh, "stability")
            data["masks"] = data["masks"] > self.mask_threshold
            data["boxes"] = batched_mask_to_box(data["masks"])
            keep_mask = ~is_box_near_crop_edge(data["boxes"], crop_box, [0, 0, orig_w, orig_h])
            if not torch.all(keep_mask):
                self.filter_counted(data, keep_mask, "crop_edge")
            data["masks"] = uncrop_masks(data["masks"], crop_box, orig_h, orig_w)
            data["rles"] = mask_to_rle_pytorch(data["masks"])
            del data["masks"]
            self._batch_kept += len(data["rles"])
            return data

    _SAM2_COUNTING_GENERATOR = CountingSam2MaskGenerator
    return CountingSam2MaskGenerator
