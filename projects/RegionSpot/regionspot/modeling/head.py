"""The trainable RegionSpot head: position-aware tokens cross-attend to the semantic feature map.

Paper Sec. 3, eq. 1: ``S = softmax(F_p K_v^T / sqrt(C)) V_v`` with the position-aware tokens
F_p as queries and the CLIP tokens as keys and values, stacked as a DETR-style decoder. As in
the released implementation (docs/method.md §3-4):

1. ``to_clip = Linear(T, D)`` lifts each token (T = 256) to CLIP's width D;
2. ``decoder``: post-norm transformer decoder, 3 layers, 8 heads, FFN 2048 with ReLU,
   dropout 0.1, no positional encodings, batch-first, final LayerNorm. Each layer is
   self-attention among the image's region tokens, cross-attention to the CLIP tokens, FFN;
3. ``projector = Linear(D, E)`` into CLIP's joint embedding space.

Parameter names and shapes are those of the released checkpoints (under ``model.``):
24,226,304 parameters for BB (D=768, E=512) and 38,853,376 for BL (D=1024, E=768).
Unlike the released code, padded region slots are masked out of self-attention.

Cross-attention maps (paper Sec. 4.3, Fig. 4): ``return_attention=True`` runs the same decoder
layers step by step (:meth:`RegionSpotHead.forward_with_attention`) and returns, per layer,
each token's cross-attention weights over the semantic feature map averaged over heads. Without
it, ``nn.TransformerDecoder`` runs exactly as before: recording costs nothing when it is off
(docs/speed.md, "Cross-attention maps").
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .profiling import stage


class RegionSpotHead(nn.Module):
    """to_clip -> cross-attention decoder -> projector.

    Args:
        token_dim: T, channels of a position-aware token (256; 32 for the "mlp" source).
        clip_width: D, channels of the semantic feature map.
        embed_dim: E, CLIP's joint embedding size (text embeddings live there).
        num_layers: decoder depth (paper Table 4c: 1, 3 (default), 6).
        num_heads, dim_feedforward, dropout: decoder layer settings.
    """

    def __init__(self, token_dim: int, clip_width: int, embed_dim: int, num_layers: int = 3,
                 num_heads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.to_clip = nn.Linear(token_dim, clip_width)
        layer = nn.TransformerDecoderLayer(
            clip_width, num_heads, dim_feedforward=dim_feedforward, dropout=dropout,
            activation="relu", batch_first=True, norm_first=False,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(clip_width))
        self.projector = nn.Linear(clip_width, embed_dim)

    def forward(self, tokens: torch.Tensor, semantic_features: torch.Tensor,
                padding_mask: Optional[torch.Tensor] = None, return_attention: bool = False):
        """Region embeddings in CLIP's joint space.

        Args:
            tokens: (B, N, T) float32 position-aware tokens, N region slots per image.
            semantic_features: (B, L, D) float32 CLIP feature maps.
            padding_mask: (B, N) bool, True at padded slots (ignored as attention keys), or None.
            return_attention: also return the cross-attention weights
                (:meth:`forward_with_attention`); off, the decoder runs unchanged.

        Returns:
            (B, N, E) float32 region embeddings (not normalised); with ``return_attention``,
            ``(embeddings, attention)`` with attention (B, num_layers, N, L) float32.
        """
        queries = self.to_clip(tokens)
        mask = None
        if padding_mask is not None:
            # A float mask (0 / -inf) works on every torch path and never blocks a whole row:
            # each image has at least one real slot, or it is not sent to the head.
            mask = torch.zeros(padding_mask.shape, dtype=queries.dtype, device=queries.device)
            mask = mask.masked_fill(padding_mask, float("-inf"))
        memory = semantic_features.to(queries.dtype)
        if return_attention:
            x, attention = self.forward_with_attention(queries, memory, mask)
            return self.projector(x), attention
        x = self.decoder(queries, memory, tgt_key_padding_mask=mask)
        return self.projector(x)

    def forward_with_attention(self, queries: torch.Tensor, memory: torch.Tensor,
                               key_padding_mask: Optional[torch.Tensor] = None):
        """The decoder's layers one by one, keeping each layer's cross-attention weights.

        The same computation as ``nn.TransformerDecoder`` with post-norm layers
        (``TransformerDecoderLayer.forward``: ``norm1(x + sa(x))``, ``norm2(x + mha(x, memory))``,
        ``norm3(x + ff(x))``, then the final norm), except that the cross-attention is called
        with ``need_weights=True, average_attn_weights=True``; ``tests/test_head.py`` checks that
        the embeddings equal the decoder's.

        Args:
            queries: (B, N, D) lifted tokens (``to_clip`` output).
            memory: (B, L, D) semantic feature maps.
            key_padding_mask: (B, N) float 0 / -inf at padded slots, or None.

        Returns:
            ((B, N, D) decoder output, (B, num_layers, N, L) float32 attention weights, each
            row a distribution over the L feature-map tokens, averaged over heads).
        """
        x, maps = queries, []
        for layer in self.decoder.layers:
            if layer.norm_first:
                raise NotImplementedError("attention maps are recorded for post-norm decoder layers only")
            x = layer.norm1(x + layer._sa_block(x, None, key_padding_mask))
            attended, weights = layer.multihead_attn(x, memory, memory, need_weights=True,
                                                     average_attn_weights=True)
            x = layer.norm2(x + layer.dropout2(attended))
            x = layer.norm3(x + layer._ff_block(x))
            maps.append(weights.float())
        if self.decoder.norm is not None:
            x = self.decoder.norm(x)
        return x, torch.stack(maps, dim=1)

    @stage("head")
    def embed_regions(self, tokens: List[torch.Tensor], semantic_features: torch.Tensor,
                      return_attention: bool = False):
        """The head on B images with different numbers of regions: the (N_i, T) token lists
        padded into one (B, max N_i, T) batch with a padding mask, cross-attending their
        feature maps.

        Args:
            tokens: B tensors (N_i, T) float32 position-aware tokens, N_i >= 1.
            semantic_features: (B, L, D) float32 CLIP feature maps.
            return_attention: also return each region's cross-attention weights.

        Returns:
            B tensors (N_i, E) float32 region embeddings (not normalised); with
            ``return_attention``, ``(embeddings, attention)`` with B tensors
            (N_i, num_layers, L) float32 (heads averaged; the class token, when the feature map
            has one, is row 0 of L).
        """
        counts = [t.shape[0] for t in tokens]
        padded = nn.utils.rnn.pad_sequence(tokens, batch_first=True)
        padding_mask = torch.arange(padded.shape[1], device=padded.device)[None] >= torch.tensor(
            counts, device=padded.device)[:, None]
        out = self(padded, semantic_features, padding_mask if min(counts) < padded.shape[1] else None,
                   return_attention=return_attention)
        if not return_attention:
            return [out[i, :n] for i, n in enumerate(counts)]
        out, attention = out
        return ([out[i, :n] for i, n in enumerate(counts)],
                [attention[i, :, :n].transpose(0, 1) for i, n in enumerate(counts)])


def region_logits(region_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                  logit_scale: float = 100.0, normalized: bool = False) -> torch.Tensor:
    """Matching logits between regions and the vocabulary.

    ``logit_scale * normalize(region) . text^T`` (released code: CLIP's fixed
    ``logit_scale.exp()`` = 100, no bias).

    Args:
        region_embeddings: (..., E) float.
        text_embeddings: (C, E) float, rows L2-normalised.
        normalized: the region embeddings are ``F.normalize(e.float())`` already (the model's
            stored region embeddings): not normalised a second time, so that scoring them gives
            the live logits bit for bit.

    Returns:
        (..., C) float32 logits.
    """
    regions = region_embeddings.float() if normalized else F.normalize(region_embeddings.float(), dim=-1)
    return logit_scale * regions @ text_embeddings.float().t()
