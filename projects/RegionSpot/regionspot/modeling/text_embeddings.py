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
"""

import hashlib
import json
import logging
import os
from typing import List, Optional, Sequence

import torch

from ..data.vocabularies import check_vocabulary, clean_class_name
from ..io import atomic_write

__all__ = [
    "CLIP_IMAGENET_TEMPLATES",
    "PROMPT_TEMPLATES",
    "clean_class_name",
    "weights_fingerprint",
    "encode_class_names",
    "load_or_compute_text_embeddings",
]

logger = logging.getLogger(__name__)

# The 80 prompt templates of OpenAI CLIP's "Prompt_Engineering_for_ImageNet"
# notebook, in the notebook's order.
CLIP_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The prompt ensemble used for class embeddings: the bare "{}." followed by the
# 80 CLIP ImageNet templates (81 distinct templates).  The released RegionSpot
# code takes its list from ``get_prompt_templates()`` of the X-Decoder-style
# ``prompt_engineering.py``, which is this same set ("{}." plus the 80 CLIP
# templates).  The mean over templates is order-independent, but the order is
# part of the disk-cache key, so do not reorder casually.
PROMPT_TEMPLATES = ("{}.",) + CLIP_IMAGENET_TEMPLATES

# Bump when the way embeddings are computed changes, so old cache files miss.
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


def _validate_templates(templates: Sequence[str]) -> List[str]:
    if isinstance(templates, (str, bytes)):
        raise TypeError("templates must be a sequence of template strings, not a single string")
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty: at least one prompt template is required")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"template at index {i} must be a str with exactly one '{{}}': {t!r}")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"template at index {i} is not a valid format string: {t!r}") from e
    if len(set(templates)) != len(templates):
        raise ValueError("templates contain duplicates")
    return templates


def encode_class_names(
    clip_model,
    class_names: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Encode class names into L2-normalized CLIP text embeddings (prompt ensemble).

    For class ``c`` with cleaned name ``n_c = clean_class_name(name_c)``::

        f_c = mean_t clip_model.encode_text(tokenize(template_t.format(n_c)))   # unnormalized
        out[c] = f_c / ||f_c||_2

    The ``C * T`` prompts (class-major order) are tokenized with
    ``clip.tokenize(texts, context_length=clip_model.context_length,
    truncate=True)`` and encoded under ``torch.no_grad()`` in batches of
    ``batch_size`` prompts on the device of the model's parameters
    (``next(clip_model.parameters()).device``); the model runs in its own dtype
    (e.g. fp16 on GPU).  Features are summed per class into a float32 ``(C, E)``
    accumulator, so peak memory is ``O(C * E + batch_size * E)`` regardless of
    the number of templates; the result does not depend on ``batch_size`` beyond
    floating-point rounding.

    Source: paper Sec. 3 (class embeddings from the frozen CLIP text encoder);
    released implementation: 80-template ensemble (+ "{}."), mean of
    unnormalized features, then L2 normalization.

    Args:
        clip_model: an OpenAI CLIP model (``clip.model.CLIP``) or anything with
            ``encode_text(LongTensor[B, L]) -> Tensor[B, E]`` and parameters.
        class_names: C class names, each a non-blank ``str``; order defines the
            row (class) index.
        templates: T prompt templates, each containing exactly one ``"{}"``.
        batch_size: number of prompts per ``encode_text`` call (>= 1).

    Returns:
        ``torch.Tensor`` of shape ``(C, E)``, dtype ``torch.float32``, on CPU,
        each row with unit L2 norm.

    Raises:
        ValueError: empty vocabulary ("vocabulary is empty: ..."); a class name
            that is not a ``str`` or is empty/whitespace (message names its
            index); duplicated class names (message names them); invalid or
            empty templates; ``batch_size < 1``.
        TypeError: ``class_names`` is a single string.
    """
    names = check_vocabulary(class_names)
    templates = _validate_templates(templates)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    import clip  # OpenAI CLIP tokenizer (package "clip-anytorch" / "openai-clip")

    try:
        device = next(clip_model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    context_length = int(getattr(clip_model, "context_length", 77))

    cleaned = [clean_class_name(n) for n in names]
    num_classes, num_templates = len(cleaned), len(templates)
    total = num_classes * num_templates

    sums: Optional[torch.Tensor] = None
    with torch.no_grad():
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            flat = range(start, stop)
            texts = [templates[k % num_templates].format(cleaned[k // num_templates]) for k in flat]
            tokens = clip.tokenize(texts, context_length=context_length, truncate=True).to(device)
            feats = clip_model.encode_text(tokens)
            if feats.dim() != 2 or feats.shape[0] != len(texts):
                raise RuntimeError(
                    f"encode_text returned shape {tuple(feats.shape)} for {len(texts)} prompts; "
                    "expected (num_prompts, embed_dim)"
                )
            feats = feats.float()
            if sums is None:
                sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float32, device=feats.device)
            class_index = torch.tensor([k // num_templates for k in flat], device=feats.device)
            sums.index_add_(0, class_index, feats)

    assert sums is not None  # total >= 1
    mean = sums / num_templates
    norms = mean.norm(dim=-1, keepdim=True)
    degenerate = ~torch.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bool(degenerate.any()):
        bad = [names[i] for i in torch.nonzero(degenerate).flatten().tolist()]
        raise RuntimeError(f"text embeddings with zero or non-finite norm for classes: {bad[:10]}")
    return (mean / norms).cpu().contiguous()


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


def _cache_path(cache_dir: str, weights_id: str, class_names: List[str], templates: List[str]) -> str:
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
        batch_size: prompts per ``encode_text`` call on a miss.

    Returns:
        ``torch.Tensor`` of shape ``(C, E)``, dtype ``torch.float32``, on CPU,
        rows with unit L2 norm.

    Raises:
        ValueError: empty vocabulary, blank / non-str class name (index named),
            duplicate class names (names listed), invalid templates, empty or
            non-str ``weights_id``, ``batch_size < 1``.
    """
    names = check_vocabulary(class_names)
    templates = _validate_templates(templates)
    if not isinstance(weights_id, str) or not weights_id.strip():
        raise ValueError(
            f"weights_id must be a non-empty str identifying the CLIP weights, got {weights_id!r}"
        )

    if cache_dir is None:
        logger.info("Computing CLIP text embeddings for %d classes x %d templates (cache disabled).",
                    len(names), len(templates))
        return encode_class_names(clip_model, names, templates=templates, batch_size=batch_size)

    path = _cache_path(os.path.expanduser(os.fspath(cache_dir)), weights_id, names, templates)
    cached = _read_cache(path, weights_id, names, templates)
    if cached is not None:
        logger.info("Text-embedding cache hit for %d classes: %s", len(names), path)
        return cached

    logger.info("Text-embedding cache miss for %d classes x %d templates; computing and writing %s",
                len(names), len(templates), path)
    emb = encode_class_names(clip_model, names, templates=templates, batch_size=batch_size)
    _write_cache(
        path,
        {"embeddings": emb, "class_names": names, "templates": templates, "weights_id": weights_id},
    )
    return emb
