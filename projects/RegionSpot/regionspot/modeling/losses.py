"""Training loss of the RegionSpot head (paper Sec. 3: sigmoid focal loss on matching scores):
the per-region loss (:func:`region_focal_losses`) and the criterion that decides, per image,
which classes are a region's negatives (:class:`RegionSpotCriterion`)."""

from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence

import torch
from fvcore.nn import sigmoid_focal_loss

if TYPE_CHECKING:
    from .text_classifier import Vocabulary


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


class RegionSpotCriterion:
    """The training criterion: each image's regions against its own dataset's vocabulary, the
    focal loss of :func:`region_focal_losses` with every ignore mask, averaged over all regions
    of the batch (``MODEL.REGIONSPOT.FOCAL_*``, ``IGNORE_*_NEGATIVES``).

    A class is not a negative of a region (:meth:`ignored_negatives`) when
      - ``ignore_unverified_negatives`` and the image lists verified image-level labels
        (``inputs["image_level_labels"]``, OpenImages): its presence was not verified;
      - ``ignore_ancestor_negatives``: it is an ancestor of the region's class in the
        vocabulary's hierarchy (V3Det);
      - always: its text reads the same to CLIP as the region's class
        (:attr:`~regionspot.modeling.text_classifier.Vocabulary.aliases`): no text embedding can
        tell them apart.
    """

    def __init__(self, *, focal_alpha: float = 0.25, focal_gamma: float = 2.0, negative_classes: float = 364.0,
                 ignore_unverified_negatives: bool = False, ignore_ancestor_negatives: bool = False):
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.negative_classes = negative_classes
        self.ignore_unverified_negatives = ignore_unverified_negatives
        self.ignore_ancestor_negatives = ignore_ancestor_negatives

    @classmethod
    def from_config(cls, cfg) -> "RegionSpotCriterion":
        rs = cfg.MODEL.REGIONSPOT
        return cls(focal_alpha=rs.FOCAL_ALPHA, focal_gamma=rs.FOCAL_GAMMA, negative_classes=rs.FOCAL_NEGATIVE_CLASSES,
                   ignore_unverified_negatives=rs.IGNORE_UNVERIFIED_NEGATIVES,
                   ignore_ancestor_negatives=rs.IGNORE_ANCESTOR_NEGATIVES)

    def ignored_negatives(self, inputs: Mapping, labels: torch.Tensor, vocabulary: "Vocabulary"
                          ) -> Optional[torch.Tensor]:
        """(M, C) bool: the classes that are not negatives for an image's M regions, or None.

        Args:
            inputs: the image's input dict (optional "image_level_labels": contiguous ids).
            labels: (M,) int64 class indices of its regions.
            vocabulary: the image's vocabulary (names, aliases, ancestors).
        """
        m, c = labels.shape[0], len(vocabulary.names)
        ignore = None

        def mask():
            return ignore if ignore is not None else torch.zeros(m, c, dtype=torch.bool, device=labels.device)

        for row, label in enumerate(labels.tolist()):
            twins = vocabulary.aliases.get(label)
            if twins:
                ignore = mask()
                ignore[row, twins] = True
        verified = inputs.get("image_level_labels")
        if self.ignore_unverified_negatives and verified is not None:
            known = torch.zeros(c, dtype=torch.bool, device=labels.device)
            known[torch.as_tensor(list(verified), dtype=torch.long, device=labels.device)] = True
            known[labels] = True
            unverified = (~known)[None].expand(m, c)
            ignore = unverified.clone() if ignore is None else ignore | unverified
        if self.ignore_ancestor_negatives and vocabulary.ancestors:
            for row, label in enumerate(labels.tolist()):
                parents = vocabulary.ancestors.get(label)
                if parents:
                    ignore = mask()
                    ignore[row, parents] = True
        return ignore

    def __call__(self, logits: Sequence[torch.Tensor], inputs: Sequence[Mapping],
                 vocabularies: Sequence["Vocabulary"]) -> Dict[str, torch.Tensor]:
        """``{"loss_region_focal": mean over all regions of the batch}``.

        Args:
            logits: per image with regions, (M_i, C_i) float matching logits against its vocabulary.
            inputs: the matching input dicts ("instances" with ``gt_classes`` (M_i,) int64).
            vocabularies: the matching vocabularies.
        """
        losses: List[torch.Tensor] = []
        for lg, x, vocabulary in zip(logits, inputs, vocabularies):
            labels = x["instances"].gt_classes.to(lg.device)
            losses.append(region_focal_losses(lg, labels, self.focal_alpha, self.focal_gamma, self.negative_classes,
                                              self.ignored_negatives(x, labels, vocabulary)))
        return {"loss_region_focal": torch.cat(losses).mean()}
