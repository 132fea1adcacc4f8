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
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Region embeddings in CLIP's joint space.

        Args:
            tokens: (B, N, T) float32 position-aware tokens, N region slots per image.
            semantic_features: (B, L, D) float32 CLIP feature maps.
            padding_mask: (B, N) bool, True at padded slots (ignored as attention keys), or None.

        Returns:
            (B, N, E) float32 region embeddings (not normalised).
        """
        queries = self.to_clip(tokens)
        mask = None
        if padding_mask is not None:
            # A float mask (0 / -inf) works on every torch path and never blocks a whole row:
            # each image has at least one real slot, or it is not sent to the head.
            mask = torch.zeros(padding_mask.shape, dtype=queries.dtype, device=queries.device)
            mask = mask.masked_fill(padding_mask, float("-inf"))
        x = self.decoder(queries, semantic_features.to(queries.dtype), tgt_key_padding_mask=mask)
        return self.projector(x)

    @stage("head")
    def embed_regions(self, tokens: List[torch.Tensor], semantic_features: torch.Tensor) -> List[torch.Tensor]:
        """The head on B images with different numbers of regions: the (N_i, T) token lists
        padded into one (B, max N_i, T) batch with a padding mask, cross-attending their
        feature maps.

        Args:
            tokens: B tensors (N_i, T) float32 position-aware tokens, N_i >= 1.
            semantic_features: (B, L, D) float32 CLIP feature maps.

        Returns:
            B tensors (N_i, E) float32 region embeddings (not normalised).
        """
        counts = [t.shape[0] for t in tokens]
        padded = nn.utils.rnn.pad_sequence(tokens, batch_first=True)
        padding_mask = torch.arange(padded.shape[1], device=padded.device)[None] >= torch.tensor(
            counts, device=padded.device)[:, None]
        out = self(padded, semantic_features, padding_mask if min(counts) < padded.shape[1] else None)
        return [out[i, :n] for i, n in enumerate(counts)]


def region_logits(region_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                  logit_scale: float = 100.0) -> torch.Tensor:
    """Matching logits between regions and the vocabulary.

    ``logit_scale * normalize(region) . text^T`` (released code: CLIP's fixed
    ``logit_scale.exp()`` = 100, no bias).

    Args:
        region_embeddings: (..., E) float.
        text_embeddings: (C, E) float, rows L2-normalised.

    Returns:
        (..., C) float32 logits.
    """
    regions = F.normalize(region_embeddings.float(), dim=-1)
    return logit_scale * regions @ text_embeddings.float().t()
