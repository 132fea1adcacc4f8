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
"""

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ..data.vocabularies import check_vocabulary, clean_class_name
from ..io import atomic_write

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


# ----------------------------------------------------------------------------- encoding

# Prompts tokenized per ``clip.tokenize`` call when preparing the fast path.
_TOKENIZE_CHUNK = 8192


def _prompt_texts(cleaned: List[str], templates: List[str], start: int, stop: int) -> List[str]:
    """Prompts ``start .. stop-1`` of the class-major list (prompt k = class k // T, template k % T)."""
    num_templates = len(templates)
    return [templates[k % num_templates].format(cleaned[k // num_templates]) for k in range(start, stop)]


def _model_device(clip_model) -> torch.device:
    try:
        return next(clip_model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _model_dtype(clip_model) -> torch.dtype:
    """The dtype the text tower computes in: ``clip_model.dtype`` (what ``CLIP.encode_text`` casts
    to), else the dtype of the first floating-point parameter, else float32."""
    dtype = getattr(clip_model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        for p in clip_model.parameters():
            if p.is_floating_point():
                return p.dtype
    except (AttributeError, TypeError):
        pass
    return torch.float32


def _no_autocast(device: torch.device):
    """A context that disables autocast on ``device`` (the tower runs in its parameters' dtype)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return contextlib.nullcontext()


def _text_blocks(clip_model) -> list:
    transformer = getattr(clip_model, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    try:
        return list(blocks) if blocks is not None else []
    except TypeError:
        return []


def fast_path_problem(clip_model) -> Optional[str]:
    """Why the truncated (fast) text-tower path cannot run on ``clip_model``, or ``None`` if it can.

    The fast path needs an OpenAI-CLIP text tower: ``token_embedding``, ``positional_embedding``
    with ``context_length`` rows, ``transformer.resblocks`` (blocks whose ``attn`` is an
    ``nn.MultiheadAttention`` and whose ``attn_mask`` is a ``(context_length, context_length)``
    tensor that is ``-inf`` strictly above the diagonal, i.e. causal), ``ln_final`` and
    ``text_projection``.  Exactness of the truncation rests on that causality (see
    :func:`encode_class_names`), so a tower without such a mask is reported, not run.

    Returns:
        ``None``, or a one-line reason (``str``).
    """
    for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
        if getattr(clip_model, attr, None) is None:
            return f"the model has no {attr!r} (not an OpenAI CLIP text tower)"
    context_length = int(getattr(clip_model, "context_length", 77))
    pos = clip_model.positional_embedding
    if not torch.is_tensor(pos) or pos.dim() != 2 or pos.shape[0] != context_length:
        return f"positional_embedding is not a ({context_length}, width) tensor"
    if not torch.is_tensor(clip_model.text_projection) or clip_model.text_projection.dim() != 2:
        return "text_projection is not a 2-D tensor"
    blocks = _text_blocks(clip_model)
    if not blocks:
        return "transformer.resblocks is missing or empty"
    upper = torch.ones(context_length, context_length, dtype=torch.bool).triu_(1)
    for i, block in enumerate(blocks):
        if not isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention):
            return f"text block {i} has no nn.MultiheadAttention 'attn'"
        mask = getattr(block, "attn_mask", None)
        if not torch.is_tensor(mask) or tuple(mask.shape) != (context_length, context_length):
            return f"text block {i} has no ({context_length}, {context_length}) attn_mask"
        if not bool(torch.isneginf(mask.detach().cpu()[upper]).all()):
            return f"the attn_mask of text block {i} is not causal (-inf above the diagonal)"
    return None


def _tokenize_ragged(cleaned: List[str], templates: List[str], context_length: int):
    """Tokenize all ``C * T`` prompts (class-major) and keep each up to its end-of-text token.

    Returns ``(flat, lengths, offsets)``: ``flat`` int32 holding the prompts' tokens back to
    back, ``lengths`` int64 ``(N,)`` = position of the end-of-text token + 1 (the position
    ``CLIP.encode_text`` reads: ``argmax`` of the token ids, the end-of-text id being the
    largest), ``offsets`` int64 ``(N,)`` start of each prompt in ``flat``.  Memory is
    ``O(total prompt tokens)``, not ``O(N * context_length)``.
    """
    import clip

    total = len(cleaned) * len(templates)
    pieces, lengths = [], []
    for start in range(0, total, _TOKENIZE_CHUNK):
        stop = min(start + _TOKENIZE_CHUNK, total)
        tokens = clip.tokenize(_prompt_texts(cleaned, templates, start, stop),
                               context_length=context_length, truncate=True).long()
        n = tokens.argmax(dim=-1) + 1
        keep = torch.arange(tokens.shape[1]).unsqueeze(0) < n.unsqueeze(1)
        pieces.append(tokens[keep].to(torch.int32))  # row-major: prompt after prompt
        lengths.append(n)
    lengths_t = torch.cat(lengths)
    return torch.cat(pieces), lengths_t, torch.cumsum(lengths_t, 0) - lengths_t


def _ragged_class_keys(flat: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor,
                       num_templates: int) -> List[bytes]:
    """Per class, the bytes of its ``T`` prompts' tokens as :func:`_tokenize_ragged` laid them out
    (class-major, back to back): two classes have the same key exactly when CLIP reads the same
    prompts for both."""
    num_classes = len(lengths) // num_templates
    ends = (offsets + lengths).view(num_classes, num_templates)
    starts = offsets.view(num_classes, num_templates)
    return [flat[int(starts[c, 0]):int(ends[c, -1])].numpy().tobytes() + lengths[c * num_templates:(c + 1)
            * num_templates].numpy().tobytes() for c in range(num_classes)]


def _class_keys(cleaned: List[str], templates: List[str], tokenizer: Callable) -> List[bytes]:
    """Per class, the bytes of ``tokenizer`` applied to its ``T`` prompts (the plain path's
    tokens), in chunks of about ``_TOKENIZE_CHUNK`` prompts."""
    per_chunk = max(1, _TOKENIZE_CHUNK // len(templates))
    keys: List[bytes] = []
    for first in range(0, len(cleaned), per_chunk):
        chunk = cleaned[first:first + per_chunk]
        tokens = torch.as_tensor(tokenizer(_prompt_texts(chunk, templates, 0, len(chunk) * len(templates))))
        keys += [rows.numpy().tobytes() for rows in tokens.view(len(chunk), -1)]
    return keys


def _distinct_keys(keys: List[bytes]) -> Tuple[List[int], torch.Tensor]:
    """``(distinct, inverse)``: the index of the first class of each distinct key, in order, and
    int64 ``(C,)`` the position in ``distinct`` of each class's key."""
    position: Dict[bytes, int] = {}
    distinct: List[int] = []
    inverse = []
    for c, key in enumerate(keys):
        if key not in position:
            position[key] = len(distinct)
            distinct.append(c)
        inverse.append(position[key])
    return distinct, torch.tensor(inverse, dtype=torch.long)


def _length_batches(lengths: torch.Tensor, batch_size: int):
    """Yield ``(indices, length)``: the prompts sorted by length (stable), in batches of at most
    ``batch_size`` prompts that all have the same length, so no padding is run."""
    order = torch.argsort(lengths, stable=True)
    ordered = lengths[order]
    bounds = [0] + (torch.nonzero(ordered[1:] != ordered[:-1]).flatten() + 1).tolist() + [len(order)]
    for run_start, run_stop in zip(bounds[:-1], bounds[1:]):
        length = int(ordered[run_start])
        for start in range(run_start, run_stop, batch_size):
            yield order[start:min(start + batch_size, run_stop)], length


def _truncated_tower(clip_model, blocks: list, full_masks: list, tokens: torch.Tensor,
                     eot: torch.Tensor, dtype: torch.dtype, sliced: dict) -> torch.Tensor:
    """Features ``(B, E)`` of ``tokens`` ``(B, L)`` read at positions ``eot`` ``(B,)``, through the
    model's own modules with each block's ``attn_mask`` set to the top-left ``L x L`` slice of
    its causal mask (kept in ``sliced`` per length; the caller restores the masks)."""
    length = tokens.shape[1]
    if length not in sliced:
        sliced[length] = [full[:length, :length].to(dtype=dtype, device=tokens.device) for full in full_masks]
    for block, mask in zip(blocks, sliced[length]):
        block.attn_mask = mask
    x = clip_model.token_embedding(tokens).to(dtype)
    x = x + clip_model.positional_embedding[:length].to(dtype)
    seq_first = not getattr(blocks[0].attn, "batch_first", False)
    if seq_first:
        x = x.permute(1, 0, 2)  # (B, L, W) -> (L, B, W), the layout of CLIP's blocks
    x = clip_model.transformer(x)
    if seq_first:
        x = x.permute(1, 0, 2)
    x = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W): the end-of-text tokens
    x = clip_model.ln_final(x).to(dtype)  # per-token LayerNorm: same on the gathered rows
    return x @ clip_model.text_projection


def _progress_bar(total: int, progress: Optional[bool]):
    common = dict(total=total, unit="prompt", desc="CLIP text embeddings", dynamic_ncols=True, smoothing=0.1)
    if progress is None:  # only on a terminal, and only for encodings that take a while
        return tqdm(disable=None, delay=1.0, **common)
    return tqdm(disable=not progress, **common)


def _encode_with_stats(
    clip_model,
    class_names: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 256,
    fast: Optional[bool] = None,
    progress: Optional[bool] = None,
    tokenizer: Optional[Callable] = None,
) -> Tuple[torch.Tensor, Dict[str, object]]:
    """:func:`encode_class_names` plus figures about the run (for the benchmark tool).

    Returns ``(embeddings, stats)``; ``stats`` holds ``path`` ("fast" or "plain"), ``reason``
    (why plain, or None), ``prompts``, ``classes``, ``templates``, ``seconds`` (tokenization
    included), ``prompts_per_s``, ``device``, ``dtype``, ``batches``, ``context_length``,
    ``mean_prompt_tokens`` (tokens up to the end-of-text token; fast path only, else None) and
    ``mean_tokens_run`` (sequence positions run per prompt: the same as ``mean_prompt_tokens``
    on the fast path, which runs no padding; ``context_length`` on the plain path).
    """
    names = check_vocabulary(class_names, allow_duplicates=True)  # same text -> same embedding
    templates = _validate_templates(templates)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if fast is not None and not isinstance(fast, bool):
        raise TypeError(f"fast must be None, True or False, got {fast!r}")

    device, dtype = _model_device(clip_model), _model_dtype(clip_model)
    context_length = int(getattr(clip_model, "context_length", 77))
    if tokenizer is None:
        import clip  # OpenAI CLIP tokenizer (package "clip-anytorch" / "openai-clip")

        def tokenizer(texts):
            return clip.tokenize(texts, context_length=context_length, truncate=True)

        reason = fast_path_problem(clip_model) if fast is not False else "fast=False"
    else:  # another model's own tokenizer (OpenCLIP): its encode_text, the plain path
        reason = "the model's own tokenizer (not OpenAI CLIP's)"
    if fast is True and reason is not None:
        raise ValueError(f"fast=True but the truncated text-tower path cannot run: {reason}")
    use_fast = reason is None

    cleaned = [clean_class_name(n) for n in names]
    num_classes, num_templates = len(cleaned), len(templates)
    if use_fast:
        flat, lengths, offsets = _tokenize_ragged(cleaned, templates, context_length)
        keys = _ragged_class_keys(flat, lengths, offsets, num_templates)
    else:
        keys = _class_keys(cleaned, templates, tokenizer)
    # Names that CLIP reads as the same text ("Timer"/"timer": the tokenizer lower-cases) are
    # encoded once and the others get a copy of that row: equal by construction, on any device.
    distinct, inverse = _distinct_keys(keys)
    num_distinct = len(distinct)
    total = num_distinct * num_templates
    logger.info("Encoding %d classes x %d templates = %d prompts with CLIP's text tower on %s (%s, %s)%s",
                num_distinct, num_templates, total, device, str(dtype).replace("torch.", ""),
                "fast path: sequences cut at the end-of-text token" if use_fast
                else f"plain encode_text path: {reason}",
                "" if num_distinct == num_classes else
                f"; {num_classes - num_distinct} of the {num_classes} names read the same to CLIP as an earlier "
                "one and get a copy of its embedding")
    t0 = time.perf_counter()
    sums: Optional[torch.Tensor] = None
    tokens_run = 0
    batches = 0
    mean_prompt_tokens = None
    with torch.no_grad(), _no_autocast(device), _progress_bar(total, progress) as bar:
        if use_fast:
            # the distinct classes' prompts, distinct-class-major (prompt k: class k // T)
            chosen = (torch.tensor(distinct).unsqueeze(1) * num_templates + torch.arange(num_templates)).flatten()
            lengths, offsets = lengths[chosen], offsets[chosen]
            mean_prompt_tokens = float(lengths.double().mean())
            blocks = _text_blocks(clip_model)
            full_masks = [block.attn_mask for block in blocks]
            sliced: Dict[int, list] = {}
            try:
                for idx, length in _length_batches(lengths, batch_size):
                    cols = torch.arange(length)
                    tokens = flat[offsets[idx].unsqueeze(1) + cols]  # (B, length), no padding
                    eot = torch.full((len(idx),), length - 1, dtype=torch.long, device=device)
                    feats = _truncated_tower(clip_model, blocks, full_masks, tokens.long().to(device), eot, dtype,
                                             sliced)
                    if sums is None:
                        sums = torch.zeros(num_distinct, feats.shape[1], dtype=torch.float32, device=feats.device)
                    sums.index_add_(0, (idx // num_templates).to(feats.device), feats.float())
                    tokens_run += length * len(idx)
                    batches += 1
                    bar.update(len(idx))
            finally:
                for block, mask in zip(blocks, full_masks):
                    block.attn_mask = mask
        else:
            distinct_cleaned = [cleaned[i] for i in distinct]
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                texts = _prompt_texts(distinct_cleaned, templates, start, stop)
                tokens = tokenizer(texts).to(device)
                feats = clip_model.encode_text(tokens)
                if feats.dim() != 2 or feats.shape[0] != len(texts):
                    raise RuntimeError(
                        f"encode_text returned shape {tuple(feats.shape)} for {len(texts)} prompts; "
                        "expected (num_prompts, embed_dim)"
                    )
                feats = feats.float()
                if sums is None:
                    sums = torch.zeros(num_distinct, feats.shape[1], dtype=torch.float32, device=feats.device)
                class_index = torch.arange(start, stop, device=feats.device) // num_templates
                sums.index_add_(0, class_index, feats)
                tokens_run += tokens.shape[1] * len(texts)
                batches += 1
                bar.update(len(texts))

    assert sums is not None  # total >= 1
    mean = sums / num_templates
    norms = mean.norm(dim=-1, keepdim=True)
    degenerate = ~torch.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bool(degenerate.any()):
        bad = [names[distinct[i]] for i in torch.nonzero(degenerate).flatten().tolist()]
        raise RuntimeError(f"text embeddings with zero or non-finite norm for classes: {bad[:10]}")
    out = (mean / norms).cpu()[inverse].contiguous()  # row c = its distinct text's row, copied
    seconds = time.perf_counter() - t0
    rate = total / seconds if seconds > 0 else float("inf")
    logger.info("Encoded %d prompts (%d classes) in %.2f s: %.1f prompts/s", total, num_classes, seconds, rate)
    stats = {
        "path": "fast" if use_fast else "plain",
        "reason": reason if not use_fast else None,
        "classes": num_classes,
        "distinct_classes": num_distinct,
        "templates": num_templates,
        "prompts": total,
        "seconds": seconds,
        "prompts_per_s": rate,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "batches": batches,
        "context_length": context_length,
        "mean_prompt_tokens": mean_prompt_tokens,
        "mean_tokens_run": tokens_run / total,
    }
    return out, stats


def encode_class_names(
    clip_model,
    class_names: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 256,
    *,
    fast: Optional[bool] = None,
    progress: Optional[bool] = None,
    tokenizer: Optional[Callable] = None,
) -> torch.Tensor:
    """Encode class names into L2-normalized CLIP text embeddings (prompt ensemble).

    For class ``c`` with cleaned name ``n_c = clean_class_name(name_c)``::

        f_c = mean_t clip_model.encode_text(tokenize(template_t.format(n_c)))   # unnormalized
        out[c] = f_c / ||f_c||_2

    Prompts are tokenized with ``clip.tokenize(texts, context_length=clip_model.context_length,
    truncate=True)`` and encoded under ``torch.no_grad()`` with autocast disabled, on the device
    of the model's parameters, in the model's own dtype (``clip_model.dtype``: float32 on CPU,
    float16 for CLIP's fp16 weights on GPU).  Features are summed per class into a float32
    ``(C, E)`` accumulator, so peak memory is ``O(C * E + batch_size * L * width)``.

    Two paths compute the same function:

    * **fast** (default when the model has an OpenAI-CLIP text tower, see
      :func:`fast_path_problem`): every prompt is cut after its end-of-text token, prompts are
      sorted by that length and batched (at most ``batch_size`` prompts) with prompts of the
      same length, so no padding is run, and each batch runs through the model's own modules
      (``token_embedding``, ``positional_embedding[:L]``, ``transformer`` with its
      ``resblocks``, ``ln_final``, ``text_projection``) at its length ``L`` (about 9-10 of the
      77 positions for LVIS names, 77 for a prompt cut at the context length), with each block's
      ``attn_mask`` temporarily set to the top-left ``L x L`` slice of its own mask and
      restored afterwards (also on an exception; the masks are shared state, so do not run
      the same model from another thread meanwhile).
      *Why it is exact:* CLIP's text transformer is causal (each block adds a 77 x 77 mask
      that is ``-inf`` above the diagonal, so position ``i`` only attends to positions
      ``<= i``), and the embedding is read at the end-of-text token
      (``x[arange, text.argmax(-1)]`` after ``ln_final``, then ``@ text_projection``).  The
      hidden states up to the end-of-text position therefore do not depend on anything after
      it: the padding that is dropped contributes ``exp(-inf) = 0`` attention weight.  Only
      the floating-point rounding differs (other matrix shapes, another summation order per
      class): the normalized embeddings match the plain path to ~1e-6 (float32).
    * **plain** (``fast=False``, or a model without such a tower): class-major batches of
      ``batch_size`` prompts through ``clip_model.encode_text`` on full 77-token sequences.

    Class names whose prompts tokenize identically (names that differ only in case, such as
    V3Det's "Timer" and "timer": CLIP's tokenizer lower-cases) are encoded once, and every such
    twin gets a copy of that row, so their embeddings are bit-identical by construction on any
    device and thread count (not two encodings that happen to round alike).

    A tqdm progress bar (prompts, rate, ETA) is drawn on stderr and one INFO line is logged at
    the start (classes x templates, device, dtype, path) and one at the end (seconds,
    prompts/s).  The result does not depend on ``batch_size`` beyond floating-point rounding.

    Source: paper Sec. 3 (class embeddings from the frozen CLIP text encoder);
    released implementation: 80-template ensemble (+ "{}."), mean of
    unnormalized features, then L2 normalization.

    Args:
        clip_model: an OpenAI CLIP model (``clip.model.CLIP``) or anything with
            ``encode_text(LongTensor[B, L]) -> Tensor[B, E]`` and parameters (plain path).
        class_names: C class names, each a non-blank ``str``; order defines the
            row (class) index.
        templates: T prompt templates, each containing exactly one ``"{}"``.
        batch_size: number of prompts run through the text tower at once (>= 1).
        fast: ``None`` (default): the fast path when :func:`fast_path_problem` finds none, else
            the plain path (the reason is logged); ``True``: the fast path or a ``ValueError``;
            ``False``: the plain path (the reference).
        progress: ``None`` (default): a progress bar only when stderr is a terminal and the
            encoding lasts over a second; ``True``: always; ``False``: never.
        tokenizer: ``fn(list of str) -> (N, context_length) int64`` of a model with its own
            tokenizer (OpenCLIP); None: OpenAI CLIP's ``clip.tokenize``. With a tokenizer the
            plain ``encode_text`` path runs.

    Returns:
        ``torch.Tensor`` of shape ``(C, E)``, dtype ``torch.float32``, on CPU,
        each row with unit L2 norm.

    Raises:
        ValueError: empty vocabulary ("vocabulary is empty: ..."); a class name
            that is not a ``str`` or is empty/whitespace (message names its
            index); duplicated class names (message names them); invalid or
            empty templates; ``batch_size < 1``; ``fast=True`` on a model the fast
            path cannot run (message says why).
        TypeError: ``class_names`` is a single string; ``fast`` not None/bool.
        RuntimeError: ``encode_text`` returned a wrongly shaped tensor (plain path); a class
            whose mean feature has zero or non-finite norm.
    """
    return _encode_with_stats(clip_model, class_names, templates, batch_size, fast, progress, tokenizer)[0]


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
    templates = _validate_templates(templates)
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
