"""The ``RegionSpot`` meta-architecture: frozen SAM + frozen CLIP + the trainable head.

One recognition path (paper Fig. 2, Sec. 3), used by evaluation (``forward``), the predictor,
the demo and the benchmark alike, in the order the code runs it:

1. the mapper has resized/flipped the image and its boxes once (``data/mapper.py``);
2. :meth:`RegionSpot.encode_images`: SAM embeds each image once (``position_tokens.py``) and
   CLIP turns it into the semantic feature map (``semantic_features.py``), the whole batch in
   one call of each encoder, at ``ENCODER_PRECISION`` (``SAM_ATTENTION``, ``COMPILE``:
   ``fast_attention.py``, docs/speed.md);
3. :meth:`RegionSpot.propose`: the boxes to recognise, as Detectron2 proposals, from the
   configured source (``proposals/``: ground truth, a file, an RPN, SAM's automatic masks);
4. :meth:`RegionSpot.recognize`: each box prompts SAM for its position-aware token (all boxes
   of the batch together, masks only when needed); the head
   cross-attends the tokens onto the feature map and projects them into CLIP's space
   (``head.py``); logits against text embeddings that were computed *before*, outside the
   forward (:meth:`RegionSpot.encode_vocabulary`, ``text_embeddings.py``);
5. training -> sigmoid focal loss (``losses.py``); inference -> :meth:`RegionSpot.postprocess`:
   score fusion and selection (``postprocess.py``), boxes in original-image pixels, one mask
   pasted per kept box -> ``Instances``.
"""

import functools
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.profiler import record_function

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances

from ..data.vocabularies import (check_vocabulary, duplicate_groups, get_vocabulary, names_for_text,
                                 vocabulary_by_name)
from ..filter_report import FilterReport, report_of_input
from .head import RegionSpotHead, region_logits
from .fast_attention import SAM_ATTENTION_KINDS, set_sam_attention
from .losses import region_focal_losses
from .position_tokens import BoxPrompts, SamPositionTokens
from .postprocess import RecognitionProtocol, SharedMasks, class_probabilities, resize_masks, select_detections
from .proposals import check_proposal_source, logit_to_score, select_proposals
from .proposals.gt import proposals_from_ground_truth
from .proposals.sam_auto import SamAutoProposalGenerator
from .semantic_features import ClipSemanticFeatures
from .text_embeddings import load_or_compute_text_embeddings, weights_fingerprint
from .weights import load_clip, load_sam

logger = logging.getLogger(__name__)

# torch.profiler labels of the recognition path's stages, in the order they run
# (``record_function``: free when no profiler is active; tools/benchmark_e2e.py times them).
STAGE_LABELS = {
    "sam_image_encoder": "regionspot.sam_image_encoder",
    "clip_semantic": "regionspot.clip_semantic",
    "proposals": "regionspot.proposals",
    "sam_prompt_decoder": "regionspot.sam_prompt_decoder",
    "head": "regionspot.head",
    "postprocess": "regionspot.postprocess",
}


def _stage(name: str):
    """Decorator: run a method under the ``record_function`` label of stage ``name``."""
    def decorate(fn):
        @functools.wraps(fn)
        def labelled(*args, **kwargs):
            with record_function(STAGE_LABELS[name]):
                return fn(*args, **kwargs)
        return labelled
    return decorate

ENCODER_PRECISIONS = ("auto", "float32", "bfloat16", "float16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_encoder_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the frozen SAM and CLIP compute in (``MODEL.REGIONSPOT.ENCODER_PRECISION``).

    "auto" is float16 on CUDA (the released implementation's autocast) and float32 on the CPU
    (exact); "float32", "bfloat16" and "float16" ask for that precision on any device
    (bfloat16 is fast on CPUs with AVX512-BF16/AMX; float16 on the CPU is slow). The
    deviations of each from float32 are measured by ``tools/benchmark.py --end-to-end``.

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in ENCODER_PRECISIONS:
        raise ValueError(f"MODEL.REGIONSPOT.ENCODER_PRECISION must be one of {ENCODER_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return _DTYPES[precision]


def vocabulary_from_config(cfg, dataset_name: Optional[str] = None) -> List[str]:
    """Class names to score a dataset's boxes against.

    ``MODEL.REGIONSPOT.VOCABULARY``: "dataset" -> the ``thing_classes`` of ``dataset_name`` (or of
    the first training dataset) in Detectron2's ``MetadataCatalog``, loading the dataset first
    if its loader is what sets them (as Detectron2's ``register_coco_instances`` and
    ``register_lvis_instances`` do); "lvis", "coco", "objects365" -> the built-in lists;
    "custom" -> ``CUSTOM_VOCABULARY`` ("a,b,c"). Evaluation passes each test dataset's name, so
    every dataset is scored against its own vocabulary.

    Raises:
        ValueError: unknown vocabulary, empty custom vocabulary, a dataset that is not
            registered, or one without ``thing_classes``.
    """
    rs = cfg.MODEL.REGIONSPOT
    if rs.VOCABULARY != "dataset":
        return get_vocabulary(rs.VOCABULARY, rs.CUSTOM_VOCABULARY or None)
    name = dataset_name or next(iter(cfg.DATASETS.TRAIN), None)
    if name is None:
        raise ValueError('MODEL.REGIONSPOT.VOCABULARY is "dataset" but no dataset is given; name one or set '
                         'a vocabulary ("lvis", "coco", "objects365", "custom")')
    return vocabulary_by_name(name)


def resolve_config_device(cfg) -> None:
    """Resolve ``MODEL.DEVICE "auto"`` in ``cfg`` in place (CUDA when available, else the CPU;
    :func:`regionspot.config.resolve_device`), so that a config from Detectron2's own
    ``get_cfg()`` + ``add_regionspot_config`` builds with ``build_model`` and
    ``DefaultPredictor``, which move the model to ``cfg.MODEL.DEVICE``. A frozen config stays
    frozen."""
    if cfg.MODEL.DEVICE != "auto":
        return
    from ..config import resolve_device

    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.DEVICE = resolve_device("auto")
    if frozen:
        cfg.freeze()


def build_time_vocabulary(cfg) -> Optional[List[str]]:
    """The vocabulary a model built from ``cfg`` starts with: "dataset" -> the first test
    dataset's ``thing_classes`` (else the first training dataset's); "lvis", "coco",
    "objects365", "custom" as configured (:func:`vocabulary_from_config`). None, with a log
    line, when the config names no usable dataset (set one with ``set_vocabulary``)."""
    name = next(iter(cfg.DATASETS.TEST), None) or next(iter(cfg.DATASETS.TRAIN), None)
    try:
        return vocabulary_from_config(cfg, name)
    except ValueError as e:
        logger.info("No vocabulary from the config (%s); set one with model.set_vocabulary(class_names)", e)
        return None


def _map_released_layout(state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook: a released RegionSpot checkpoint's keys (head under
    ``model.``, frozen ``model.sam.*`` / ``model.clip_model.*``) as this model's ``head.*``
    keys (docs/method.md §4), in place."""
    from ..checkpoint import FROZEN_PREFIXES, HEAD_PREFIX, RELEASED_PREFIX

    released = prefix + RELEASED_PREFIX
    for key in [k for k in state_dict if k.startswith(released)]:
        value = state_dict.pop(key)
        if not key[len(prefix):].startswith(FROZEN_PREFIXES):
            state_dict[prefix + HEAD_PREFIX + key[len(released):]] = value


def _drop_frozen_state(module, state_dict, prefix, local_metadata) -> None:
    """``state_dict`` hook: the model's state is its head (the frozen SAM, CLIP and RPN are
    read from their official files), so any checkpointer, Detectron2's included, saves only
    the head (~100 MB for BL instead of ~1 GB)."""
    for key in [k for k in state_dict if k.startswith(tuple(prefix + p for p in _FROZEN_MODULES))]:
        del state_dict[key]


# The frozen submodules of RegionSpot (their weights come from SAM_WEIGHTS, CLIP_WEIGHTS, RPN_WEIGHTS).
_FROZEN_MODULES = ("position.", "semantic.", "rpn.")


def _ignore_frozen_missing_keys(module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: the frozen SAM, CLIP and RPN come from their own weight
    files (``SAM_WEIGHTS``, ``CLIP_WEIGHTS``, ``RPN_WEIGHTS``), so a head checkpoint without
    them misses nothing; only head keys are reported missing."""
    from ..checkpoint import FROZEN_PREFIXES

    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]


@dataclass
class ImageFeatures:
    """What the frozen encoders computed for one image, once (:meth:`RegionSpot.encode_images`).

    Attributes:
        image: (3, H, W) uint8 RGB, the image as given (the mapper's resized image).
        sam_embedding: (256, g, g) SAM image embedding (float32, or the encoder precision).
        sam_input_size: (h, w) of the image inside SAM's padded S x S input.
        semantic: (L, D) float32 CLIP semantic feature map.
    """

    image: torch.Tensor
    sam_embedding: torch.Tensor
    sam_input_size: Tuple[int, int]
    semantic: torch.Tensor

    @property
    def image_size(self) -> Tuple[int, int]:
        """(H, W) of :attr:`image`: the frame of proposals and boxes before post-processing."""
        return tuple(self.image.shape[-2:])

    @classmethod
    def from_batch(cls, images: Sequence[torch.Tensor], sam_embeddings: torch.Tensor,
                   sam_input_sizes: Sequence[Tuple[int, int]], semantic: torch.Tensor) -> List["ImageFeatures"]:
        """Split the batched outputs of :meth:`RegionSpot.encode_sam` and
        :meth:`RegionSpot.encode_semantic` into one :class:`ImageFeatures` per image."""
        return [cls(image, sam_embeddings[i], tuple(sam_input_sizes[i]), semantic[i]) for i, image in enumerate(images)]


@dataclass
class RegionRecognition:
    """One image's proposals recognised against a vocabulary, before post-processing.

    Attributes:
        proposals: ``Instances`` with ``proposal_boxes`` (XYXY_ABS pixels of the encoded
            image), ``objectness_logits`` (and ``proposal_masks`` for ``sam_auto``).
        logits: (N, C) float32 region-vocabulary logits (``LOGIT_SCALE * cosine``).
        iou_predictions: (N,) float32 SAM's predicted IoU of each box's mask (None when SAM's
            masks were not computed: neither masks nor the TAP protocol asked for them).
        low_res_masks: (N, 1, 4g, 4g) float32 SAM mask logits (padded frame, 1/4 resolution),
            or None like ``iou_predictions``.
        sam_input_size: (h, w) of the image inside SAM's padded input.
    """

    proposals: Instances
    logits: torch.Tensor
    iou_predictions: Optional[torch.Tensor]
    low_res_masks: Optional[torch.Tensor]
    sam_input_size: Tuple[int, int]

    @property
    def proposal_scores(self) -> torch.Tensor:
        """(N,) float32 proposal scores in [0, 1] (1 for ground-truth boxes)."""
        return logit_to_score(self.proposals.objectness_logits)


@dataclass
class Vocabulary:
    """A dataset's vocabulary for training (one per training dataset).

    Attributes:
        names: C class names.
        text_embeddings: (C, E) float32 L2-normalised, on the model's device.
        ancestors: optional, per class index the indices of its ancestors in a class
            hierarchy (V3Det); used to keep them out of a region's negatives.
        aliases: (derived) per class index, the classes with the same text for CLIP.
    """

    names: List[str]
    text_embeddings: torch.Tensor
    ancestors: Optional[Dict[int, List[int]]] = None
    # Per class index, the other classes whose names read the same to CLIP (identical text
    # embeddings, e.g. V3Det's "Timer" and "timer"): never counted as its negatives.
    aliases: Dict[int, List[int]] = field(init=False)

    def __post_init__(self):
        self.aliases = {i: [j for j in g if j != i] for g in duplicate_groups(self.names) for i in g}


@META_ARCH_REGISTRY.register()
class RegionSpot(nn.Module):
    """Open-vocabulary region recognition with frozen SAM and CLIP (Yang et al., RegionSpot).

    Inputs (Detectron2's batched format, one dict per image, as made by
    :class:`regionspot.data.mapper.RegionSpotDatasetMapper`):
        - "image": (3, H, W) uint8 RGB tensor (the mapper's resized image);
        - optional "sam_input" ((3, h, w) uint8, the image resized for SAM) and "clip_input"
          ((3, S, S) float32, resized for CLIP), made by the test mapper in the data-loader
          workers so that no resize runs on the model's critical path;
        - "instances": ``Instances`` with ``gt_boxes`` (XYXY_ABS pixels of that image) and,
          for training, ``gt_classes`` (int64 indices into the vocabulary); the proposals at
          test time with ``PROPOSALS`` "gt";
        - "proposals": ``Instances`` with ``proposal_boxes`` / ``objectness_logits`` (the
          mapper's, from a file) with ``PROPOSALS`` "file";
        - optional "proposal_filters": what the file's selection removed from the image's boxes
          (attached by the test loader; the output's "filters" starts from it);
        - optional "height", "width": the original image size to report results in.

    Outputs: training -> ``{"loss_region_focal": scalar}``; inference -> one
    ``{"instances": Instances}`` per image with ``pred_boxes`` (XYXY_ABS, original pixels),
    ``scores`` (float32), ``pred_classes`` (int64 vocabulary indices), ``proposal_scores``
    and, with ``mask_on``, ``pred_masks`` (:class:`~regionspot.modeling.postprocess.SharedMasks`,
    (K, H, W) bool); and ``"filters"``, the image's
    :class:`~regionspot.modeling.proposals.filters.FilterReport` (what each selection step
    removed, and the key that controls it).

    The vocabulary ``forward`` scores against is set from outside with :meth:`set_vocabulary`
    (the trainer does it per dataset); the predictor passes its own text embeddings to
    :meth:`recognize` instead and never changes the model.
    """

    @configurable
    def __init__(
        self,
        *,
        sam: nn.Module,
        clip_model: nn.Module,
        clip_weights_id: str,
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
        protocol: Optional[RecognitionProtocol] = None,
        mask_on: bool = False,
        encoder_precision: str = "auto",
        sam_attention: str = "sdpa",
        compile_encoders: bool = False,
        text_cache_dir: Optional[str] = None,
        text_batch_size: int = 256,
        proposal_source: str = "gt",
        proposal_topk: int = 1000,
        proposal_score_thresh: float = 0.0,
        proposal_nms_thresh: float = 0.0,
        rpn: Optional[nn.Module] = None,
        sam_auto_settings: Optional[Dict[str, object]] = None,
        ignore_unverified_negatives: bool = False,
        ignore_ancestor_negatives: bool = False,
        class_name_style: str = "released",
        vocabulary: Optional[Sequence[str]] = None,
    ):
        super().__init__()
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
        self.protocol = protocol or RecognitionProtocol()
        self.mask_on = mask_on
        resolve_encoder_precision(encoder_precision, "cpu")  # checks the name
        self.encoder_precision = encoder_precision
        self.set_sam_attention(sam_attention)
        # Compute SAM's masks for every box even when nothing reads them (the released
        # behaviour; the benchmark's plain path). By default they are computed only for
        # MASK_ON and the TAP protocol (see needs_sam_masks).
        self.always_decode_masks = False
        self.text_cache_dir = text_cache_dir
        self.text_batch_size = text_batch_size
        self.proposal_source = check_proposal_source(proposal_source)
        if proposal_topk <= 0:
            raise ValueError(f"MODEL.REGIONSPOT.PROPOSAL_TOPK must be positive, got {proposal_topk}")
        self.proposal_selection = dict(topk=proposal_topk, score_thresh=proposal_score_thresh,
                                       nms_thresh=proposal_nms_thresh)
        if proposal_source == "rpn" and rpn is None:
            raise ValueError('MODEL.REGIONSPOT.PROPOSALS is "rpn" but no RPN was given: set '
                             'MODEL.REGIONSPOT.RPN_WEIGHTS (see configs/eval_lvis_rpn.yaml)')
        self.rpn = rpn
        # Not a submodule: it uses the model's own SAM, registered once under `position`.
        self.sam_auto = SamAutoProposalGenerator(self.position.sam, sam_auto_settings or {})
        # What forward() scores against: set with set_vocabulary(), never inside forward.
        self.class_names: Optional[List[str]] = None
        self.register_buffer("text_embeddings", None, persistent=False)
        # Training: one vocabulary per training dataset (inputs say theirs in "dataset").
        self.training_vocabularies: Dict[str, Vocabulary] = {}
        self.ignore_unverified_negatives = ignore_unverified_negatives
        self.ignore_ancestor_negatives = ignore_ancestor_negatives
        self.class_name_style = class_name_style
        # The config's vocabulary: its text embeddings are computed (or read from the disk cache)
        # on the first inference that needs them, so that build_model stays quick.
        self.pending_vocabulary: Optional[List[str]] = list(vocabulary) if vocabulary else None
        # Checkpoints hold only the head: loading any state dict (Detectron2's checkpointer too)
        # maps the released layout and never reports the frozen SAM/CLIP/RPN as missing.
        self._register_state_dict_hook(_drop_frozen_state)
        self._register_load_state_dict_pre_hook(_map_released_layout)
        self.register_load_state_dict_post_hook(_ignore_frozen_missing_keys)
        if compile_encoders:
            self.compile_encoders()

    @classmethod
    def from_config(cls, cfg):
        resolve_config_device(cfg)  # Detectron2's build_model moves the model to cfg.MODEL.DEVICE next
        rs = cfg.MODEL.REGIONSPOT
        rpn = None
        if rs.PROPOSALS == "rpn" or rs.RPN_WEIGHTS:
            from .proposals.rpn import RPNProposalGenerator

            rpn = RPNProposalGenerator(cfg, rs.RPN_WEIGHTS, rs.RPN_INPUT_FORMAT)
        sam = load_sam(rs.SAM_WEIGHTS)
        if rs.LOADER_RESIZE and rs.SAM_INPUT_SIZE != sam.image_encoder.img_size:
            logger.warning("MODEL.REGIONSPOT.SAM_INPUT_SIZE is %d but this SAM's input is %d px: the loader's "
                           "resize is not used and the model resizes each image again; set SAM_INPUT_SIZE %d",
                           rs.SAM_INPUT_SIZE, sam.image_encoder.img_size, sam.image_encoder.img_size)
        return dict(
            sam=sam,
            clip_model=load_clip(rs.CLIP_WEIGHTS),
            clip_weights_id=weights_fingerprint(rs.CLIP_WEIGHTS),
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
            protocol=RecognitionProtocol.from_config(cfg),
            mask_on=cfg.MODEL.MASK_ON,
            encoder_precision=rs.ENCODER_PRECISION,
            sam_attention=rs.SAM_ATTENTION,
            compile_encoders=rs.COMPILE,
            text_cache_dir=rs.TEXT_CACHE_DIR or None,
            text_batch_size=rs.TEXT_BATCH_SIZE,
            proposal_source=rs.PROPOSALS,
            proposal_topk=rs.PROPOSAL_TOPK,
            proposal_score_thresh=rs.PROPOSAL_SCORE_THRESH,
            proposal_nms_thresh=rs.PROPOSAL_NMS_THRESH,
            rpn=rpn,
            sam_auto_settings=SamAutoProposalGenerator.settings_from_config(cfg),
            ignore_unverified_negatives=rs.IGNORE_UNVERIFIED_NEGATIVES,
            ignore_ancestor_negatives=rs.IGNORE_ANCESTOR_NEGATIVES,
            class_name_style=rs.CLASS_NAME_STYLE,
            vocabulary=build_time_vocabulary(cfg),
        )

    @property
    def device(self) -> torch.device:
        return self.head.projector.weight.device

    def train(self, mode: bool = True):
        """Only the head trains: SAM, CLIP and the RPN stay in eval mode (no dropout, frozen)."""
        super().train(mode)
        self.position.eval()
        self.semantic.eval()
        if self.rpn is not None:
            self.rpn.eval()
        return self

    # ----------------------------------------------------------------- vocabulary
    @torch.no_grad()
    def encode_vocabulary(self, class_names: Sequence[str]) -> torch.Tensor:
        """Text embeddings of a vocabulary: the classifier RegionSpot scores regions against.

        CLIP's text tower with the prompt ensemble (``text_embeddings.py``) on the names as
        ``CLASS_NAME_STYLE`` cleans them, read from or written to the disk cache
        (``TEXT_CACHE_DIR``). Call it once per vocabulary, outside
        the forward; it does not change the model.

        Args:
            class_names: C names (checked by :func:`regionspot.data.vocabularies.check_vocabulary`).

        Returns:
            (C, E) float32 L2-normalised embeddings on the model's device.

        Raises:
            ValueError / TypeError: not a valid vocabulary (empty, blank or duplicate names).
        """
        names = check_vocabulary(class_names, allow_duplicates=True)
        texts = names_for_text(names, self.class_name_style)  # CLASS_NAME_STYLE
        emb = load_or_compute_text_embeddings(
            self.semantic.clip, texts, weights_id=self.clip_weights_id,
            cache_dir=self.text_cache_dir, batch_size=self.text_batch_size,
        )
        return emb.to(self.device)

    def check_text_embeddings(self, text_embeddings: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Return ``text_embeddings`` as float32 on the model's device if they are (C, E).

        Raises:
            ValueError: the shape is not (``num_classes``, E) for this model's CLIP.
        """
        expected = (num_classes, self.semantic.embed_dim)
        if not torch.is_tensor(text_embeddings) or tuple(text_embeddings.shape) != expected:
            got = tuple(text_embeddings.shape) if torch.is_tensor(text_embeddings) else type(text_embeddings).__name__
            raise ValueError(f"text_embeddings must have shape {expected} for this vocabulary and CLIP, got {got}")
        return text_embeddings.float().to(self.device)

    def set_vocabulary(self, class_names: Sequence[str], text_embeddings: Optional[torch.Tensor] = None, *,
                       dataset: Optional[str] = None, ancestors: Optional[Dict[int, List[int]]] = None,
                       allow_duplicates: bool = False) -> None:
        """Set a vocabulary that :meth:`forward` scores against.

        Args:
            class_names: the C names of the vocabulary.
            text_embeddings: optional precomputed (C, E) L2-normalised embeddings for them (e.g.
                a large vocabulary encoded offline); by default :meth:`encode_vocabulary`
                computes them now.
            dataset: None sets the vocabulary of evaluation (and of training inputs without a
                "dataset" key); a training dataset's name sets that dataset's vocabulary: every
                training image is scored against its own dataset's vocabulary, so one batch may
                mix datasets with different vocabularies.
            ancestors: optional class hierarchy of a training dataset ({class index: indices of
                its ancestors}, e.g. V3Det), for ``IGNORE_ANCESTOR_NEGATIVES``.
            allow_duplicates: accept names that read the same to CLIP (a dataset's own
                vocabulary, see :func:`~regionspot.data.vocabularies.check_vocabulary`).

        Raises:
            ValueError: the vocabulary is not valid, or ``text_embeddings`` is not (C, E).
        """
        names = check_vocabulary(class_names, allow_duplicates=allow_duplicates)
        if text_embeddings is None:
            text_embeddings = self.encode_vocabulary(names)
        text_embeddings = self.check_text_embeddings(text_embeddings, len(names))
        if dataset is not None:
            self.training_vocabularies[dataset] = Vocabulary(names, text_embeddings, ancestors)
            return
        self.text_embeddings = text_embeddings
        self.class_names = names
        self.pending_vocabulary = None

    # ----------------------------------------------------------------- speed switches
    def set_sam_attention(self, kind: str) -> None:
        """SAM's image-encoder attention: "sdpa" (``fast_attention.py``) or "official".

        Raises:
            ValueError: another kind.
        """
        if kind not in SAM_ATTENTION_KINDS:
            raise ValueError(f"MODEL.REGIONSPOT.SAM_ATTENTION must be one of {SAM_ATTENTION_KINDS}, got {kind!r}")
        set_sam_attention(self.position.sam.image_encoder, kind)
        self.sam_attention = kind

    def compile_encoders(self, **options) -> None:
        """``torch.compile`` SAM's image encoder and CLIP's image tower in place
        (``MODEL.REGIONSPOT.COMPILE``); parameter names and checkpoints are unchanged.

        The first batch of each new shape compiles (about a minute on a CPU for SAM ViT-B);
        later ones run the compiled code. ``options`` go to ``torch.compile``.
        """
        self.position.sam.image_encoder.compile(**options)
        self.semantic.compile(**options)

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The precision the frozen encoders and SAM's mask decoder compute in
        (:func:`resolve_encoder_precision` of ``encoder_precision`` on this device)."""
        return resolve_encoder_precision(self.encoder_precision, self.device)

    def encoder_autocast(self):
        """Autocast context of the frozen SAM and CLIP at :attr:`encoder_dtype` (a no-op for float32)."""
        dtype = self.encoder_dtype
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def needs_sam_masks(self, protocol: Optional[RecognitionProtocol] = None, mask_on: Optional[bool] = None) -> bool:
        """Whether recognition must compute SAM's masks: for ``MASK_ON`` and for the TAP protocol
        (its score uses SAM's predicted IoU); box AP with the released protocol needs tokens only."""
        protocol = protocol or self.protocol
        mask_on = self.mask_on if mask_on is None else mask_on
        return self.always_decode_masks or mask_on or protocol.selection == "tap"

    # ----------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor], sam_inputs: Optional[Sequence[Optional[torch.Tensor]]] = None,
                      clip_inputs: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[ImageFeatures]:
        """Run the frozen encoders on a batch (step 2): :meth:`encode_sam` and
        :meth:`encode_semantic`, each encoder once for the whole batch.

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB (sizes may differ), any device.
            sam_inputs, clip_inputs: optional per image, the resizes the test mapper made in the
                data-loader workers (see :meth:`encode_sam`, :meth:`encode_semantic`).

        Returns:
            B :class:`ImageFeatures`.
        """
        return ImageFeatures.from_batch(images, *self.encode_sam(images, sam_inputs),
                                        self.encode_semantic(images, clip_inputs))

    @torch.no_grad()
    def encode_sam(self, images: Sequence[torch.Tensor], sam_inputs: Optional[Sequence[Optional[torch.Tensor]]] = None
                   ) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """SAM's image encoder on B images in one call.

        Same resize and normalisation as ``SamPredictor.set_image``; the resize is taken from
        ``sam_inputs[i]`` ((3, h, w) uint8, :func:`~regionspot.modeling.position_tokens.resize_for_sam`
        made by the mapper) when given and of SAM's size, else done here.

        Returns:
            ((B, 256, g, g) embeddings at the encoder precision, B (h, w) sizes inside SAM's
            padded input).
        """
        sam_inputs = sam_inputs if sam_inputs is not None else [None] * len(images)
        prepared = [self.position.preprocess(image, resized) for image, resized in zip(images, sam_inputs)]
        with record_function(STAGE_LABELS["sam_image_encoder"]), self.encoder_autocast():
            embeddings = self.position.encode_images(torch.stack([x for x, _ in prepared]))
        return embeddings, [size for _, size in prepared]

    @torch.no_grad()
    def encode_semantic(self, images: Sequence[torch.Tensor],
                        clip_inputs: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """CLIP's semantic feature maps of B images in one call: (B, L, D) float32.

        ``clip_inputs[i]``: optional (3, S, S) float32 in [0, 1], the image already resized by
        :func:`~regionspot.modeling.semantic_features.resize_for_clip` (the mapper's).
        """
        with record_function(STAGE_LABELS["clip_semantic"]):
            pixels = self.semantic.preprocess(images, clip_inputs)
            with self.encoder_autocast():
                return self.semantic(pixels).float()

    # ----------------------------------------------------------------- proposals
    def generate_proposals(self, source: str, features: Sequence[ImageFeatures],
                           reports: Optional[Sequence[FilterReport]] = None) -> List[Instances]:
        """Proposals that the model computes itself from the images: "rpn" or "sam_auto".

        Selection (``PROPOSAL_SCORE_THRESH``, ``PROPOSAL_NMS_THRESH``, ``PROPOSAL_TOPK``) is
        applied as for a file's boxes. With ``reports`` (one
        :class:`~regionspot.modeling.proposals.filters.FilterReport` per image), SAM's own
        filters ("sam_auto") and the selection record what they removed there.

        Raises:
            ValueError: another source, or "rpn" on a model built without RPN weights.
        """
        if source == "rpn":
            if self.rpn is None:
                raise ValueError('proposals "rpn" need an RPN: build the model with '
                                 'MODEL.REGIONSPOT.RPN_WEIGHTS set (see configs/eval_lvis_rpn.yaml)')
            generated = self.rpn([f.image for f in features])
        elif source == "sam_auto":
            generated = [self.sam_auto(f.image, f.sam_embedding, f.sam_input_size, report=r)
                         for f, r in zip(features, reports or [None] * len(features))]
        else:
            raise ValueError(f'the model generates proposals only for "rpn" and "sam_auto", not {source!r}')
        selected = []
        for p, r in zip(generated, reports or [None] * len(generated)):
            keep = select_proposals(p.proposal_boxes.tensor, logit_to_score(p.objectness_logits),
                                    **self.proposal_selection, report=r)
            selected.append(p[keep])
        return selected

    @_stage("proposals")
    def propose(self, batched_inputs: List[Dict], features: Sequence[ImageFeatures],
                reports: Optional[Sequence[FilterReport]] = None) -> List[Instances]:
        """The boxes to recognise in each image, from the configured source (step 3); with
        ``reports``, what the model's proposal filters removed (:meth:`generate_proposals`).

        Returns:
            B ``Instances`` with ``proposal_boxes`` (XYXY_ABS pixels of the encoded image) and
            ``objectness_logits`` (+ ``proposal_masks`` for "sam_auto").

        Raises:
            ValueError: an input lacks what its source needs (named by file name).
        """
        if self.proposal_source in ("rpn", "sam_auto"):
            return self.generate_proposals(self.proposal_source, features, reports)
        key = "instances" if self.proposal_source == "gt" else "proposals"
        out = []
        for x in batched_inputs:
            if key not in x:
                what = ("'instances' with gt_boxes (MODEL.REGIONSPOT.PROPOSALS is 'gt': the given boxes are the "
                        "proposals; to recognise your own boxes use RegionSpotPredictor.predict(boxes), or set "
                        "PROPOSALS to 'sam_auto' or 'rpn' to find regions without boxes)"
                        if key == "instances" else
                        "'proposals' (with PROPOSALS 'file' the test loader attaches them from the proposal file)")
                raise ValueError(f"image {x.get('file_name', '?')!r} has no boxes to recognise: "
                                 f"RegionSpot needs {what}")
            out.append(proposals_from_ground_truth(x[key]) if key == "instances" else x[key])
        return [p.to(self.device) for p in out]

    # ----------------------------------------------------------------- recognition
    @torch.no_grad()
    def prompt_boxes(self, features: Sequence[ImageFeatures], proposals: Sequence[Instances],
                     with_masks: bool = True) -> List[BoxPrompts]:
        """SAM's prompt encoder and mask decoder on the proposal boxes of B images, all boxes of
        the batch together in chunks of ``BOX_CHUNK_SIZE``: position-aware tokens and, with
        ``with_masks``, low-resolution masks and predicted IoUs (:class:`BoxPrompts`), per image."""
        if not features:
            return []
        embeddings = torch.stack([f.sam_embedding for f in features])
        with record_function(STAGE_LABELS["sam_prompt_decoder"]), self.encoder_autocast():
            return self.position.prompt(embeddings, [p.proposal_boxes.tensor for p in proposals],
                                        [f.image_size for f in features], with_masks)

    def recognize(self, features: Sequence[ImageFeatures], proposals: Sequence[Instances],
                  text_embeddings: torch.Tensor, prompts: Optional[Sequence[BoxPrompts]] = None,
                  with_masks: bool = True) -> List[RegionRecognition]:
        """Position-aware tokens of each proposal, the head, and logits (step 4).

        SAM runs without gradients; the head runs with them in training mode.

        Args:
            features: B :class:`ImageFeatures`.
            proposals: B ``Instances`` with ``proposal_boxes`` in the frame of each image.
            text_embeddings: (C, E) float32 text embeddings on the model's device.
            prompts: the :meth:`prompt_boxes` of these proposals, if already computed.
            with_masks: compute SAM's masks and predicted IoUs too (:meth:`needs_sam_masks`).

        Returns:
            B :class:`RegionRecognition`.
        """
        prompts = prompts if prompts is not None else self.prompt_boxes(features, proposals, with_masks)
        keep = [i for i, pr in enumerate(prompts) if pr.tokens.shape[0] > 0]
        logits = [torch.zeros(0, text_embeddings.shape[0], device=self.device) for _ in prompts]
        if keep:
            semantic = torch.stack([features[i].semantic for i in keep])
            embeddings = self._run_head([prompts[i].tokens for i in keep], semantic)
            for i, e in zip(keep, embeddings):
                logits[i] = region_logits(e, text_embeddings, self.logit_scale)
        return [RegionRecognition(p, lg, pr.iou_predictions, pr.low_res_masks, f.sam_input_size)
                for f, p, pr, lg in zip(features, proposals, prompts, logits)]

    def _run_head(self, tokens: List[torch.Tensor], semantic: torch.Tensor) -> List[torch.Tensor]:
        """The head on B images: (N_i, T) token lists padded into one batch with a padding mask.

        Returns:
            B tensors (N_i, E) of region embeddings.
        """
        counts = [t.shape[0] for t in tokens]
        padded = nn.utils.rnn.pad_sequence(tokens, batch_first=True)
        padding_mask = torch.arange(padded.shape[1], device=padded.device)[None] >= torch.tensor(
            counts, device=padded.device)[:, None]
        with record_function(STAGE_LABELS["head"]):
            out = self.head(padded, semantic, padding_mask if min(counts) < padded.shape[1] else None)
        return [out[i, :n] for i, n in enumerate(counts)]

    @torch.no_grad()
    @_stage("postprocess")
    def postprocess(self, recognition: RegionRecognition, output_size: Tuple[int, int],
                    protocol: Optional[RecognitionProtocol] = None, mask_on: Optional[bool] = None,
                    report: Optional[FilterReport] = None) -> Instances:
        """Scored detections of one image in the output frame (step 5).

        Args:
            recognition: the image's :class:`RegionRecognition`.
            output_size: (H_out, W_out) to report boxes and masks in (the original image).
            protocol: scoring and selection (default: the model's, from the config).
            mask_on: paste masks (default: ``MODEL.MASK_ON``). One mask per kept box, shared
                by all its detections: the ``sam_auto`` mask if the proposal has one, else
                SAM's box-prompted mask.
            report: the image's :class:`~regionspot.modeling.proposals.filters.FilterReport`,
                to which the protocol's selection steps add what they removed.

        Returns:
            ``Instances`` of size ``output_size`` with ``pred_boxes``, ``scores``,
            ``pred_classes``, ``proposal_scores`` (+ ``pred_masks``; + ``class_probs``, the
            (K, C) class probabilities, for the "per_box" selection).
        """
        protocol = protocol or self.protocol
        mask_on = self.mask_on if mask_on is None else mask_on
        proposals = recognition.proposals
        boxes = proposals.proposal_boxes.tensor
        probs = class_probabilities(recognition.logits, protocol.class_score)
        det = select_detections(probs, recognition.proposal_scores, boxes, protocol, recognition.iou_predictions,
                                report=report)
        out_h, out_w = output_size
        in_h, in_w = proposals.image_size
        result = Instances((out_h, out_w))
        out_boxes = Boxes(boxes[det.box_index].clone())
        out_boxes.scale(out_w / in_w, out_h / in_h)
        out_boxes.clip((out_h, out_w))
        result.pred_boxes = out_boxes
        result.scores = det.scores
        result.pred_classes = det.classes
        result.proposal_scores = recognition.proposal_scores[det.box_index]
        if protocol.selection == "per_box":
            result.class_probs = probs[det.box_index]
        if mask_on:
            kept, inverse = torch.unique(det.box_index, return_inverse=True)
            if proposals.has("proposal_masks"):
                bitmaps = resize_masks(proposals.proposal_masks[kept], (out_h, out_w))
            elif recognition.low_res_masks is None:
                raise RuntimeError("masks were asked for but SAM's masks were not computed: recognise with "
                                   "with_masks=True (RegionSpot.needs_sam_masks)")
            else:
                bitmaps = self.position.paste_masks(recognition.low_res_masks[kept], recognition.sam_input_size,
                                                    (out_h, out_w))
            result.pred_masks = SharedMasks(bitmaps, inverse)
        return result

    def inference(self, features: Sequence[ImageFeatures], proposals: Sequence[Instances],
                  text_embeddings: torch.Tensor, output_sizes: Sequence[Tuple[int, int]],
                  protocol: Optional[RecognitionProtocol] = None, mask_on: Optional[bool] = None,
                  reports: Optional[Sequence[FilterReport]] = None) -> List[Instances]:
        """Steps 4-5 for B encoded images: :meth:`recognize` (SAM's masks only if
        :meth:`needs_sam_masks`), then :meth:`postprocess` each (with its image's report, if
        ``reports`` is given)."""
        recognitions = self.recognize(features, proposals, text_embeddings,
                                      with_masks=self.needs_sam_masks(protocol, mask_on))
        reports = reports or [None] * len(recognitions)
        return [self.postprocess(r, size, protocol, mask_on, report)
                for r, size, report in zip(recognitions, output_sizes, reports)]

    # ----------------------------------------------------------------- forward
    @staticmethod
    def _check_images(batched_inputs: List[Dict]) -> List[torch.Tensor]:
        """Each input's ``"image"`` as a (3, H, W) uint8 RGB tensor.

        Accepts uint8, and floating-point images with values in [0, 255] (what Detectron2's
        ``DefaultPredictor``, its test-time augmentation and many mappers hand a model); those
        are cast to uint8 as the released implementation does, so a uint8 image given as float
        gives exactly the same result.

        Raises:
            ValueError: not a (3, H, W) tensor, another dtype, NaN / infinite values or values
                outside [0, 255] (the message names the image).
        """
        images = []
        for x in batched_inputs:
            image = x.get("image")
            name = x.get("file_name", "?")
            if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3:
                got = f"shape {tuple(image.shape)}" if torch.is_tensor(image) else type(image).__name__
                raise ValueError(f"image {name!r} must be a (3, H, W) RGB tensor (uint8, or float in 0-255), got {got}")
            if image.is_floating_point():
                if not bool(torch.isfinite(image).all()):
                    raise ValueError(f"image {name!r} holds NaN or infinite values")
                low, high = float(image.min()), float(image.max())
                if low < 0 or high > 255:
                    raise ValueError(f"image {name!r} must hold values in 0-255 (float or uint8), got "
                                     f"{low:g} to {high:g}")
                image = image.to(torch.uint8)
            elif image.dtype != torch.uint8:
                raise ValueError(f"image {name!r} must be uint8 or float in 0-255, got {image.dtype}")
            images.append(image)
        return images

    def forward(self, batched_inputs: List[Dict]):
        """Training: dict of losses. Inference: list of {"instances": Instances, "filters":
        FilterReport} (see class doc; "filters" says what each selection step removed from the
        image's candidates, :mod:`~regionspot.modeling.proposals.filters`).

        Raises:
            RuntimeError: no vocabulary was set (:meth:`set_vocabulary`).
            ValueError: a bad image tensor, or an input without the boxes its source needs.
        """
        images = self._check_images(batched_inputs)
        if self.training:
            return self.losses(batched_inputs, images)
        if self.text_embeddings is None and self.pending_vocabulary:
            logger.info("Text embeddings of the config's vocabulary (%d classes), once", len(self.pending_vocabulary))
            self.set_vocabulary(self.pending_vocabulary, allow_duplicates=True)
        if self.text_embeddings is None:
            raise RuntimeError("RegionSpot has no vocabulary to score against: call "
                               "model.set_vocabulary(class_names) first (train_net.py does it per dataset)")
        features = self.encode_images(images, [x.get("sam_input") for x in batched_inputs],
                                      [x.get("clip_input") for x in batched_inputs])
        reports = [report_of_input(x) for x in batched_inputs]  # + a proposal file's selection
        proposals = self.propose(batched_inputs, features, reports)
        sizes = [(x.get("height", f.image_size[0]), x.get("width", f.image_size[1]))
                 for x, f in zip(batched_inputs, features)]
        results = self.inference(features, proposals, self.text_embeddings, sizes, reports=reports)
        return [{"instances": r, "filters": report} for r, report in zip(results, reports)]

    def vocabulary_of(self, inputs: Dict) -> Vocabulary:
        """The training vocabulary of one input: its dataset's (``inputs["dataset"]``), else the
        vocabulary set without a dataset.

        Raises:
            RuntimeError: no vocabulary was set for it.
        """
        name = inputs.get("dataset")
        if name is not None and name in self.training_vocabularies:
            return self.training_vocabularies[name]
        if self.text_embeddings is None:
            raise RuntimeError(f"no vocabulary for training image {inputs.get('file_name', '?')!r} (dataset "
                               f"{name!r}): call model.set_vocabulary(names, dataset=...) first (train_net.py does)")
        return Vocabulary(self.class_names, self.text_embeddings)

    def training_tokens(self, batched_inputs: List[Dict], images: List[torch.Tensor]) -> List[torch.Tensor]:
        """Position-aware tokens of the training boxes: from the SAM-token cache when the mapper
        attached them (``instances.sam_tokens``), else from SAM run now on ``"sam_image"`` (the
        original image, flipped as the augmentation flipped it; the image the cache was made
        from) with ``instances.sam_boxes``, or on ``"image"`` with ``gt_boxes``.

        Returns:
            B tensors (N_i, T) float32 on the model's device.
        """
        tokens: List[Optional[torch.Tensor]] = [None] * len(batched_inputs)
        online = []
        for i, x in enumerate(batched_inputs):
            instances = x["instances"]
            if instances.has("sam_tokens"):
                tokens[i] = instances.sam_tokens.to(self.device).float()
            else:
                online.append(i)
        if online:
            sam_images = [batched_inputs[i].get("sam_image", images[i]) for i in online]
            embeddings, _ = self.encode_sam(sam_images, [batched_inputs[i].get("sam_input") for i in online])
            boxes = []
            for i in online:
                instances = batched_inputs[i]["instances"]
                boxes.append((instances.sam_boxes if instances.has("sam_boxes") else instances.gt_boxes).tensor)
            with torch.no_grad(), self.encoder_autocast():
                prompts = self.position.prompt(embeddings, boxes, [tuple(im.shape[-2:]) for im in sam_images],
                                               with_masks=False)
            for i, p in zip(online, prompts):
                tokens[i] = p.tokens
        return tokens

    def ignored_negatives(self, inputs: Dict, labels: torch.Tensor, vocabulary: Vocabulary) -> Optional[torch.Tensor]:
        """(M, C) bool classes that are not negatives for an image's M regions, or None.

        - ``IGNORE_UNVERIFIED_NEGATIVES``: with ``inputs["image_level_labels"]`` (OpenImages'
          verified image-level labels, contiguous ids), every class whose presence or absence
          was not verified for the image;
        - ``IGNORE_ANCESTOR_NEGATIVES``: the ancestors of each region's class in the
          vocabulary's hierarchy (V3Det);
        - always: classes whose names read the same to CLIP as the region's class
          (:attr:`Vocabulary.aliases`), which no text embedding can tell apart.
        """
        m, c = labels.shape[0], len(vocabulary.names)
        ignore = None
        if vocabulary.aliases:
            for row, label in enumerate(labels.tolist()):
                twins = vocabulary.aliases.get(label)
                if twins:
                    ignore = ignore if ignore is not None else torch.zeros(m, c, dtype=torch.bool, device=labels.device)
                    ignore[row, twins] = True
        verified = inputs.get("image_level_labels")
        if self.ignore_unverified_negatives and verified is not None:
            known = torch.zeros(c, dtype=torch.bool, device=labels.device)
            known[torch.as_tensor(list(verified), dtype=torch.long, device=labels.device)] = True
            known[labels] = True
            unverified = (~known)[None].expand(m, c)
            ignore = unverified.clone() if ignore is None else ignore | unverified
        if self.ignore_ancestor_negatives and vocabulary.ancestors:
            ignore = ignore if ignore is not None else torch.zeros(m, c, dtype=torch.bool, device=labels.device)
            for row, label in enumerate(labels.tolist()):
                parents = vocabulary.ancestors.get(label)
                if parents:
                    ignore[row, parents] = True
        return ignore

    def losses(self, batched_inputs: List[Dict], images: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Sigmoid focal loss of every region of the batch, each image against its own dataset's
        vocabulary (paper Sec. 3; ``losses.py``): the mean over all regions of the batch.

        Raises:
            ValueError: an input without "instances" (gt_boxes and gt_classes).
        """
        missing = [x.get("file_name", "?") for x in batched_inputs if "instances" not in x]
        if missing:
            raise ValueError(f"image {missing[0]!r} has no 'instances': training needs gt_boxes and gt_classes")
        vocabularies = [self.vocabulary_of(x) for x in batched_inputs]
        tokens = self.training_tokens(batched_inputs, images)
        keep = [i for i, t in enumerate(tokens) if t.shape[0] > 0]
        if not keep:  # keep every head parameter in the graph (DDP) with a zero loss
            return {"loss_region_focal": sum(p.sum() for p in self.head.parameters()) * 0.0}
        semantic = self.encode_semantic([images[i] for i in keep], [batched_inputs[i].get("clip_input") for i in keep])
        losses = []
        for i, embeddings in zip(keep, self._run_head([tokens[i] for i in keep], semantic)):
            vocabulary, x = vocabularies[i], batched_inputs[i]
            labels = x["instances"].gt_classes.to(self.device)
            logits = region_logits(embeddings, vocabulary.text_embeddings, self.logit_scale)
            losses.append(region_focal_losses(logits, labels, self.focal_alpha, self.focal_gamma,
                                              self.focal_negative_classes, self.ignored_negatives(x, labels, vocabulary)))
        return {"loss_region_focal": torch.cat(losses).mean()}
