"""Weights files identified without building a model (shared by the model and the data path).

- :func:`require_file` / :class:`WeightsError`: a configured weights file exists, else one
  line naming the key, the official file and where it is published;
- :func:`sam_architecture` (and SAM-HQ's, SAM 2's): a localizer's hyper-parameters read from a
  state dict's tensor shapes, one reader per family in :data:`ARCHITECTURE_READERS`
  (:func:`register_architecture_reader`; :func:`localizer_architecture` dispatches on the
  family name);
- :data:`TOKEN_SOURCES`, :func:`check_token_source`, :func:`token_width` and :func:`token_dim`:
  what a position-aware token is and how wide (the token-source rule of every localizer,
  :class:`regionspot.modeling.localizer.Localizer`, and of the SAM-token cache's identity);
- :func:`weights_content_hash`: a hash of what a weights file holds (its tensors), which a
  copy, a rename or a lost mtime keeps, and one changed tensor changes. It is computed once
  per file and process, and remembered across processes in an optional sidecar file keyed by
  (real path, size, mtime).

:mod:`regionspot.modeling.weights` (loading the models) and :mod:`regionspot.data.token_cache`
(the SAM-token cache's identity) both use it; it imports neither ``regionspot.modeling`` nor
``regionspot.data``.
"""

import hashlib
import json
import logging
import os
import threading
from typing import Callable, Dict, Optional

import torch

from .io import write_json_atomic

__all__ = ["CLIP_WEIGHTS_NAMES", "SAM_WEIGHTS_URLS", "TOKEN_SOURCES", "WeightsError", "require_file",
           "ARCHITECTURE_READERS", "register_architecture_reader", "sam_architecture", "sam2_architecture",
           "sam_hq_architecture", "localizer_architecture", "localizer_state_dict", "check_token_source",
           "token_width", "token_dim", "weights_content_hash", "CONTENT_HASH_SIDECAR"]

logger = logging.getLogger(__name__)

# Position-aware token sources of a localizer's mask decoder (paper Table 4b; which tensor each
# one is: regionspot.modeling.localizer.Localizer.select_token).
TOKEN_SOURCES = ("transformer", "prompt_encoder", "mlp")

# Localizer family (MODEL.REGIONSPOT.LOCALIZER) -> fn(state_dict) -> architecture dict (with
# "out_chans", the mask decoder's width): how the family's weights files are read without
# building the model (the SAM-token cache's identity). Filled by register_architecture_reader.
ARCHITECTURE_READERS: Dict[str, Callable[[Dict[str, torch.Tensor]], Dict[str, object]]] = {}


def register_architecture_reader(family: str):
    """Decorator: register ``fn(state_dict) -> architecture dict`` as the reader of the weights
    files of the localizer family ``family`` (:func:`localizer_architecture`).

    The dict must hold ``"out_chans"``, the mask decoder's transformer width (:func:`token_dim`).
    SAM's, SAM-HQ's and SAM 2's readers register here; another family registers its own with
    ``regionspot.modeling.backbones.register_localizer(name, architecture=fn)``.
    """
    def decorator(fn):
        ARCHITECTURE_READERS[family] = fn
        return fn

    return decorator


# Where the official files are published; named in the error for a missing file.
SAM_WEIGHTS_URLS: Dict[str, str] = {
    "sam_vit_b_01ec64.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "sam_vit_l_0b3195.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "sam_vit_h_4b8939.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    # SAM-HQ (LOCALIZER sam_hq): the authors' files on the Hugging Face hub (lkeab/hq-sam)
    "sam_hq_vit_b.pth": "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_b.pth",
    "sam_hq_vit_l.pth": "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_l.pth",
    "sam_hq_vit_h.pth": "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_h.pth",
    # SAM 2.1 (LOCALIZER sam2)
    "sam2.1_hiera_tiny.pt": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_small.pt": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt",
    "sam2.1_hiera_base_plus.pt":
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_large.pt": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt",
}
CLIP_WEIGHTS_NAMES: Dict[str, str] = {
    "ViT-B-16.pt": "ViT-B/16",
    "ViT-L-14.pt": "ViT-L/14",
    "ViT-L-14-336px.pt": "ViT-L/14@336px",
}


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable or does not hold the expected model."""


def _clip_url(file_name: str) -> str:
    import clip.clip as clip_module  # the package's own table of official download URLs

    name = CLIP_WEIGHTS_NAMES.get(file_name)
    return clip_module._MODELS.get(name, "https://github.com/openai/CLIP") if name else (
        "https://github.com/openai/CLIP (clip.available_models())"
    )


# The localizer families' official files (named when SAM_WEIGHTS is missing): example, where published.
_LOCALIZER_FILES = {
    "SAM": ("sam_vit_b_01ec64.pth (or vit_l / vit_h)",
            "https://github.com/facebookresearch/segment-anything#model-checkpoints"),
    "SAM-HQ": ("sam_hq_vit_b.pth (or vit_l / vit_h)", "https://huggingface.co/lkeab/hq-sam"),
    "SAM 2": ("sam2.1_hiera_small.pt (or tiny / base_plus / large)",
              "https://github.com/facebookresearch/sam2#model-description"),
}


def require_file(path: str, what: str) -> str:
    """Return ``path`` if it is a readable file, else raise a :class:`WeightsError`.

    Args:
        path: local path from the config (``~`` is expanded).
        what: ``"SAM"``, ``"SAM-HQ"``, ``"SAM 2"`` (the localizer families' files, all set by
            ``SAM_WEIGHTS``) or ``"CLIP"``, used to name the official file and its URL.

    Raises:
        WeightsError: the file does not exist; the message names the expected file, the
            config key and where the official copy is published.
    """
    path = os.path.expanduser(path or "")
    if path and os.path.isfile(path):
        return path
    base = os.path.basename(path)
    if what in _LOCALIZER_FILES:
        key = "MODEL.REGIONSPOT.SAM_WEIGHTS"
        default_name, default_url = _LOCALIZER_FILES[what]
        url = SAM_WEIGHTS_URLS.get(base, default_url)
        expected = base if base in SAM_WEIGHTS_URLS else default_name
    else:
        key = "MODEL.REGIONSPOT.CLIP_WEIGHTS"
        url = _clip_url(base)
        expected = base if base in CLIP_WEIGHTS_NAMES else ", ".join(CLIP_WEIGHTS_NAMES)
    raise WeightsError(
        f"{what} weights file not found: {path!r} (set by {key}). Expected the official "
        f"file {expected}; download it from {url} and point {key} at it."
    )


@register_architecture_reader("sam")
def sam_architecture(state_dict: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Read the SAM image-encoder hyper-parameters from a SAM state dict.

    The official builders (``segment_anything.build_sam``) hard-code them per variant; here
    they come from tensor shapes, so vit_b/l/h and small random models share one path:
    embed_dim from the patch embedding, depth from the block count, head_dim from the
    relative position tables, global-attention blocks from the tables whose length is
    ``2 * grid - 1`` (window-attention blocks have ``2 * window - 1``).

    Returns:
        dict with embed_dim, depth, num_heads, global_attn_indexes, window_size, img_size,
        patch_size, out_chans.

    Raises:
        WeightsError: the dict is not a SAM state dict.
    """
    try:
        patch = state_dict["image_encoder.patch_embed.proj.weight"]  # (C, 3, p, p)
        pos = state_dict["image_encoder.pos_embed"]  # (1, grid, grid, C)
        out_chans = state_dict["image_encoder.neck.0.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"not a SAM state dict: key {e} is missing") from e
    embed_dim, patch_size, grid = patch.shape[0], patch.shape[-1], pos.shape[1]
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    global_idx, window = [], None
    head_dim = None
    for i in range(depth):
        table = state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"]  # (2 * size - 1, head_dim)
        head_dim = table.shape[1]
        size = (table.shape[0] + 1) // 2
        if size == grid:
            global_idx.append(i)
        else:
            window = size
    return dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attn_indexes=global_idx,
        window_size=window if window is not None else 14,
        img_size=grid * patch_size,
        patch_size=patch_size,
        out_chans=out_chans,
    )


@register_architecture_reader("sam_hq")
def sam_hq_architecture(state_dict: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """SAM-HQ's hyper-parameters from its state dict (``sam_hq_vit_{b,l,h}.pth``): SAM's
    (:func:`sam_architecture`) plus ``vit_dim``, the width of the early ViT features its HQ decoder
    reads (``mask_decoder.compress_vit_feat.0``, a 2x2 transposed convolution from ``vit_dim``).

    Raises:
        WeightsError: not a SAM-HQ state dict (a plain SAM file has no HQ decoder).
    """
    arch = sam_architecture(state_dict)
    key = "mask_decoder.compress_vit_feat.0.weight"
    if key not in state_dict or "mask_decoder.hf_token.weight" not in state_dict:
        raise WeightsError("not a SAM-HQ state dict: its HQ decoder (mask_decoder.hf_token, "
                           "mask_decoder.compress_vit_feat) is missing; a plain SAM file is LOCALIZER sam")
    arch["vit_dim"] = int(state_dict[key].shape[0])
    return arch


# SAM 2 / 2.1 image encoders (Hiera trunk width, blocks per stage) -> the package's config; the
# heads, window sizes and global-attention blocks are not in the tensors, only in these configs.
SAM2_CONFIGS = {
    ("2.1", 96, (1, 2, 7, 2)): "configs/sam2.1/sam2.1_hiera_t.yaml",
    ("2.1", 96, (1, 2, 11, 2)): "configs/sam2.1/sam2.1_hiera_s.yaml",
    ("2.1", 112, (2, 3, 16, 3)): "configs/sam2.1/sam2.1_hiera_b+.yaml",
    ("2.1", 144, (2, 6, 36, 4)): "configs/sam2.1/sam2.1_hiera_l.yaml",
    ("2.0", 96, (1, 2, 7, 2)): "configs/sam2/sam2_hiera_t.yaml",
    ("2.0", 96, (1, 2, 11, 2)): "configs/sam2/sam2_hiera_s.yaml",
    ("2.0", 112, (2, 3, 16, 3)): "configs/sam2/sam2_hiera_b+.yaml",
    ("2.0", 144, (2, 6, 36, 4)): "configs/sam2/sam2_hiera_l.yaml",
}


def localizer_state_dict(obj) -> Dict[str, torch.Tensor]:
    """The state dict inside a loaded localizer file: SAM 2's official files hold it under
    ``"model"``; SAM's and SAM-HQ's are the state dict itself."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    return obj


@register_architecture_reader("sam2")
def sam2_architecture(state_dict: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """SAM 2's image-encoder hyper-parameters read from a state dict's tensors.

    Hiera's width from the patch embedding, its blocks per stage from the blocks that change
    width (``trunk.blocks.<i>.proj``: the first block of stages 2-4), the version from
    ``no_obj_embed_spatial`` (added in 2.1), the mask decoder's transformer width
    (``out_chans``, 256 in every official model); ``config`` is the ``sam2`` package's config of
    that encoder (:data:`SAM2_CONFIGS`), or None for another shape (then
    ``MODEL.REGIONSPOT.SAM2_CONFIG`` must name one).

    Raises:
        WeightsError: not a SAM 2 state dict.
    """
    try:
        embed_dim = int(state_dict["image_encoder.trunk.patch_embed.proj.weight"].shape[0])
        out_chans = int(state_dict["sam_mask_decoder.transformer.layers.0.self_attn.q_proj.weight"].shape[0])
    except KeyError as e:
        raise WeightsError(f"not a SAM 2 state dict: key {e} is missing") from e
    blocks = {int(k.split(".")[3]) for k in state_dict if k.startswith("image_encoder.trunk.blocks.")}
    starts = sorted(i for i in blocks if f"image_encoder.trunk.blocks.{i}.proj.weight" in state_dict)
    bounds = [0] + starts + [len(blocks)]
    stages = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    version = "2.1" if "no_obj_embed_spatial" in state_dict else "2.0"
    return dict(version=version, embed_dim=embed_dim, stages=list(stages), out_chans=out_chans,
                config=SAM2_CONFIGS.get((version, embed_dim, stages)))


def localizer_architecture(family: str, state_dict: Dict[str, torch.Tensor], path: str = "") -> Dict[str, object]:
    """The architecture of a localizer family (``MODEL.REGIONSPOT.LOCALIZER``) read from its
    weights (the state dict, or the whole loaded file of SAM 2's format) by the family's
    registered reader (:data:`ARCHITECTURE_READERS`).

    Raises:
        WeightsError: a family with no registered reader, or a file that is not of that family
            (the message names the file).
    """
    if family not in ARCHITECTURE_READERS:
        raise WeightsError(f"unknown localizer family {family!r} (known: {', '.join(sorted(ARCHITECTURE_READERS))})")
    try:
        return ARCHITECTURE_READERS[family](localizer_state_dict(state_dict))
    except WeightsError as e:
        raise WeightsError(f"{path or 'the weights file'} (MODEL.REGIONSPOT.SAM_WEIGHTS, LOCALIZER {family}): "
                           f"{e}") from e


def check_token_source(token_source: str) -> str:
    """Return ``token_source`` if it is one of :data:`TOKEN_SOURCES`.

    Raises:
        ValueError: another value, in one line (the same for every localizer family).
    """
    if token_source not in TOKEN_SOURCES:
        raise ValueError(f"token_source must be one of {TOKEN_SOURCES}, got {token_source!r}")
    return token_source


def token_width(decoder_width: int, token_source: str) -> int:
    """T, the width of one position-aware token of a mask decoder whose two-way transformer is
    ``decoder_width`` wide (256 for SAM, SAM-HQ and SAM 2): that width for the ``"transformer"``
    and ``"prompt_encoder"`` sources, an eighth of it after the hypernetwork MLP (``"mlp"``,
    SAM's ``transformer_dim // 8``).

    Raises:
        ValueError: ``token_source`` is not one of :data:`TOKEN_SOURCES`.
    """
    check_token_source(token_source)
    return int(decoder_width) // 8 if token_source == "mlp" else int(decoder_width)


def token_dim(architecture: Dict[str, object], token_source: str) -> int:
    """T, the width of one position-aware token of a localizer of ``architecture`` (a registered
    reader's dict, :func:`localizer_architecture`): :func:`token_width` of its mask decoder's
    transformer width ``out_chans``.

    Raises:
        ValueError: ``token_source`` is not one of :data:`TOKEN_SOURCES`.
    """
    return token_width(int(architecture["out_chans"]), token_source)


# --------------------------------------------------------------------------- content hash

#: File name of the sidecar that remembers content hashes across processes.
CONTENT_HASH_SIDECAR = "weights-content-hashes.json"
_CONTENT_HASH_VERSION = "tensors-sha256-v1"
_memo: Dict[tuple, str] = {}
_memo_lock = threading.Lock()


def _stat_key(path: str) -> tuple:
    real = os.path.realpath(os.fspath(path))
    st = os.stat(real)  # FileNotFoundError
    if os.path.isdir(real):
        raise IsADirectoryError(f"weights path is a directory, not a file: {real}")
    return real, int(st.st_size), int(st.st_mtime_ns)


def _hash_tensors(path: str) -> str:
    """sha256 over the state dict's (name, dtype, shape, bytes) in sorted name order; for a
    file that is not a state dict of tensors, over the file's bytes."""
    try:  # mmap: the tensors are paged in while hashed, not copied
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            state = None
    h = hashlib.sha256()
    if isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()):
        h.update(b"state_dict\0")
        for name in sorted(state):
            t = state[name].detach()
            h.update(f"{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode("utf-8"))
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return f"{_CONTENT_HASH_VERSION}:{h.hexdigest()}"
    h.update(b"bytes\0")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return f"{_CONTENT_HASH_VERSION}:{h.hexdigest()}"


def _read_sidecar(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {"files": {}}
    except (OSError, ValueError):
        return {"files": {}}


def weights_content_hash(path: str, sidecar_dir: Optional[str] = None) -> str:
    """A hash of the content of a weights file: its tensors (name, dtype, shape and bytes), or
    its bytes when it is not a state dict of tensors.

    Copying the file to another node (with or without its mtime), renaming or moving it keeps
    the hash; changing one tensor changes it. Hashing reads the whole file (seconds for SAM
    ViT-H's 2.5 GB), so it is done once per (real path, size, mtime) and process, and, with
    ``sidecar_dir``, remembered in ``<sidecar_dir>/weights-content-hashes.json`` (written
    atomically), so that later processes on that node only ``stat`` the file.

    Args:
        path: the weights file (``~`` expanded, symlinks resolved).
        sidecar_dir: optional folder for the sidecar (e.g. the SAM-token cache's root); an
            unwritable folder only costs the re-hash in the next process.

    Returns:
        ``"tensors-sha256-v1:" + 64 hex chars``.

    Raises:
        FileNotFoundError: ``path`` does not exist. IsADirectoryError: it is a folder.
    """
    key = _stat_key(os.path.expanduser(os.fspath(path)))
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    sidecar = os.path.join(os.path.expanduser(os.fspath(sidecar_dir)), CONTENT_HASH_SIDECAR) if sidecar_dir else None
    entry_key = f"{key[0]}\0{key[1]}\0{key[2]}"
    if sidecar:
        known = _read_sidecar(sidecar)["files"].get(entry_key)
        if isinstance(known, str) and known.startswith(_CONTENT_HASH_VERSION + ":"):
            with _memo_lock:
                _memo[key] = known
            return known
    digest = _hash_tensors(key[0])
    with _memo_lock:
        _memo[key] = digest
    if sidecar:
        try:
            os.makedirs(os.path.dirname(sidecar), exist_ok=True)
            data = _read_sidecar(sidecar)
            data["files"][entry_key] = digest
            write_json_atomic(sidecar, data)
        except OSError as e:
            logger.warning("could not record the weights' content hash in %s (%s); it is recomputed next time",
                           sidecar, e)
    return digest
