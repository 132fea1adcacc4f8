"""The ``RegionSpot`` meta-architecture: frozen SAM + frozen CLIP + the trainable head.

One image's path (paper Fig. 2, Sec. 3), in the order the code runs it:
1. the mapper has resized/flipped the image and its boxes once (``data/mapper.py``);
2. SAM embeds the image once; each box prompt gives a position-aware token and a mask
   (``position_tokens.py``);
3. CLIP turns the same image into the semantic feature map (``semantic_features.py``);
4. the head cross-attends the tokens onto the feature map and projects them into CLIP's
   embedding space (``head.py``);
5. logits against the vocabulary's text embeddings (``text_embeddings.py``): training ->
   sigmoid focal loss (``losses.py``); inference -> per-image top-k (box, class) pairs with
   SAM's masks pasted only for the kept boxes -> ``Instances`` in original-image pixels.
"""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances

from ..data.vocabularies import get_vocabulary
from .head import RegionSpotHead, region_logits
from .losses import region_focal_loss
from .position_tokens import SamPositionTokens
from .semantic_features import ClipSemanticFeatures
from .text_embeddings import load_or_compute_text_embeddings, weights_fingerprint
from .weights import load_clip, load_sam

logger = logging.getLogger(__name__)

TEST_SCORES = ("softmax", "sigmoid")


def vocabulary_from_config(cfg, dataset_name: Optional[str] = None) -> List[str]:
    """Class names the model scores boxes against.

    ``MODEL.REGIONSPOT.VOCABULARY``: "dataset" -> ``thing_classes`` of ``dataset_name`` (or of
    the first training, else test, dataset) in Detectron2's ``MetadataCatalog``; "lvis",
    "coco", "objects365" -> the built-in lists; "custom" -> ``CUSTOM_VOCABULARY`` ("a,b,c").

    Raises:
        ValueError: unknown vocabulary, empty custom vocabulary, or a dataset without
            ``thing_classes``.
    """
    rs = cfg.MODEL.REGIONSPOT
    if rs.VOCABULARY != "dataset":
        return get_vocabulary(rs.VOCABULARY, rs.CUSTOM_VOCABULARY or None)
    name = dataset_name or next(iter(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)), None)
    if name is None:
        raise ValueError('MODEL.REGIONSPOT.VOCABULARY is "dataset" but no dataset is configured; '
                         'set DATASETS.TRAIN/TEST or a vocabulary ("lvis", "coco", "objects365", "custom")')
    classes = MetadataCatalog.get(name).get("thing_classes", None)
    if not classes:
        raise ValueError(f"dataset {name!r} has no thing_classes in the MetadataCatalog to use as "
                         f"the vocabulary")
    return list(classes)


@META_ARCH_REGISTRY.register()
class RegionSpot(nn.Module):
    """Open-vocabulary region recognition with frozen SAM and CLIP (Yang et al., RegionSpot).

    Inputs (Detectron2's batched format, one dict per image, as made by
    :class:`regionspot.data.mapper.RegionSpotDatasetMapper`):
        - "image": (3, H, W) uint8 RGB tensor (the mapper's resized image);
        - "instances": ``Instances`` with ``gt_boxes`` (XYXY_ABS pixels of that image) and,
          for training, ``gt_classes`` (int64 indices into the vocabulary); at test time the
          boxes are the proposals to recognise (ground truth with TEST_PROPOSALS "gt");
        - optional "height", "width": the original image size to report results in.

    Outputs: training -> ``{"loss_region_focal": scalar}``; inference -> one
    ``{"instances": Instances}`` per image with ``pred_boxes`` (XYXY_ABS, original pixels),
    ``scores`` (float32), ``pred_classes`` (int64 vocabulary indices) and, with
    ``mask_on``, ``pred_masks`` ((K, H, W) bool).
    """

    @configurable
    def __init__(
        self,
        *,
        sam: nn.Module,
        clip_model: nn.Module,
        clip_weights_id: str,
        class_names: Sequence[str],
        token_source: str = "transformer",
        box_chunk_size: int = 64,
        clip_input_size: int = 224,
        use_class_token: bool = True,
        clip_antialias: bool = False,
        num_decoder_layers: int = 3,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        logit_scale: float = 100.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_negative_classes: float = 364.0,
        test_score: str = "softmax",
        test_topk: int = 900,
        mask_on: bool = False,
        encoder_amp: bool = False,
        text_cache_dir: Optional[str] = None,
        text_batch_size: int = 256,
    ):
        super().__init__()
        if test_score not in TEST_SCORES:
            raise ValueError(f"MODEL.REGIONSPOT.TEST_SCORE must be one of {TEST_SCORES}, got {test_score!r}")
        if test_topk <= 0:
            raise ValueError(f"MODEL.REGIONSPOT.TEST_TOPK must be positive, got {test_topk}")
        self.position = SamPositionTokens(sam, token_source, box_chunk_size)
        self.semantic = ClipSemanticFeatures(clip_model, clip_input_size, use_class_token, clip_antialias)
        self.head = RegionSpotHead(
            self.position.token_dim, self.semantic.width, self.semantic.embed_dim,
            num_decoder_layers, num_heads, dim_feedforward, dropout,
        )
        self.clip_weights_id = clip_weights_id
        self.logit_scale = logit_scale
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.focal_negative_classes = focal_negative_classes
        self.test_score, self.test_topk = test_score, test_topk
        self.mask_on = mask_on
        self.encoder_amp = encoder_amp
        self.text_cache_dir = text_cache_dir
        self.text_batch_size = text_batch_size
        # Text embeddings per vocabulary, computed on first use (or read from the disk cache).
        self._text_embeddings: Dict[Tuple[str, ...], torch.Tensor] = {}
        self.set_vocabulary(class_names)

    @classmethod
    def from_config(cls, cfg):
        rs = cfg.MODEL.REGIONSPOT
        return dict(
            sam=load_sam(rs.SAM_WEIGHTS),
            clip_model=load_clip(rs.CLIP_WEIGHTS),
            clip_weights_id=weights_fingerprint(rs.CLIP_WEIGHTS),
            class_names=vocabulary_from_config(cfg),
            token_source=rs.TOKEN_SOURCE,
            box_chunk_size=rs.BOX_CHUNK_SIZE,
            clip_input_size=rs.CLIP_INPUT_SIZE,
            use_class_token=rs.USE_CLASS_TOKEN,
            clip_antialias=rs.CLIP_RESIZE_ANTIALIAS,
            num_decoder_layers=rs.NUM_DECODER_LAYERS,
            num_heads=rs.NUM_HEADS,
            dim_feedforward=rs.DIM_FEEDFORWARD,
            dropout=rs.DROPOUT,
            logit_scale=rs.LOGIT_SCALE,
            focal_alpha=rs.FOCAL_ALPHA,
            focal_gamma=rs.FOCAL_GAMMA,
            focal_negative_classes=rs.FOCAL_NEGATIVE_CLASSES,
            test_score=rs.TEST_SCORE,
            test_topk=rs.TEST_TOPK,
            mask_on=cfg.MODEL.MASK_ON,
            encoder_amp=rs.ENCODER_AMP,
            text_cache_dir=rs.TEXT_CACHE_DIR or None,
            text_batch_size=rs.TEXT_BATCH_SIZE,
        )

    @property
    def device(self) -> torch.device:
        return self.head.projector.weight.device

    def train(self, mode: bool = True):
        """Only the head trains: SAM and CLIP stay in eval mode (no dropout, frozen)."""
        super().train(mode)
        self.position.eval()
        self.semantic.eval()
        return self

    # ----------------------------------------------------------------- vocabulary
    def set_vocabulary(self, class_names: Sequence[str], text_embeddings: Optional[torch.Tensor] = None) -> None:
        """Score boxes against these class names from now on.

        Args:
            class_names: the C names of the vocabulary.
            text_embeddings: optional precomputed (C, E) L2-normalised embeddings for them
                (e.g. a large vocabulary encoded once offline); by default they are computed
                on first use, or read from the disk cache, with the prompt ensemble.

        Embeddings are kept in memory per vocabulary, so switching back and forth is free.

        Raises:
            ValueError: the vocabulary is empty, or ``text_embeddings`` is not (C, E).
        """
        names = list(class_names)
        if not names:
            raise ValueError("vocabulary is empty: give at least one class name")
        if text_embeddings is not None:
            expected = (len(names), self.semantic.embed_dim)
            if tuple(text_embeddings.shape) != expected:
                raise ValueError(f"text_embeddings must have shape {expected} for this vocabulary and CLIP, "
                                 f"got {tuple(text_embeddings.shape)}")
            self._text_embeddings[tuple(names)] = text_embeddings.float().to(self.device)
        self.class_names = names

    @property
    def text_embeddings(self) -> torch.Tensor:
        """(C, E) float32 L2-normalised text embeddings of :attr:`class_names`, on the model's device."""
        key = tuple(self.class_names)
        emb = self._text_embeddings.get(key)
        if emb is None or emb.device != self.device:
            emb = load_or_compute_text_embeddings(
                self.semantic.clip, self.class_names, weights_id=self.clip_weights_id,
                cache_dir=self.text_cache_dir, batch_size=self.text_batch_size,
            ).to(self.device)
            self._text_embeddings[key] = emb
        return emb

    # ----------------------------------------------------------------- encoders
    def encoder_autocast(self):
        """Autocast context of the frozen encoders: float16 on CUDA when ENCODER_AMP, else a no-op."""
        enabled = self.encoder_amp and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=enabled)

    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[int, int]], torch.Tensor]:
        """Run the frozen encoders once per image.

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB.

        Returns:
            sam_embeddings: (B, 256, g, g) SAM image embeddings.
            resized_sizes: B (h, w) sizes of each image inside SAM's padded input.
            semantic_features: (B, L, D) float32 CLIP feature maps.
        """
        with self.encoder_autocast():
            sam_inputs = [self.position.preprocess(image) for image in images]
            sam_embeddings = self.position.encode_images(torch.stack([x for x, _ in sam_inputs]))
            semantic = self.semantic(self.semantic.preprocess(images))
        return sam_embeddings, [size for _, size in sam_inputs], semantic.float()

    @torch.no_grad()
    def region_tokens(self, sam_embedding: torch.Tensor, boxes: torch.Tensor,
                      image_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Position-aware tokens (N, T) float32 and low-res masks (N, 1, 4g, 4g) of one image's
        boxes ((N, 4) XYXY_ABS pixels of an image of ``image_size`` (H, W))."""
        with self.encoder_autocast():
            return self.position(sam_embedding, boxes, image_size)

    def region_embeddings(self, tokens: List[torch.Tensor], semantic: torch.Tensor) -> List[torch.Tensor]:
        """Run the head on a batch of images.

        Args:
            tokens: B tensors (N_i, T) of position-aware tokens (N_i >= 1).
            semantic: (B, L, D) semantic feature maps.

        Returns:
            B tensors (N_i, E) of region embeddings.
        """
        counts = [t.shape[0] for t in tokens]
        padded = nn.utils.rnn.pad_sequence(tokens, batch_first=True)
        padding_mask = torch.arange(padded.shape[1], device=padded.device)[None] >= torch.tensor(
            counts, device=padded.device)[:, None]
        out = self.head(padded, semantic, padding_mask if min(counts) < padded.shape[1] else None)
        return [out[i, :n] for i, n in enumerate(counts)]

    # ----------------------------------------------------------------- forward
    def forward(self, batched_inputs: List[Dict]):
        """Training: dict of losses. Inference: list of {"instances": Instances} (see class doc)."""
        images = [x["image"] for x in batched_inputs]
        for x, image in zip(batched_inputs, images):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {x.get('file_name', '?')!r} must be a (3, H, W) uint8 RGB "
                                 f"tensor, got {tuple(image.shape)} {image.dtype}")
            if "instances" not in x:
                raise ValueError(f"image {x.get('file_name', '?')!r} has no boxes to recognise: RegionSpot "
                                 f"needs 'instances' with gt_boxes (the proposals) at train and test time")
        boxes = [x["instances"].gt_boxes.tensor.to(self.device) for x in batched_inputs]
        sam_embeddings, resized_sizes, semantic = self.encode_images(images)
        tokens, masks = [], []
        for emb, b, image in zip(sam_embeddings, boxes, images):
            t, m = self.region_tokens(emb, b, tuple(image.shape[-2:]))
            tokens.append(t)
            masks.append(m)
        keep = [i for i, t in enumerate(tokens) if t.shape[0] > 0]
        embeddings = [None] * len(images)
        if keep:
            for i, e in zip(keep, self.region_embeddings([tokens[i] for i in keep], semantic[keep])):
                embeddings[i] = e
        if self.training:
            return self.losses(batched_inputs, embeddings)
        return [
            {"instances": self.postprocess(embeddings[i], boxes[i], masks[i], resized_sizes[i], x,
                                           tuple(images[i].shape[-2:]))}
            for i, x in enumerate(batched_inputs)
        ]

    def losses(self, batched_inputs: List[Dict], embeddings: List[Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Sigmoid focal loss of all regions of the batch against the vocabulary."""
        pairs = [(e, x["instances"].gt_classes.to(self.device)) for e, x in zip(embeddings, batched_inputs)
                 if e is not None]
        if not pairs:  # keep every head parameter in the graph (DDP) with a zero loss
            return {"loss_region_focal": sum(p.sum() for p in self.head.parameters()) * 0.0}
        logits = region_logits(torch.cat([e for e, _ in pairs]), self.text_embeddings, self.logit_scale)
        labels = torch.cat([c for _, c in pairs])
        return {"loss_region_focal": region_focal_loss(logits, labels, self.focal_alpha, self.focal_gamma,
                                                        self.focal_negative_classes)}

    def class_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, C) float32 scores of N region embeddings ((N, E)) against the vocabulary:
        softmax over the vocabulary (released protocol) or per-class sigmoid (TEST_SCORE)."""
        logits = region_logits(embeddings, self.text_embeddings, self.logit_scale)
        return logits.softmax(-1) if self.test_score == "softmax" else logits.sigmoid()

    @torch.no_grad()
    def postprocess(self, embeddings: Optional[torch.Tensor], boxes: torch.Tensor, low_res_masks: torch.Tensor,
                    resized_size: Tuple[int, int], inputs: Dict, image_size: Tuple[int, int]) -> Instances:
        """Top-k (box, class) pairs of one image, in original-image pixels.

        Released protocol (reference Sec. 2): every box is scored against the whole vocabulary
        (softmax by default), the ``test_topk`` best (box, class) pairs are kept (a box may
        carry several classes), boxes are rescaled from the mapper's image (``image_size``) to
        ("height", "width"), and SAM's mask of each kept box is pasted at that size.
        """
        out_h, out_w = inputs.get("height", image_size[0]), inputs.get("width", image_size[1])
        result = Instances((out_h, out_w))
        if embeddings is None or embeddings.shape[0] == 0:
            result.pred_boxes = Boxes(torch.zeros(0, 4, device=self.device))
            result.scores = torch.zeros(0, device=self.device)
            result.pred_classes = torch.zeros(0, dtype=torch.int64, device=self.device)
            if self.mask_on:
                result.pred_masks = torch.zeros(0, out_h, out_w, dtype=torch.bool, device=self.device)
            return result
        scores = self.class_scores(embeddings)
        num_classes = scores.shape[1]
        top_scores, top_idx = scores.flatten().topk(min(self.test_topk, scores.numel()))
        box_idx, classes = top_idx // num_classes, top_idx % num_classes
        out_boxes = Boxes(boxes[box_idx].clone())
        out_boxes.scale(out_w / image_size[1], out_h / image_size[0])
        out_boxes.clip((out_h, out_w))
        result.pred_boxes = out_boxes
        result.scores = top_scores
        result.pred_classes = classes
        if self.mask_on:
            kept, inverse = box_idx.unique(return_inverse=True)
            pasted = self.position.paste_masks(low_res_masks[kept], resized_size, (out_h, out_w))
            result.pred_masks = pasted[inverse]
        return result
