"""Training loss of the RegionSpot head (paper Sec. 3: sigmoid focal loss on matching scores)."""

import torch
from fvcore.nn import sigmoid_focal_loss


def region_focal_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25,
                      gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss over the vocabulary, normalised so its scale does not depend on it.

    The released code sums the focal loss of every (region, class) pair, so the loss (and the
    weight of the one positive class against the negatives) grows with the vocabulary: 365
    Objects365 classes, 601 OpenImages, 13k V3Det. Here each region contributes the loss of
    its positive class plus the *mean* loss of its negative classes, averaged over regions:

        L = mean_i [ FL(p_i,y_i; 1) + 1/(C-1) sum_{c != y_i} FL(p_i,c; 0) ]

    Args:
        logits: (M, C) float matching logits of M regions against C classes.
        labels: (M,) int64 class index in [0, C) of each region.
        alpha, gamma: focal-loss parameters (0.25 and 2 as in the paper).

    Returns:
        scalar float32 loss; 0 (connected to ``logits``) when M == 0.

    Raises:
        ValueError: labels out of range or shapes that do not match.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (M, C) and labels (M,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    m, c = logits.shape
    if m == 0:
        return logits.sum() * 0.0
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got range [{labels.min()}, {labels.max()}]")
    targets = torch.zeros_like(logits, dtype=torch.float32)
    targets[torch.arange(m, device=logits.device), labels] = 1.0
    loss = sigmoid_focal_loss(logits.float(), targets, alpha=alpha, gamma=gamma, reduction="none")
    positive = (loss * targets).sum(dim=1)
    negative = (loss * (1 - targets)).sum(dim=1) / max(c - 1, 1)
    return (positive + negative).mean()
