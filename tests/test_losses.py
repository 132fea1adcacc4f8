"""The focal loss: released alpha/gamma, scale independent of the vocabulary size."""

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss

from regionspot.modeling.losses import region_focal_loss


def test_matches_focal_loss_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([0])
    per = sigmoid_focal_loss(logits, torch.tensor([[1.0, 0.0, 0.0]]), alpha=0.25, gamma=2.0, reduction="none")[0]
    torch.testing.assert_close(region_focal_loss(logits, labels, negative_classes=2.0), per.sum())
    torch.testing.assert_close(region_focal_loss(logits, labels, negative_classes=1.0), per[0] + (per[1] + per[2]) / 2)


def test_default_equals_the_released_sum_on_objects365():
    """K = 364: the released sum over classes on 365 classes."""
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 365) * 3, torch.randint(0, 365, (5,))
    targets = torch.nn.functional.one_hot(labels, 365).float()
    released = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum") / 5
    torch.testing.assert_close(region_focal_loss(logits, labels), released)


def test_scale_does_not_depend_on_vocabulary_size():
    torch.manual_seed(0)
    losses = []
    for classes in (10, 365, 13000):
        logits = torch.full((8, classes), -3.0)
        logits[:, 0] = 1.0
        losses.append(region_focal_loss(logits, torch.zeros(8, dtype=torch.long)).item())
    assert max(losses) - min(losses) < 1e-6
    # the released sum over classes would grow ~1000x from 10 to 13000 classes
    summed = [sigmoid_focal_loss(torch.full((1, c), -3.0), torch.zeros(1, c), reduction="sum").item()
              for c in (10, 13000)]
    assert summed[1] > 1000 * summed[0]


def test_gradient_pushes_positive_up_and_negatives_down():
    logits = torch.zeros(2, 4, requires_grad=True)
    region_focal_loss(logits, torch.tensor([1, 3])).backward()
    assert logits.grad[0, 1] < 0 and logits.grad[1, 3] < 0
    assert (logits.grad[0, [0, 2, 3]] > 0).all()


def test_empty_and_bad_labels():
    logits = torch.zeros(0, 5, requires_grad=True)
    assert region_focal_loss(logits, torch.zeros(0, dtype=torch.long)).item() == 0.0
    with pytest.raises(ValueError, match="labels must lie in"):
        region_focal_loss(torch.zeros(2, 5), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="logits must be"):
        region_focal_loss(torch.zeros(2, 5), torch.tensor([0]))
