"""Training loss of the RegionSpot head (paper Sec. 3: sigmoid focal loss on matching scores)."""

from typing import Optional

import torch
from fvcore.nn import sigmoid_focal_loss


def region_focal_losses(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                        negative_classes: float = 364.0, ignore: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-region sigmoid focal loss over a vocabulary, its negatives weighing a fixed amount.

    The released code sums the focal loss of every (region, class) pair, so the loss, and the
    weight of the negatives against the one positive class, grows with the vocabulary: 365
    Objects365 classes, 601 OpenImages, 13k V3Det. Here the negatives of a region always
    weigh as much as ``negative_classes`` classes, whatever the vocabulary size C:

        L_i = FL(p_i,y_i; 1) + K / |N_i| sum_{c in N_i} FL(p_i,c; 0),  K = negative_classes

    where N_i are the region's negatives: every class but its label, minus the ``ignore``d ones
    (classes whose absence was not verified for the image, or ancestors of the label in a
    class hierarchy). With the default K = 364 and nothing ignored, the loss equals the released
    one (sum over classes) on Objects365's 365 classes, and keeps that balance on any other
    vocabulary. Too small a K leaves false positives nearly free, and one "hub" class can then
    win every region's softmax while per-class rankings still look good.

    Args:
        logits: (M, C) float matching logits of M regions against C classes.
        labels: (M,) int64 class index in [0, C) of each region.
        alpha, gamma: focal-loss parameters (0.25 and 2 as in the paper).
        negative_classes: K, the total weight of a region's negatives, in classes.
        ignore: optional (M, C) bool, True where a class is neither positive nor negative for
            the region (the label itself is never ignored).

    Returns:
        (M,) float32 losses.

    Raises:
        ValueError: labels out of range or shapes that do not match.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (M, C) and labels (M,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    m, c = logits.shape
    if ignore is not None and ignore.shape != logits.shape:
        raise ValueError(f"ignore must be (M, C) = {tuple(logits.shape)}, got {tuple(ignore.shape)}")
    if m == 0:
        return logits.sum(dim=1) * 0.0
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got range [{labels.min()}, {labels.max()}]")
    targets = torch.zeros_like(logits, dtype=torch.float32)
    targets[torch.arange(m, device=logits.device), labels] = 1.0
    loss = sigmoid_focal_loss(logits.float(), targets, alpha=alpha, gamma=gamma, reduction="none")
    positive = (loss * targets).sum(dim=1)
    negatives = 1 - targets
    if ignore is not None:
        negatives = negatives * (~ignore).float()
    count = negatives.sum(dim=1).clamp(min=1)
    return positive + (loss * negatives).sum(dim=1) * (negative_classes / count)


def region_focal_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25,
                      gamma: float = 2.0, negative_classes: float = 364.0,
                      ignore: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The mean of :func:`region_focal_losses` over the M regions (a scalar; 0 connected to
    ``logits`` when M == 0). Arguments and errors as :func:`region_focal_losses`."""
    losses = region_focal_losses(logits, labels, alpha, gamma, negative_classes, ignore)
    return losses.mean() if losses.numel() else logits.sum() * 0.0
