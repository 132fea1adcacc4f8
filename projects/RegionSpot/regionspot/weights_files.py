"""Weights files identified without building a model (shared by the model and the data path).

- :func:`require_file` / :class:`WeightsError`: a configured weights file exists, else one
  line naming the key, the official file and where it is published;
- :func:`sam_architecture`: SAM's image-encoder hyper-parameters read from a state dict's
  tensor shapes; :data:`TOKEN_SOURCES` and :func:`token_dim`: what a position-aware token is
  and how wide, for a SAM of that architecture;
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
from typing import Dict, Optional

import torch

from .io import write_json_atomic

__all__ = ["CLIP_WEIGHTS_NAMES", "SAM_WEIGHTS_URLS", "TOKEN_SOURCES", "WeightsError", "require_file",
           "sam_architecture", "token_dim", "weights_content_hash", "CONTENT_HASH_SIDECAR"]

logger = logging.getLogger(__name__)

# Position-aware token sources of SAM's mask decoder (paper Table 4b; see
# regionspot.modeling.position_tokens).
TOKEN_SOURCES = ("transformer", "prompt_encoder", "mlp")


# Where the official files are published; named in the error for a missing file.
SAM_WEIGHTS_URLS: Dict[str, str] = {
    "sam_vit_b_01ec64.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "sam_vit_l_0b3195.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "sam_vit_h_4b8939.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
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


def require_file(path: str, what: str) -> str:
    """Return ``path`` if it is a readable file, else raise a :class:`WeightsError`.

    Args:
        path: local path from the config (``~`` is expanded).
        what: ``"SAM"`` or ``"CLIP"``, used to name the official file and its URL.

    Raises:
        WeightsError: the file does not exist; the message names the expected file, the
            config key and where the official copy is published.
    """
    path = os.path.expanduser(path or "")
    if path and os.path.isfile(path):
        return path
    base = os.path.basename(path)
    if what == "SAM":
        key = "MODEL.REGIONSPOT.SAM_WEIGHTS"
        url = SAM_WEIGHTS_URLS.get(base, "https://github.com/facebookresearch/segment-anything"
                                         "#model-checkpoints")
        expected = base if base in SAM_WEIGHTS_URLS else "sam_vit_b_01ec64.pth (or vit_l / vit_h)"
    else:
        key = "MODEL.REGIONSPOT.CLIP_WEIGHTS"
        url = _clip_url(base)
        expected = base if base in CLIP_WEIGHTS_NAMES else ", ".join(CLIP_WEIGHTS_NAMES)
    raise WeightsError(
        f"{what} weights file not found: {path!r} (set by {key}). Expected the official "
        f"file {expected}; download it from {url} and point {key} at it."
    )


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


def token_dim(architecture: Dict[str, object], token_source: str) -> int:
    """T, the width of one position-aware token of a SAM of ``architecture``
    (:func:`sam_architecture`): the mask decoder's transformer width (``out_chans``), or an
    eighth of it after the hypernetwork MLP (``"mlp"``).

    Raises:
        ValueError: ``token_source`` is not one of :data:`TOKEN_SOURCES`.
    """
    if token_source not in TOKEN_SOURCES:
        raise ValueError(f"token_source must be one of {TOKEN_SOURCES}, got {token_source!r}")
    dim = int(architecture["out_chans"])  # the mask decoder's transformer_dim (modeling.weights.build_sam)
    return dim // 8 if token_source == "mlp" else dim


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
