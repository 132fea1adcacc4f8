"""SAM image-encoder attention through ``torch.nn.functional.scaled_dot_product_attention``.

SAM's ViT (``segment_anything.modeling.image_encoder.Attention``) computes
``softmax(q k^T / sqrt(d) + B) v`` where ``B`` is MViTv2's decomposed relative-position term
(``rel_h[q_row, k_row] + rel_w[q_col, k_col]``, from ``add_decomposed_rel_pos``). The official
forward materialises the full attention matrix, adds ``B`` into it and applies softmax in
separate kernels. :func:`sdpa_attention_forward` computes the same function with the
relative-position term built as an additive attention bias (a few token rows of queries at a
time) and the rest fused in PyTorch's SDPA kernel (flash-style on the CPU, memory-efficient on CUDA). The
relative-position embeddings come from segment_anything's own ``get_rel_pos``; nothing of
the official module is changed except the bound ``forward`` of each instance.

:func:`set_sam_attention` switches a SAM image encoder between the two; the result differs
from the official forward by float rounding only (measured: <= 3e-6 on SAM ViT-B's embedding
in float32; ``tools/benchmark.py e2e`` records it per run).
"""

import sys
import types
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

SAM_ATTENTION_KINDS = ("official", "sdpa")


#: Elements of the attention bias built at a time (64 MB in float32): the queries are taken a
#: few token rows at a time so that the bias of a global-attention layer of ViT-B,
#: (B * 12, 4096, 4096), 805 MB per image, is never held whole (see :func:`sdpa_attention_forward`).
BIAS_CHUNK_ELEMENTS = 1 << 24


def relative_position_terms(q: torch.Tensor, attention: nn.Module,
                            size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two factors of SAM's decomposed relative-position term (MViTv2's ``add_decomposed_rel_pos``).

    Args:
        q: (n, H * W, d) queries (n = B * heads), unscaled (SAM adds ``q . R`` with the raw queries).
        attention: the ``segment_anything`` ``Attention`` module (``rel_pos_h``, ``rel_pos_w``).
        size: (H, W) of the token grid (a window, or the whole 64 x 64 grid).

    Returns:
        rel_h (n, H, W, H) and rel_w (n, H, W, W), contiguous, in the dtype of ``q``:
        ``rel_h[n, i, j, k] = q[n, (i, j)] . R_h[i - k]`` and ``rel_w[n, i, j, l] = q[n, (i, j)] . R_w[j - l]``.
    """
    from segment_anything.modeling.image_encoder import get_rel_pos

    h, w = size
    rel_h_table = get_rel_pos(h, h, attention.rel_pos_h).to(q.dtype)  # (H, H, d)
    rel_w_table = get_rel_pos(w, w, attention.rel_pos_w).to(q.dtype)  # (W, W, d)
    grid_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    # einsum gives permuted views; contiguous copies (3 MB) make the bias sums below contiguous
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h_table).contiguous()
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w_table).contiguous()
    return rel_h, rel_w


def _bias_rows(rel_h: torch.Tensor, rel_w: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The bias of the queries of token rows [start, stop): (n, (stop - start) * W, H * W).

    Written straight into a contiguous tensor (without autograd): letting the broadcast add pick
    the layout of its strided inputs and reshaping afterwards would copy the whole bias again.
    """
    n, h, w, _ = rel_h.shape
    a, b = rel_h[:, start:stop].unsqueeze(-1), rel_w[:, start:stop].unsqueeze(-2)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return (a + b).reshape(n, (stop - start) * w, h * w)
    out = torch.empty((n, stop - start, w, h, w), dtype=rel_h.dtype, device=rel_h.device)
    torch.add(a, b, out=out)
    return out.view(n, (stop - start) * w, h * w)


def relative_position_bias(q: torch.Tensor, attention: nn.Module, size: Tuple[int, int]) -> torch.Tensor:
    """SAM's decomposed relative-position term as one additive attention bias.

    Args:
        q, attention, size: as :func:`relative_position_terms`.

    Returns:
        (n, H * W, H * W) bias in the dtype of ``q``: entry [n, (i, j), (k, l)] =
        ``rel_h[n, i, j, k] + rel_w[n, i, j, l]``, exactly the two terms ``add_decomposed_rel_pos`` adds.
    """
    rel_h, rel_w = relative_position_terms(q, attention, size)
    return _bias_rows(rel_h, rel_w, 0, size[0])


def _attend(attention: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """The attention of ``attention`` (a segment_anything ``Attention``) from its qkv projection.

    Each query's output depends only on its own row of the bias, so the queries go in chunks
    of whole token rows, each with its own slice of the bias (at most
    :data:`BIAS_CHUNK_ELEMENTS` elements): the same numbers as one call, without materialising
    the whole bias (805 MB per image in a global layer of ViT-B; building it was a third of
    the encoder's CPU time, and on a GPU it would bound the batch).

    Args:
        qkv: (B, H, W, 3 * C), the output of ``attention.qkv``.

    Returns:
        (B, H, W, C), before ``attention.proj``.
    """
    b, h, w, _ = qkv.shape
    heads = attention.num_heads
    # (B, heads, H * W, d) each: SDPA's fused CUDA kernels take 4-D inputs only
    q, k, v = (t.contiguous() for t in qkv.reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0))
    if not attention.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=attention.scale)
    else:
        rel_h, rel_w = relative_position_terms(q.view(b * heads, h * w, -1), attention, (h, w))
        rows = max(1, min(h, BIAS_CHUNK_ELEMENTS // (b * heads * w * h * w)))
        chunks = []
        for start in range(0, h, rows):
            stop = min(h, start + rows)
            bias = _bias_rows(rel_h, rel_w, start, stop).view(b, heads, (stop - start) * w, h * w)
            chunks.append(F.scaled_dot_product_attention(q[:, :, start * w:stop * w], k, v, attn_mask=bias,
                                                         scale=attention.scale))
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
    return out.permute(0, 2, 1, 3).reshape(b, h, w, -1)


def sdpa_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for ``segment_anything.modeling.image_encoder.Attention``:
    ``softmax(q k^T * scale + bias) v`` in PyTorch's SDPA kernel, the relative-position term
    passed as the additive bias (:func:`_attend`).

    Args:
        x: (B, H, W, C) tokens of a window or of the whole grid, any float dtype.

    Returns:
        (B, H, W, C), the official forward's output up to float rounding.
    """
    return self.proj(_attend(self, self.qkv(x)))


def sdpa_block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for ``segment_anything.modeling.image_encoder.Block`` with SDPA attention.

    A windowed block (ViT-B: 8 of 12) pads the 64 x 64 token grid to 70 x 70 with zeros and
    cuts it into 14 x 14 windows; the official forward computes the qkv projection and the
    output projection of all 4,900 positions, padding included. Here both run on the 4,096
    real tokens only: a zero token's qkv is exactly the projection's bias, which fills the
    padded positions (they are keys and values of the windows at the border, as in the
    official forward), and the output projection acts token by token, so it runs after the
    windows are put back together and the padding dropped. Same function, ~16 % fewer
    projection FLOPs in those blocks.

    Args:
        x: (B, H, W, C) tokens.

    Returns:
        (B, H, W, C), the official forward's output up to float rounding.
    """
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    shortcut = x
    x = self.norm1(x)
    if self.window_size > 0:
        attention = self.attn
        b, h, w, _ = x.shape
        size = self.window_size
        qkv = attention.qkv(x)
        hp, wp = -(-h // size) * size, -(-w // size) * size
        if (hp, wp) != (h, w):
            bias = attention.qkv.bias
            fill = bias.to(qkv.dtype) if bias is not None else qkv.new_zeros(qkv.shape[-1])
            padded = fill.expand(b, hp, wp, qkv.shape[-1]).clone()
            padded[:, :h, :w] = qkv
            qkv = padded
        windows, pad_hw = window_partition(qkv, size)
        x = attention.proj(window_unpartition(_attend(attention, windows), size, pad_hw, (h, w)))
    else:
        x = self.attn(x)
    x = shortcut + x
    return x + self.mlp(self.norm2(x))


def _sam_vit_classes() -> Tuple[tuple, tuple]:
    """The ``Attention`` and ``Block`` classes of SAM's ViT: ``segment_anything``'s, and
    ``segment_anything_hq``'s when that package is installed (SAM-HQ's image encoder is SAM's ViT,
    module for module: same attributes, same forwards; only its encoder's loop also returns the
    global blocks' outputs, which the forwards here do not touch)."""
    from segment_anything.modeling import image_encoder as sam_vit

    attention, block = [sam_vit.Attention], [sam_vit.Block]
    # a SAM-HQ encoder exists only once its package is imported: SAM alone never imports it
    hq_vit = sys.modules.get("segment_anything_hq.modeling.image_encoder")
    if hq_vit is not None:
        attention.append(hq_vit.Attention)
        block.append(hq_vit.Block)
    return tuple(attention), tuple(block)


def set_sam_attention(image_encoder: nn.Module, kind: str) -> int:
    """Choose the attention forward of every attention layer (and block) of a SAM image encoder.

    Args:
        image_encoder: ``segment_anything``'s ``ImageEncoderViT`` (or SAM-HQ's, the same ViT).
        kind: "official" (segment_anything's own forwards) or "sdpa"
            (:func:`sdpa_attention_forward` for the attention layers, :func:`sdpa_block_forward`
            for the blocks that hold them).

    Returns:
        The number of attention layers switched (12 for ViT-B).

    Raises:
        ValueError: an unknown ``kind``, or an encoder without segment_anything attention layers.
    """
    Attention, Block = _sam_vit_classes()
    if kind not in SAM_ATTENTION_KINDS:
        raise ValueError(f"SAM attention must be one of {SAM_ATTENTION_KINDS}, got {kind!r}")
    layers = [m for m in image_encoder.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(image_encoder).__name__} has no segment_anything attention layer to switch")
    blocks = [m for m in image_encoder.modules() if isinstance(m, Block)]
    for module, forward in [(m, sdpa_attention_forward) for m in layers] + [(m, sdpa_block_forward) for m in blocks]:
        if kind == "sdpa":
            module.forward = types.MethodType(forward, module)
        else:
            module.__dict__.pop("forward", None)  # back to the class's (official) forward
    return len(layers)


def sam_attention_kind(image_encoder: nn.Module) -> str:
    """Which forward the attention layers of ``image_encoder`` run: "official" or "sdpa"."""
    Attention, _ = _sam_vit_classes()

    kinds = {"sdpa" if "forward" in m.__dict__ else "official"
             for m in image_encoder.modules() if isinstance(m, Attention)}
    return kinds.pop() if len(kinds) == 1 else "mixed"
