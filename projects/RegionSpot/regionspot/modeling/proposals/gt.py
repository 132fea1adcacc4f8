"""``gt`` proposals: the dataset's ground-truth boxes, each with proposal score 1.

The paper's main protocol (Table 1, "GT boxes"): recognition alone is measured, every
ground-truth box of the image is a proposal and localisation is perfect by construction.
"""

import torch
from detectron2.structures import Instances


def proposals_from_ground_truth(instances: Instances) -> Instances:
    """Turn an image's ground truth into Detectron2 proposals.

    Args:
        instances: ``Instances`` with ``gt_boxes`` (XYXY_ABS pixels of the mapper's image).

    Returns:
        ``Instances`` of the same image size with ``proposal_boxes`` (a copy of the boxes) and
        ``objectness_logits`` = +inf (proposal score exactly 1, so the fused score is the class
        probability whatever ``PROPOSAL_SCORE_POWER`` is).

    Raises:
        ValueError: the instances carry no ``gt_boxes``.
    """
    if not instances.has("gt_boxes"):
        raise ValueError("ground-truth proposals need Instances with gt_boxes")
    proposals = Instances(instances.image_size)
    proposals.proposal_boxes = instances.gt_boxes.clone()
    proposals.objectness_logits = torch.full((len(instances),), float("inf"),
                                             device=instances.gt_boxes.device)
    return proposals
