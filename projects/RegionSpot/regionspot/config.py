"""``add_regionspot_config(cfg)``: every ``MODEL.REGIONSPOT.*`` key, with its meaning;
``load_config``: a checked config, its device resolved."""

import logging

from detectron2.config import CfgNode as CN

logger = logging.getLogger(__name__)


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


def check_config(cfg: CN) -> None:
    """Check the values RegionSpot and its data path read, naming the key of the first bad one.

    Raises:
        ConfigError: a size or count that must be positive, a probability or threshold outside
            its range, or a name that is not among the allowed values.
    """
    from .data.proposal_files import PROPOSAL_FILE_FORMATS
    from .data.vocabularies import BUILTIN_VOCABULARIES, CLASS_NAME_STYLES
    from .evaluation.fast_lvis import EVALUATOR_BACKENDS
    from .modeling.fast_attention import SAM_ATTENTION_KINDS
    from .modeling.position_tokens import TOKEN_SOURCES
    from .modeling.postprocess import RecognitionProtocol
    from .modeling.precision import ENCODER_PRECISIONS
    from .modeling.proposals.rpn import RPN_INPUT_FORMATS
    from .modeling.proposals.sam_auto import SamAutoProposalGenerator
    from .proposal_sources import PROPOSAL_SOURCES

    rs = cfg.MODEL.REGIONSPOT
    positive = {
        "INPUT.MIN_SIZE_TEST": cfg.INPUT.MIN_SIZE_TEST, "INPUT.MAX_SIZE_TEST": cfg.INPUT.MAX_SIZE_TEST,
        "INPUT.MAX_SIZE_TRAIN": cfg.INPUT.MAX_SIZE_TRAIN, "SOLVER.IMS_PER_BATCH": cfg.SOLVER.IMS_PER_BATCH,
        "MODEL.REGIONSPOT.BOX_CHUNK_SIZE": rs.BOX_CHUNK_SIZE, "MODEL.REGIONSPOT.CLIP_INPUT_SIZE": rs.CLIP_INPUT_SIZE,
        "MODEL.REGIONSPOT.NUM_DECODER_LAYERS": rs.NUM_DECODER_LAYERS, "MODEL.REGIONSPOT.NUM_HEADS": rs.NUM_HEADS,
        "MODEL.REGIONSPOT.DIM_FEEDFORWARD": rs.DIM_FEEDFORWARD, "MODEL.REGIONSPOT.TEXT_BATCH_SIZE": rs.TEXT_BATCH_SIZE,
        "MODEL.REGIONSPOT.PROPOSAL_TOPK": rs.PROPOSAL_TOPK, "MODEL.REGIONSPOT.LOGIT_SCALE": rs.LOGIT_SCALE,
        "MODEL.REGIONSPOT.SAM_INPUT_SIZE": rs.SAM_INPUT_SIZE,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be positive, got {value!r}")
    for size in cfg.INPUT.MIN_SIZE_TRAIN:
        if not size > 0:
            raise ConfigError(f"INPUT.MIN_SIZE_TRAIN must hold positive sizes, got {tuple(cfg.INPUT.MIN_SIZE_TRAIN)}")
    ranges = {
        "MODEL.REGIONSPOT.DROPOUT": (rs.DROPOUT, 0.0, 1.0, False),
        "MODEL.REGIONSPOT.PROPOSAL_SCORE_THRESH": (rs.PROPOSAL_SCORE_THRESH, 0.0, 1.0, True),
        "MODEL.REGIONSPOT.PROPOSAL_NMS_THRESH": (rs.PROPOSAL_NMS_THRESH, 0.0, 1.0, True),
        "MODEL.REGIONSPOT.FOCAL_ALPHA": (rs.FOCAL_ALPHA, 0.0, 1.0, True),
    }
    for key, (value, low, high, closed) in ranges.items():
        if not (low <= value <= high if closed else low <= value < high):
            raise ConfigError(f"{key} must be in [{low:g}, {high:g}{']' if closed else ')'}, got {value!r}")
    if cfg.TEST.IMS_PER_BATCH < 0:
        raise ConfigError(f"TEST.IMS_PER_BATCH must be positive, or 0 for 16 on CUDA and 1 on the CPU, "
                          f"got {cfg.TEST.IMS_PER_BATCH}")
    if cfg.DATALOADER.NUM_WORKERS < 0 or cfg.SOLVER.MAX_ITER < 0 or rs.FOCAL_GAMMA < 0 or rs.FOCAL_NEGATIVE_CLASSES < 0:
        raise ConfigError("DATALOADER.NUM_WORKERS, SOLVER.MAX_ITER, MODEL.REGIONSPOT.FOCAL_GAMMA and "
                          "FOCAL_NEGATIVE_CLASSES must not be negative")
    choices = {
        "MODEL.REGIONSPOT.TOKEN_SOURCE": (rs.TOKEN_SOURCE, TOKEN_SOURCES),
        "MODEL.REGIONSPOT.PROPOSALS": (rs.PROPOSALS, PROPOSAL_SOURCES),
        "MODEL.REGIONSPOT.PROPOSAL_FILE_FORMAT": (rs.PROPOSAL_FILE_FORMAT, ("auto",) + PROPOSAL_FILE_FORMATS),
        "MODEL.REGIONSPOT.RPN_INPUT_FORMAT": (rs.RPN_INPUT_FORMAT, RPN_INPUT_FORMATS),
        "MODEL.REGIONSPOT.VOCABULARY": (rs.VOCABULARY, ("dataset",) + BUILTIN_VOCABULARIES + ("custom",)),
        "MODEL.REGIONSPOT.CLASS_NAME_STYLE": (rs.CLASS_NAME_STYLE, CLASS_NAME_STYLES),
        "MODEL.REGIONSPOT.ENCODER_PRECISION": (rs.ENCODER_PRECISION, ENCODER_PRECISIONS),
        "MODEL.REGIONSPOT.SAM_ATTENTION": (rs.SAM_ATTENTION, SAM_ATTENTION_KINDS),
        "TEST.EVALUATOR_BACKEND": (cfg.TEST.EVALUATOR_BACKEND, EVALUATOR_BACKENDS),
        "SOLVER.AMP.PRECISION": (cfg.SOLVER.AMP.PRECISION, ("bfloat16", "float16")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
    ratios = list(cfg.DATALOADER.DATASET_RATIO)
    if ratios and (len(ratios) != len(cfg.DATASETS.TRAIN) or min(ratios) <= 0):
        raise ConfigError(f"DATALOADER.DATASET_RATIO needs one positive ratio per DATASETS.TRAIN dataset "
                          f"({len(cfg.DATASETS.TRAIN)}), got {ratios}")
    if rs.VOCABULARY == "custom" and not rs.CUSTOM_VOCABULARY.strip():
        raise ConfigError('MODEL.REGIONSPOT.VOCABULARY is "custom" but MODEL.REGIONSPOT.CUSTOM_VOCABULARY is empty '
                          '(give class names as "a,b,c")')
    try:
        RecognitionProtocol.from_config(cfg)
        SamAutoProposalGenerator.settings_from_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_config(config_file: str, opts=()) -> CN:
    """Detectron2's default config + :func:`add_regionspot_config`, merged with a yaml file
    and ``KEY VALUE`` overrides, checked (:func:`check_config`), with ``MODEL.DEVICE``
    resolved (:func:`resolve_device`); not frozen.

    Raises:
        ConfigError: a key that does not exist (one line naming the key, the yaml file or the
            command line it came from, and the closest real keys), overrides of odd length,
            a value of the wrong type, or a value that cannot work (the message names the key).
        FileNotFoundError: ``config_file`` does not exist.
    """
    import os

    from detectron2.config import get_cfg

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file!r}")
    opts = list(opts)
    cfg = get_cfg()
    add_regionspot_config(cfg)
    _merge(cfg, lambda: cfg.merge_from_file(config_file), config_file, "file", config_file)
    if len(opts) % 2:
        raise ConfigError(f"config overrides must be KEY VALUE pairs, got an odd number of items on the command "
                          f"line: {opts}")
    _merge(cfg, lambda: cfg.merge_from_list(opts), config_file, "command line")
    check_config(cfg)
    register_config_datasets(cfg)
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE)
    return cfg


def config_keys(cfg: CN, prefix: str = "") -> list:
    """Every full key of ``cfg`` (``"MODEL.REGIONSPOT.PROPOSAL_TOPK"``, ...), sorted."""
    keys = []
    for name, value in cfg.items():
        key = f"{prefix}{name}"
        keys.extend(config_keys(value, key + ".") if isinstance(value, CN) else [key])
    return sorted(keys)


def closest_keys(cfg: CN, key: str, n: int = 3) -> list:
    """Up to ``n`` real keys of ``cfg`` closest to a misspelled ``key`` (difflib's ratio on the
    full key, then on its last part within the same section)."""
    import difflib

    keys = config_keys(cfg)
    found = difflib.get_close_matches(key, keys, n=n, cutoff=0.75)
    if not found:
        section, _, last = key.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
        found = [siblings[m] for m in difflib.get_close_matches(last, list(siblings), n=n, cutoff=0.6)]
    return found


def _yaml_defining(config_file: str, key: str):
    """The yaml file of ``config_file``'s ``_BASE_`` chain that sets ``key``, or None."""
    import os

    import yaml

    try:
        with open(config_file) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None
    if _has_key(data, key):
        return config_file
    base = data.get("_BASE_") if isinstance(data, dict) else None
    if isinstance(base, str):
        if not base.startswith(("/", "~")) and "://" not in base:
            base = os.path.join(os.path.dirname(config_file), base)
        return _yaml_defining(os.path.expanduser(base), key)
    return None


def _has_key(data, key: str) -> bool:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _merge(cfg: CN, merge, config_file: str, source: str, path: str = "") -> None:
    """Run a yacs merge; its errors become one-line :class:`ConfigError` naming the key, where
    it came from (which yaml file, or the command line) and, for a key that does not exist,
    the closest real keys."""
    import re

    try:
        merge()
    except (KeyError, AssertionError, ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        message = str(e.args[0] if e.args else e).strip("'\"")
        unknown = re.search(r"Non-existent (?:config )?key: ([\w.]+)", message)
        if unknown:
            key = unknown.group(1)
            where = "on the command line"
            if source == "file":
                where = f"in {_yaml_defining(path, key) or path}"
            close = closest_keys(cfg, key)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; no similar key exists"
            raise ConfigError(f"unknown config key {key} {where}{hint}") from None
        where = "on the command line" if source == "command line" else f"in {path}"
        raise ConfigError(f"bad config value {where}: {' '.join(message.split())}") from None


def load_config_for_tool(config_file: str, opts=()) -> CN:
    """:func:`load_config` for command-line tools: every failure is one :class:`ConfigError`
    whose message names the file and what is wrong (a missing file, ``KEY VALUE`` overrides
    of odd length, an unknown key, a bad value), ready to print without a stack trace.

    Raises:
        ConfigError: as described.
    """
    import os

    if not os.path.isfile(config_file):
        raise ConfigError(f"config file not found: {config_file}")
    try:
        return load_config(config_file, list(opts))
    except ConfigError:
        raise
    except Exception as e:  # a dataset registration (InputError), an unreadable yaml
        raise ConfigError(f"cannot load config {config_file}: {' '.join(str(e).split())}") from None


def register_config_datasets(cfg: CN) -> None:
    """Register the ``DATASETS.REGISTER`` datasets ([[NAME, JSON, IMAGE_ROOT], ...]).

    Raises:
        ConfigError: an entry that is not three strings.
        InputError: a missing or malformed json, a missing image folder, a name taken.
    """
    from .data.datasets.user import register_dataset

    for entry in cfg.DATASETS.REGISTER:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(v, str) for v in entry)):
            raise ConfigError(f"DATASETS.REGISTER entries must be [NAME, JSON, IMAGE_ROOT], got {entry!r}")
        register_dataset(*entry)


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
