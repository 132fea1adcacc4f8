"""What every layer may read of RegionSpot's config: ``add_regionspot_config(cfg)`` (every
``MODEL.REGIONSPOT.*`` key, with its default and meaning), :class:`ConfigError` (a value that
cannot work, raised by whatever checks the key) and the ``MODEL.DEVICE`` policy
(:func:`resolve_device`, :func:`resolve_config_device`).

Loading and checking a config file is :mod:`regionspot.config`, which re-exports these names;
it sits above ``data/``, ``evaluation/`` and ``modeling/`` (it asks them for their allowed
values), while this module imports none of them, so every layer may import it.
"""

import logging

from detectron2.config import CfgNode as CN

# The loader's logger: the device notice has always been a "regionspot.config" line.
logger = logging.getLogger("regionspot.config")


def add_regionspot_config(cfg: CN) -> None:
    """Add RegionSpot's keys to a Detectron2 config (in place).

    Defaults reproduce the released RegionSpot-BB evaluation protocol (docs/method.md §2-3);
    the yaml files under ``configs/`` set the paper's variants.
    """
    cfg.MODEL.REGIONSPOT = CN()
    rs = cfg.MODEL.REGIONSPOT
    # The frozen foundation models' families (modeling/backbones.py registries): the localizer
    # ("sam", "sam_hq", "sam2") and the vision-language model ("openai_clip", "open_clip").
    rs.LOCALIZER = "sam"
    rs.VL_MODEL = "openai_clip"
    # VL_MODEL open_clip: the built-in OpenCLIP architecture of a CLIP_WEIGHTS file (e.g.
    # "ViT-B-16"; empty when CLIP_WEIGHTS is a hub-layout folder with open_clip_config.json), and a
    # local tokenizer folder for models whose tokenizer OpenCLIP would download.
    rs.OPENCLIP_MODEL = ""
    rs.OPENCLIP_TOKENIZER = ""
    # LOCALIZER sam2: the sam2 package's config yaml of SAM_WEIGHTS (a path, or one inside the
    # package such as "configs/sam2.1/sam2.1_hiera_s.yaml"); empty: chosen from the checkpoint's
    # tensors among the official SAM 2 / 2.1 models (modeling/sam2_localizer.py).
    rs.SAM2_CONFIG = ""
    # Frozen foundation models: local copies of the official files (never downloaded).
    rs.SAM_WEIGHTS = "weights/sam_vit_b_01ec64.pth"
    rs.CLIP_WEIGHTS = "weights/ViT-B-16.pt"
    # Position-aware token: "transformer" (mask token 0 after the mask decoder's transformer,
    # as released), "prompt_encoder" or "mlp" (paper Table 4b).
    rs.TOKEN_SOURCE = "transformer"
    # Boxes per SAM mask-decoder call (SAM copies the image embedding per box).
    rs.BOX_CHUNK_SIZE = 64
    # CLIP input side S in pixels (224 or 336); positional embeddings are resized to it.
    rs.CLIP_INPUT_SIZE = 224
    # Keep CLIP's class token in the semantic feature map (paper Table 4a).
    rs.USE_CLASS_TOKEN = True
    # Antialias the resize to S x S (False reproduces the released weights).
    rs.CLIP_RESIZE_ANTIALIAS = False
    # Head: decoder depth (Table 4c), heads, FFN width, dropout.
    rs.NUM_DECODER_LAYERS = 3
    rs.NUM_HEADS = 8
    rs.DIM_FEEDFORWARD = 2048
    rs.DROPOUT = 0.1
    # logits = LOGIT_SCALE * cos(region, text); CLIP's fixed logit_scale.exp() = 100.
    rs.LOGIT_SCALE = 100.0
    # Vocabulary: "dataset" uses each dataset's thing_classes from the MetadataCatalog;
    # "lvis", "coco", "objects365", or "custom" with CUSTOM_VOCABULARY "a,b,c".
    rs.VOCABULARY = "dataset"
    rs.CUSTOM_VOCABULARY = ""
    # How a class name becomes the text of its prompts (data/vocabularies.py, clean_class_name):
    # "released" (the released weights' text: suffixes -other/-merged/-stuff removed) or
    # "natural" (also underscores -> spaces, "a/b" -> "a or b"). Training and inference share it.
    rs.CLASS_NAME_STYLE = "released"
    # Text embeddings: disk cache keyed by CLIP weights, vocabulary and templates
    # ("" disables it); prompts encoded per batch.
    rs.TEXT_CACHE_DIR = "~/.cache/regionspot/text_embeddings"
    rs.TEXT_BATCH_SIZE = 256
    # Training loss: sigmoid focal loss (paper Sec. 3).
    rs.FOCAL_ALPHA = 0.25
    rs.FOCAL_GAMMA = 2.0
    # The negatives of a region weigh as much as this many classes whatever the vocabulary
    # size (364: the released sum-over-classes loss on Objects365's 365 classes).
    rs.FOCAL_NEGATIVE_CLASSES = 364.0
    # Inference protocol (modeling/postprocess.py). Class scores: "softmax" over the vocabulary
    # (released) or "sigmoid"; fused score = proposal score ** PROPOSAL_SCORE_POWER x class
    # probability (1: released behaviour with detector boxes; 0: ignore the proposal score).
    rs.TEST_SCORE = "softmax"
    rs.PROPOSAL_SCORE_POWER = 1.0
    # Selection: "topk" keeps the TEST_TOPK best (box, class) pairs per image (900 released;
    # the LVIS evaluator then keeps TEST.DETECTIONS_PER_IMAGE = 300); "tap" is TAP's protocol
    # (every class above TAP_CLASS_THRESH per box, score sqrt(p x SAM's predicted IoU)).
    rs.TEST_PROTOCOL = "topk"
    rs.TEST_TOPK = 900
    # Per-class NMS IoU among the detections (0: off, as released; TAP uses 0.5).
    rs.TEST_NMS_THRESH = 0.0
    rs.TAP_CLASS_THRESH = 0.001

    # Proposals: where the boxes to recognise come from at test time (training always uses the
    # ground truth): "gt" (the dataset's boxes, score 1), "file" (a detector's results on disk),
    # "rpn" (Detectron2's RPN, built from MODEL.BACKBONE/RESNETS/FPN/ANCHOR_GENERATOR/RPN) or
    # "sam_auto" (SAM's automatic mask generator). See modeling/proposals/.
    rs.PROPOSALS = "gt"
    # "file": one file for the single test dataset (or DATASETS.PROPOSAL_FILES_TEST, one per
    # dataset); format "auto" (from the content), "glip", "coco" or "detectron2".
    rs.PROPOSAL_FILE = ""
    rs.PROPOSAL_FILE_FORMAT = "auto"
    # Selection of predicted proposals (file, rpn, sam_auto): score threshold, class-agnostic
    # NMS IoU (0: off), then at most PROPOSAL_TOPK per image, best first.
    rs.PROPOSAL_SCORE_THRESH = 0.0
    rs.PROPOSAL_NMS_THRESH = 0.0
    rs.PROPOSAL_TOPK = 1000
    # "rpn": the RPN's own weights file (Detectron2 .pkl/.pth) and the channel order its pixel
    # mean/std expect (BGR for Detectron2's model zoo and RegionCLIP's RPN).
    rs.RPN_WEIGHTS = ""
    rs.RPN_INPUT_FORMAT = "BGR"
    # "sam_auto": segment_anything's SamAutomaticMaskGenerator settings (its defaults).
    rs.SAM_AUTO = CN()
    rs.SAM_AUTO.POINTS_PER_SIDE = 32
    rs.SAM_AUTO.POINTS_PER_BATCH = 64
    rs.SAM_AUTO.PRED_IOU_THRESH = 0.88
    rs.SAM_AUTO.STABILITY_SCORE_THRESH = 0.95
    rs.SAM_AUTO.BOX_NMS_THRESH = 0.7
    rs.SAM_AUTO.CROP_N_LAYERS = 0
    rs.SAM_AUTO.MIN_MASK_REGION_AREA = 0

    # Speed switches (docs/speed.md; each measured against float32 by tools/benchmark.py e2e).
    # Precision of the frozen SAM and CLIP (encoders and SAM's mask decoder): "auto" = float16
    # on CUDA (the released autocast) and float32 on the CPU; or "float32", "bfloat16", "float16".
    rs.ENCODER_PRECISION = "auto"
    # SAM image-encoder attention: "sdpa" (torch's scaled_dot_product_attention with the
    # relative-position term as a bias; the official result up to float rounding) or "official".
    rs.SAM_ATTENTION = "sdpa"
    # torch.compile SAM's image encoder and CLIP's image tower (the first batch compiles).
    rs.COMPILE = False
    # The mapper makes SAM's and CLIP's resizes of each image in the data-loader workers, off the
    # model's critical path (False: the model resizes on its device). SAM_INPUT_SIZE: SAM's input
    # side (1024 for the official models; the model resizes again if its SAM's differs).
    rs.LOADER_RESIZE = True
    rs.SAM_INPUT_SIZE = 1024
    # Images per batch at test time: SAM's and CLIP's encoders, the mask decoder and the head
    # each run once per batch. 0: 16 on CUDA, 1 on the CPU (where batching gains nothing).
    cfg.TEST.IMS_PER_BATCH = 0

    # Training data. SAM-token cache written by tools/extract_sam_tokens.py ("" runs SAM online;
    # the cache holds the tokens of every annotated box of the image and of its flip).
    rs.TOKEN_CACHE_DIR = ""
    # Noisy negatives (off by default): leave out of a region's negatives the classes whose
    # absence was not verified for the image (OpenImages' image-level labels), and the ancestors
    # of its class in a hierarchy (V3Det).
    rs.IGNORE_UNVERIFIED_NEGATIVES = False
    rs.IGNORE_ANCESTOR_NEGATIVES = False
    # Your own COCO/LVIS-format datasets from the config alone: [[NAME, JSON, IMAGE_ROOT], ...],
    # registered by load_config (the same as --register NAME JSON IMAGE_ROOT on the command line).
    cfg.DATASETS.REGISTER = []
    # Sampling weight of each DATASETS.TRAIN dataset (empty: every image equally likely); a
    # batch may mix datasets, each image scored against its own dataset's vocabulary.
    cfg.DATALOADER.DATASET_RATIO = []
    # Mixed precision of the head's training (SOLVER.AMP.ENABLED): "bfloat16" (no loss
    # scaling) or "float16" (with Detectron2-style gradient scaling, CUDA only).
    cfg.SOLVER.AMP.PRECISION = "bfloat16"

    # RegionSpot reads RGB images; SAM and CLIP normalise them themselves.
    cfg.INPUT.FORMAT = "RGB"
    # LVIS's standard cap on detections per image, applied by the LVIS evaluator.
    cfg.TEST.DETECTIONS_PER_IMAGE = 300
    # What computes LVIS AP: "lvis" (the LVIS API through Detectron2's LVISEvaluator, the
    # reference) or "faster_coco_eval" (the same numbers from faster-coco-eval's C++ LVIS mode,
    # much faster on LVIS val; LVIS-format datasets only). See regionspot/evaluation/fast_lvis.py.
    cfg.TEST.EVALUATOR_BACKEND = "lvis"
    # "auto": the GPU when there is one, else the CPU (with a notice); "cuda", "cuda:1", "cpu"
    # ask for that device and are an error if it is not there.
    cfg.MODEL.DEVICE = "auto"
    # Minutes a process waits in a collective (all-reduce, barrier, all-gather) before the
    # process group gives up: the longest a job hangs when a rank dies without the launcher
    # noticing (torch's default for gloo and NCCL is 30).
    cfg.DIST_TIMEOUT_MINUTES = 30


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def resolve_device(device: str) -> str:
    """The torch device a ``MODEL.DEVICE`` value names, checked to exist.

    Args:
        device: "auto" (CUDA when available, else "cpu" with a logged notice), "cpu",
            "cuda" or "cuda:N".

    Returns:
        "cpu", "cuda" or "cuda:N".

    Raises:
        ConfigError: an unknown device, or a CUDA device that this machine does not have.
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        logger.info("MODEL.DEVICE is 'auto' and no CUDA GPU is available: running on the CPU")
        return "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"MODEL.DEVICE {device!r} is not a device (expected 'auto', 'cpu', 'cuda' or "
                          f"'cuda:N'): {e}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"MODEL.DEVICE is {device!r} but this machine has no usable CUDA GPU; set "
                              f"MODEL.DEVICE cpu (or auto)")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"MODEL.DEVICE is {device!r} but this machine has {count} CUDA GPU(s)")
    elif parsed.type != "cpu":
        raise ConfigError(f"MODEL.DEVICE {device!r}: RegionSpot runs on 'cpu' or 'cuda' devices")
    return device


def resolve_config_device(cfg) -> None:
    """Resolve ``MODEL.DEVICE "auto"`` in ``cfg`` in place (CUDA when available, else the CPU;
    :func:`regionspot.config.resolve_device`), so that a config from Detectron2's own
    ``get_cfg()`` + ``add_regionspot_config`` builds with ``build_model`` and
    ``DefaultPredictor``, which move the model to ``cfg.MODEL.DEVICE``. A frozen config stays
    frozen."""
    if cfg.MODEL.DEVICE != "auto":
        return
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.DEVICE = resolve_device("auto")
    if frozen:
        cfg.freeze()
