"""Training loss of the RegionSpot head (paper Sec. 3: sigmoid focal loss on matching scores)."""

import torch
from fvcore.nn import sigmoid_focal_loss


def region_focal_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25,
                      gamma: float = 2.0, negative_classes: float = 364.0) -> torch.Tensor:
    """Sigmoid focal loss over the vocabulary, normalised so its scale does not depend on it.

    The released code sums the focal loss of every (region, class) pair, so the loss, and the
    weight of the negatives against the one positive class, grows with the vocabulary: 365
    Objects365 classes, 601 OpenImages, 13k V3Det. Here the negatives of a region always
    weigh as much as ``negative_classes`` classes, whatever the vocabulary size C:

        L = mean_i [ FL(p_i,y_i; 1) + K/(C-1) sum_{c != y_i} FL(p_i,c; 0) ],  K = negative_classes

    With the default K = 364 the loss equals the released one (sum over classes per region)
    on Objects365's 365 classes, and keeps that balance on any other vocabulary. Too small a K
    leaves false positives nearly free, and one "hub" class can then win every region's
    softmax while per-class rankings still look good.

    Args:
        logits: (M, C) float matching logits of M regions against C classes.
        labels: (M,) int64 class index in [0, C) of each region.
        alpha, gamma: focal-loss parameters (0.25 and 2 as in the paper).
        negative_classes: K, the total weight of a region's negatives, in classes.

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
    negative = (loss * (1 - targets)).sum(dim=1) * (negative_classes / max(c - 1, 1))
    return (positive + negative).mean()
