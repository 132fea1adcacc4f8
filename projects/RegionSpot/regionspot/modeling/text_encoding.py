"""CLIP's text tower run on every (class name, template) prompt of a vocabulary: the prompt
ensemble of the class-name embeddings (:func:`encode_class_names`), in fixed-size batches, on a
fast path that cuts every prompt after its end-of-text token (see :mod:`.text_embeddings` for
the method and the measured speed) or on the plain ``encode_text`` reference path."""

import contextlib
import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ..data.vocabularies import check_vocabulary, clean_class_name
from .prompt_templates import PROMPT_TEMPLATES, validate_templates

# The log lines keep the name they had when this was part of text_embeddings.py.
logger = logging.getLogger("regionspot.modeling.text_embeddings")

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
    templates = validate_templates(templates)
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

