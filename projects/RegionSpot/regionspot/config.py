"""``load_config``: a config file merged onto the defaults, checked (:func:`check_config`), its
datasets registered and its device resolved.

The keys themselves, :class:`ConfigError` and the device policy live in
:mod:`regionspot.config_defaults` (which every layer may import) and are re-exported here. This
module sits above ``data/``, ``evaluation/`` and ``modeling/``: :func:`check_config` reads their
allowed values, and none of them imports this module (tests/test_layering.py).
"""

from detectron2.config import CfgNode as CN

from .config_defaults import (  # noqa: F401  (re-exported: the config's public names)
    ConfigError,
    add_regionspot_config,
    resolve_config_device,
    resolve_device,
)
from .model_zoo import resolve_config_file


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
        FileNotFoundError: ``config_file`` is neither a file nor a bundled config's name
            (:func:`regionspot.model_zoo.resolve_config_file`).
    """
    from detectron2.config import get_cfg

    config_file = resolve_config_file(config_file)
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
    try:
        config_file = resolve_config_file(config_file)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
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
