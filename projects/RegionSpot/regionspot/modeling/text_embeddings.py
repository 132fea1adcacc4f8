"""CLIP text embeddings of class names (the classifier weights of RegionSpot).

RegionSpot (paper Sec. 3) classifies a region by comparing its region embedding
with frozen CLIP text embeddings of the class names.  The released
implementation builds each class embedding with a prompt ensemble: every class
name is put into every prompt template, all prompts are encoded with
``clip_model.encode_text``, the *unnormalized* text features are averaged over
the templates, and the mean is L2-normalized.

The released code recomputes these embeddings at start-up on every rank, one
class at a time.  Here the prompts are encoded in fixed-size batches (so memory
does not grow with the vocabulary) and the result can be cached on disk, keyed
by the CLIP weights, the exact class-name list and the templates.

Speed: CLIP's text transformer is causal and the embedding is read at the
end-of-text token, so the padding after it cannot change the result.  The fast
path (default) cuts every prompt after its end-of-text token and batches prompts
of equal length, running ~9-10 instead of 77 positions per LVIS prompt; the
plain path (``fast=False``) runs ``encode_text`` on full sequences and is kept as
the reference.  Measured on 2 CPU cores (``tools/benchmark.py text``, random
towers, first 100 LVIS classes): ViT-B/16 text tower 18 -> 206 prompts/s (x11),
ViT-L/14 10 -> 97 prompts/s (x9.5), max |difference| of the embeddings < 1e-6.
``tools/dump_text_embeddings.py`` fills the cache ahead of time.

Modules: the templates and their check in :mod:`.prompt_templates`; the tower run
(:func:`encode_class_names`, :func:`fast_path_problem`) in :mod:`.text_encoding`; this module
holds the disk cache (:func:`load_or_compute_text_embeddings`, :func:`cache_path`,
:func:`weights_fingerprint`) and re-exports the others' public names.
"""

import hashlib
import json
import logging
import os
from typing import Callable, List, Optional, Sequence

import torch

from ..data.vocabularies import check_vocabulary, clean_class_name
from ..io import atomic_write
from .prompt_templates import CLIP_IMAGENET_TEMPLATES, PROMPT_TEMPLATES, validate_templates
from .text_encoding import (  # noqa: F401  (_encode_with_stats, _tokenize_ragged: tests, the text benchmark)
    _encode_with_stats,
    _tokenize_ragged,
    encode_class_names,
    fast_path_problem,
)

__all__ = [
    "CLIP_IMAGENET_TEMPLATES",
    "PROMPT_TEMPLATES",
    "clean_class_name",
    "weights_fingerprint",
    "encode_class_names",
    "fast_path_problem",
    "load_or_compute_text_embeddings",
]

logger = logging.getLogger(__name__)


# Bump when the way embeddings are computed changes, so old cache files miss.  (The
# fast path gives the plain path's embeddings up to float32 rounding, ~1e-6: same version.)
_CACHE_FORMAT_VERSION = 1


def weights_fingerprint(path: str) -> str:
    """Cheap, stable identity of a CLIP weights file, for the text-embedding cache key.

    Hashes (sha256) the file's resolved real path, its size in bytes and its
    modification time in nanoseconds.  The content is *not* read: hashing a
    ~900 MB checkpoint on every start-up would cost seconds for no benefit.
    Consequences: moving, copying or touching the file changes the fingerprint
    (a harmless cache miss); rewriting it in place with different content of the
    same size while preserving the mtime would not be detected (pass a content
    hash as ``weights_id`` yourself if that can happen).

    Args:
        path: path of the weights file (symlinks are resolved).

    Returns:
        ``"file:" + 64 hex chars`` (a ``str``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        IsADirectoryError: if ``path`` is a directory.
    """
    real = os.path.realpath(os.fspath(path))
    st = os.stat(real)  # raises FileNotFoundError
    if os.path.isdir(real):
        raise IsADirectoryError(f"weights path is a directory, not a file: {real}")
    payload = f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8")
    return "file:" + hashlib.sha256(payload).hexdigest()


def _cache_key(weights_id: str, class_names: List[str], templates: List[str]) -> str:
    payload = json.dumps(
        {
            "format": _CACHE_FORMAT_VERSION,
            "weights_id": weights_id,
            "class_names": class_names,
            "templates": templates,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def cache_path(cache_dir: str, weights_id: str, class_names: List[str], templates: List[str]) -> str:
    """The cache file of one vocabulary's embeddings: ``<cache_dir>/text_<sha256 key>.pt``."""
    return os.path.join(cache_dir, f"text_{_cache_key(weights_id, class_names, templates)}.pt")


def _read_cache(path: str, weights_id: str, names: List[str], templates: List[str]) -> Optional[torch.Tensor]:
    """Return cached embeddings if ``path`` holds a valid entry for this request, else None."""
    if not os.path.exists(path):
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / unreadable: recompute, never fatal
        logger.warning("Text-embedding cache file %s is unreadable (%s: %s); recomputing.",
                       path, type(e).__name__, e)
        return None
    problem = None
    if not isinstance(entry, dict):
        problem = f"unexpected content of type {type(entry).__name__}"
    elif entry.get("class_names") != names:
        problem = "stored class names differ from the requested vocabulary"
    elif entry.get("templates") != templates:
        problem = "stored templates differ from the requested templates"
    elif entry.get("weights_id") != weights_id:
        problem = "stored weights_id differs from the requested weights_id"
    else:
        emb = entry.get("embeddings")
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(names):
            problem = "stored embeddings have the wrong type or shape"
        elif emb.dtype != torch.float32 or not bool(torch.isfinite(emb).all()):
            problem = "stored embeddings are not finite float32"
    if problem is not None:
        logger.warning("Text-embedding cache file %s is invalid (%s); recomputing.", path, problem)
        return None
    return entry["embeddings"].contiguous()


def _write_cache(path: str, entry: dict) -> None:
    """Write ``entry`` to ``path`` atomically (:func:`regionspot.io.atomic_write`); never raises."""
    try:
        atomic_write(path, lambda f: torch.save(entry, f))
    except Exception as e:
        logger.warning("Could not write text-embedding cache file %s (%s: %s); continuing without it.",
                       path, type(e).__name__, e)


def load_or_compute_text_embeddings(
    clip_model,
    class_names: Sequence[str],
    *,
    weights_id: str,
    cache_dir: Optional[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 256,
    fast: Optional[bool] = None,
    progress: Optional[bool] = None,
    tokenizer: Optional[Callable] = None,
) -> torch.Tensor:
    """Class-name text embeddings, read from / written to an on-disk cache.

    The cache file is ``<cache_dir>/text_<key>.pt`` where ``key`` is the sha256
    of (cache format version, ``weights_id``, the exact class-name list in order,
    the templates in order).  It holds a dict ``{"embeddings": Tensor(C, E)
    float32, "class_names": list[str], "templates": list[str], "weights_id":
    str}``.

    * Hit: the file is loaded (``torch.load(..., weights_only=True)``) and, if its
      stored names, templates and weights_id equal the request and the tensor is
      a finite float32 ``(C, E)`` tensor, returned without running CLIP.
    * Miss, mismatch, or unreadable/corrupt file (logged as a warning, never
      fatal): embeddings are computed with :func:`encode_class_names` and written
      atomically (temp file in ``cache_dir`` then ``os.replace``), so concurrent
      ranks never observe a partial file.  A failed write is logged and ignored.
    * ``cache_dir=None`` disables the cache (always computes, writes nothing).

    Hits and misses are logged at INFO level with the vocabulary size.

    Source: paper Sec. 3; released implementation: 80-template ensemble
    (+ "{}."), mean of unnormalized features, then L2 normalization (the
    released code recomputes them at start-up; the cache is our addition).

    Args:
        clip_model: see :func:`encode_class_names`.
        class_names: C class names (validated as in :func:`encode_class_names`).
        weights_id: non-empty identity of the CLIP weights (e.g.
            :func:`weights_fingerprint` of the checkpoint, or the model name plus
            a content hash).  Different weights must use different ids.
        cache_dir: cache directory (``~`` expanded; created if missing) or ``None``.
        templates: T prompt templates, each with exactly one ``"{}"``.
        batch_size: prompts run through the text tower at once on a miss.
        fast, progress, tokenizer: passed to :func:`encode_class_names` on a miss.  The fast and the
            plain path give the same embeddings up to float32 rounding, so the cache key does
            not include the path.

    Returns:
        ``torch.Tensor`` of shape ``(C, E)``, dtype ``torch.float32``, on CPU,
        rows with unit L2 norm.

    Raises:
        ValueError: empty vocabulary, blank / non-str class name (index named),
            duplicate class names (names listed), invalid templates, empty or
            non-str ``weights_id``, ``batch_size < 1``, ``fast=True`` on a model the fast
            path cannot run.
    """
    names = check_vocabulary(class_names, allow_duplicates=True)  # same text -> same embedding
    templates = validate_templates(templates)
    if not isinstance(weights_id, str) or not weights_id.strip():
        raise ValueError(
            f"weights_id must be a non-empty str identifying the CLIP weights, got {weights_id!r}"
        )

    if cache_dir is None:
        logger.info("Computing CLIP text embeddings for %d classes x %d templates (cache disabled).",
                    len(names), len(templates))
        return encode_class_names(clip_model, names, templates=templates, batch_size=batch_size,
                                  fast=fast, progress=progress, tokenizer=tokenizer)

    path = cache_path(os.path.expanduser(os.fspath(cache_dir)), weights_id, names, templates)
    cached = _read_cache(path, weights_id, names, templates)
    if cached is not None:
        logger.info("Text-embedding cache hit for %d classes: %s", len(names), path)
        return cached

    logger.info("Text-embedding cache miss for %d classes x %d templates; computing and writing %s",
                len(names), len(templates), path)
    emb = encode_class_names(clip_model, names, templates=templates, batch_size=batch_size,
                                  fast=fast, progress=progress, tokenizer=tokenizer)
    _write_cache(
        path,
        {"embeddings": emb, "class_names": names, "templates": templates, "weights_id": weights_id},
    )
    return emb
