"""SAM image-encoder attention through ``torch.nn.functional.scaled_dot_product_attention``.

SAM's ViT (``segment_anything.modeling.image_encoder.Attention``) computes
``softmax(q k^T / sqrt(d) + B) v`` where ``B`` is MViTv2's decomposed relative-position term
(``rel_h[q_row, k_row] + rel_w[q_col, k_col]``, from ``add_decomposed_rel_pos``). The official
forward materialises the full attention matrix, adds ``B`` into it and applies softmax in
separate kernels. :func:`sdpa_attention_forward` computes the same function with the
relative-position term built once as an additive attention bias and the rest fused in
PyTorch's SDPA kernel (flash-style on the CPU, memory-efficient on CUDA). The
relative-position embeddings come from segment_anything's own ``get_rel_pos``; nothing of
the official module is changed except the bound ``forward`` of each instance.

:func:`set_sam_attention` switches a SAM image encoder between the two; the result differs
from the official forward by float rounding only (measured: <= 3e-6 on SAM ViT-B's embedding
in float32; ``tools/benchmark.py --end-to-end`` records it per run).
"""

import types
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

SAM_ATTENTION_KINDS = ("official", "sdpa")


def relative_position_bias(q: torch.Tensor, attention: nn.Module, size: Tuple[int, int]) -> torch.Tensor:
    """SAM's decomposed relative-position term as an additive attention bias.

    Args:
        q: (B * heads, H * W, d) queries, unscaled (SAM adds ``q . R`` with the raw queries).
        attention: the ``segment_anything`` ``Attention`` module (``rel_pos_h``, ``rel_pos_w``).
        size: (H, W) of the token grid (a window, or the whole 64 x 64 grid).

    Returns:
        (B * heads, H * W, H * W) bias in the dtype of ``q``: entry [n, (i, j), (k, l)] =
        ``q[n, (i, j)] . (R_h[i - k] + ...)``, exactly the two terms ``add_decomposed_rel_pos`` adds.
    """
    from segment_anything.modeling.image_encoder import get_rel_pos

    h, w = size
    rel_h_table = get_rel_pos(h, h, attention.rel_pos_h).to(q.dtype)  # (H, H, d)
    rel_w_table = get_rel_pos(w, w, attention.rel_pos_w).to(q.dtype)  # (W, W, d)
    grid_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h_table)  # (n, H, W, H_k)
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w_table)  # (n, H, W, W_k)
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(q.shape[0], h * w, h * w)


def sdpa_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop-in forward for ``segment_anything.modeling.image_encoder.Attention``.

    Args:
        x: (B, H, W, C) tokens of a window or of the whole grid, any float dtype.

    Returns:
        (B, H, W, C), the official forward's output up to float rounding.
    """
    b, h, w, _ = x.shape
    heads = self.num_heads
    qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
    bias = relative_position_bias(q, self, (h, w)) if self.use_rel_pos else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return self.proj(out)


def set_sam_attention(image_encoder: nn.Module, kind: str) -> int:
    """Choose the attention forward of every attention layer of a SAM image encoder.

    Args:
        image_encoder: ``segment_anything``'s ``ImageEncoderViT``.
        kind: "official" (segment_anything's own forward) or "sdpa" (:func:`sdpa_attention_forward`).

    Returns:
        The number of attention layers switched (12 for ViT-B).

    Raises:
        ValueError: an unknown ``kind``, or an encoder without segment_anything attention layers.
    """
    from segment_anything.modeling.image_encoder import Attention

    if kind not in SAM_ATTENTION_KINDS:
        raise ValueError(f"SAM attention must be one of {SAM_ATTENTION_KINDS}, got {kind!r}")
    layers = [m for m in image_encoder.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(image_encoder).__name__} has no segment_anything attention layer to switch")
    for layer in layers:
        if kind == "sdpa":
            layer.forward = types.MethodType(sdpa_attention_forward, layer)
        else:
            layer.__dict__.pop("forward", None)  # back to the class's (official) forward
    return len(layers)


def sam_attention_kind(image_encoder: nn.Module) -> str:
    """Which forward the attention layers of ``image_encoder`` run: "official" or "sdpa"."""
    from segment_anything.modeling.image_encoder import Attention

    kinds = {"sdpa" if "forward" in m.__dict__ else "official"
             for m in image_encoder.modules() if isinstance(m, Attention)}
    return kinds.pop() if len(kinds) == 1 else "mixed"
