"""``rpn`` proposals: Detectron2's Region Proposal Network with its own weights file.

The paper's "RPN boxes" row (Table 1) recognises the boxes of a class-agnostic RPN. The RPN
here is Detectron2's own: the backbone and RPN head are built by Detectron2's builders
(``build_backbone``, ``build_proposal_generator``) from the usual config keys
(``MODEL.BACKBONE``, ``MODEL.RESNETS``, ``MODEL.FPN``, ``MODEL.ANCHOR_GENERATOR``,
``MODEL.RPN``, ``MODEL.PIXEL_MEAN/STD``), and its weights come from
``MODEL.REGIONSPOT.RPN_WEIGHTS`` in any format Detectron2's checkpointer reads: a model-zoo
``.pkl`` (e.g. COCO-Detection/rpn_R_50_FPN_1x, ``model_final_02ce48.pkl``), a Detectron2
``.pth`` checkpoint (e.g. RegionCLIP's LVIS RPN ``rpn_lvis_866.pth``, an R50-FPN RPN), or the
checkpoint of a whole Faster/Mask R-CNN, whose ``roi_heads`` are ignored. It runs in the same
forward as RegionSpot, on the same resized image (short side 800, as Detectron2's RPNs
were trained), and gives the top ``RPN.POST_NMS_TOPK_TEST`` boxes with their objectness.
"""

import os
from typing import List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.structures import ImageList, Instances
from torch import nn

from ..weights import WeightsError

RPN_INPUT_FORMATS = ("BGR", "RGB")
# Where the default weights are published (named in the error for a missing file).
RPN_WEIGHTS_SOURCES = (
    "Detectron2 model zoo, COCO-Detection/rpn_R_50_FPN_1x: https://dl.fbaipublicfiles.com/detectron2/"
    "COCO-Detection/rpn_R_50_FPN_1x/137258492/model_final_02ce48.pkl; RegionCLIP's LVIS RPN "
    "(rpn_lvis_866.pth, R50-FPN): https://github.com/microsoft/RegionCLIP (pretrained_ckpt/rpn)"
)


class _StrictRPNCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer that refuses a file leaving any RPN weight missing or misshapen
    (Detectron2 would only log it and run with random weights)."""

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        problems = []
        if incompatible.missing_keys:
            keys = incompatible.missing_keys
            problems.append(f"{len(keys)} missing weights (e.g. {', '.join(keys[:5])})")
        if incompatible.incorrect_shapes:
            shapes = [f"{k}: {tuple(a)} in the file, {tuple(b)} in the model"
                      for k, a, b in incompatible.incorrect_shapes[:5]]
            problems.append(f"{len(incompatible.incorrect_shapes)} shape mismatches ({'; '.join(shapes)})")
        if problems:
            raise WeightsError(
                f"RPN weights file {self.source!r} does not fit the RPN that the config describes "
                f"(MODEL.BACKBONE / RESNETS / FPN / ANCHOR_GENERATOR / RPN): " + "; ".join(problems)
                + ". Use the config of the model the file was trained with (e.g. configs/eval_lvis_rpn.yaml "
                  "for R50-FPN RPNs).")
        return incompatible


class RPNProposalGenerator(nn.Module):
    """Frozen Detectron2 backbone + RPN: images -> proposals with objectness.

    Args:
        cfg: a Detectron2 config describing the RPN (backbone, anchors, RPN head, pixel
            mean/std, ``RPN.POST_NMS_TOPK_TEST``).
        weights: path of the RPN's weights file (see the module docstring); None leaves the
            weights randomly initialised (only to write test files, see
            :func:`regionspot.testing.random_backbones.write_random_rpn`).
        input_format: channel order the RPN was trained with ("BGR" for Detectron2's model
            zoo, whose pixel mean/std are BGR); RegionSpot's images are RGB and are flipped.

    Raises:
        WeightsError: the file is missing, unreadable, or leaves RPN weights missing or
            misshapen (the message names the file and the keys).
        ValueError: unknown ``input_format``.
    """

    def __init__(self, cfg, weights: Optional[str], input_format: str = "BGR"):
        super().__init__()
        from detectron2.modeling import build_backbone, build_proposal_generator

        if input_format not in RPN_INPUT_FORMATS:
            raise ValueError(f"MODEL.REGIONSPOT.RPN_INPUT_FORMAT must be one of {RPN_INPUT_FORMATS}, "
                             f"got {input_format!r}")
        self.input_format = input_format
        # Attribute names follow Detectron2's meta-architectures, so checkpoint keys
        # ("backbone.*", "proposal_generator.*") load as they are.
        self.backbone = build_backbone(cfg)
        self.proposal_generator = build_proposal_generator(cfg, self.backbone.output_shape())
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), persistent=False)
        if weights is not None:
            load_rpn_weights(self, weights)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        """Always in eval mode: the RPN is frozen (its proposals, not its losses, are wanted)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: List[torch.Tensor]) -> List[Instances]:
        """Proposals of a batch of images.

        Args:
            images: B tensors (3, H_i, W_i) uint8 RGB (the mapper's resized images).

        Returns:
            B ``Instances`` of size (H_i, W_i) with ``proposal_boxes`` (XYXY_ABS pixels of
            that image) and ``objectness_logits``, at most ``RPN.POST_NMS_TOPK_TEST`` each,
            sorted by decreasing objectness.
        """
        device = self.pixel_mean.device
        tensors = []
        for image in images:
            x = image.to(device).float()
            if self.input_format == "BGR":
                x = x.flip(0)
            tensors.append((x - self.pixel_mean) / self.pixel_std)
        batch = ImageList.from_tensors(tensors, self.backbone.size_divisibility)
        features = self.backbone(batch.tensor)
        proposals, _ = self.proposal_generator(batch, features)
        return proposals


def load_rpn_weights(module: nn.Module, path: str) -> None:
    """Load an RPN weights file into ``module`` (with ``backbone`` and ``proposal_generator``).

    Raises:
        WeightsError: missing or unreadable file; weights missing or misshapen for ``module``.
    """
    path = os.path.expanduser(path or "")
    if not path or not os.path.isfile(path):
        raise WeightsError(f"RPN weights file not found: {path!r} (set by MODEL.REGIONSPOT.RPN_WEIGHTS). "
                           f"Download one, e.g. {RPN_WEIGHTS_SOURCES}")
    checkpointer = _StrictRPNCheckpointer(module)
    checkpointer.source = path
    try:
        checkpointer.load(path, checkpointables=[])
    except WeightsError:
        raise
    except Exception as e:  # pickle / zip / EOF errors of a corrupt or foreign file
        raise WeightsError(f"cannot read RPN weights file {path!r}: {type(e).__name__}: {e}") from e
