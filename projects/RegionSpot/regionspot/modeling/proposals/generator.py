"""RegionSpot's proposal generator: the four proposal sources behind one interface.

:class:`RegionProposalGenerator` hands the model, for each image, Detectron2 proposals (see
:mod:`regionspot.modeling.proposals`) from the configured source (``PROPOSALS``):

- "gt": the input's ``instances.gt_boxes`` (:mod:`.gt`);
- "file": the input's ``proposals``, made by the test loader from a proposal file (its
  selection ran there, once, and is recorded in the input's filter report);
- "rpn": Detectron2's RPN with its own weights (:mod:`.rpn`);
- "sam_auto": SAM's automatic mask generator on the localizer's image embedding
  (:mod:`.sam_auto`).

The generated sources ("rpn", "sam_auto") are then selected (``PROPOSAL_SCORE_THRESH``,
``PROPOSAL_NMS_THRESH``, ``PROPOSAL_TOPK``) as a file's boxes are in the loader, each filter
recording what it removed in the image's :class:`~regionspot.filter_report.FilterReport`.
"""

from typing import Dict, List, Mapping, Optional, Sequence

from detectron2.structures import Instances
from torch import nn

from ...filter_report import FilterReport
from ..profiling import stage
from . import check_proposal_source, logit_to_score, select_proposals
from .gt import proposals_from_ground_truth
from .sam_auto import SamAutoProposalGenerator

GENERATED_SOURCES = ("rpn", "sam_auto")


class RegionProposalGenerator(nn.Module):
    """The boxes to recognise in each image (paper Sec. 4: ground truth, a detector's, an RPN's,
    or SAM's "everything" mode).

    Args:
        source: ``PROPOSALS``, one of :data:`~regionspot.modeling.proposals.PROPOSAL_SOURCES`.
        localizer: the model's localizer (``sam_auto`` runs its package's automatic mask
            generator on the image embedding the localizer computed; not registered here a
            second time).
        sam_auto_settings: ``SamAutomaticMaskGenerator`` settings
            (:meth:`SamAutoProposalGenerator.settings_from_config`).
        rpn: an :class:`~.rpn.RPNProposalGenerator`, needed for "rpn" (frozen, a submodule).
        topk, score_thresh, nms_thresh: the selection of generated proposals.

    Raises:
        ValueError: an unknown source, "rpn" without an RPN, a non-positive ``topk``.
    """

    def __init__(self, source: str = "gt", *, localizer: Optional[nn.Module] = None,
                 sam_auto_settings: Optional[Dict[str, object]] = None, rpn: Optional[nn.Module] = None,
                 topk: int = 1000, score_thresh: float = 0.0, nms_thresh: float = 0.0):
        super().__init__()
        self.source = check_proposal_source(source)
        if topk <= 0:
            raise ValueError(f"MODEL.REGIONSPOT.PROPOSAL_TOPK must be positive, got {topk}")
        if source == "rpn" and rpn is None:
            raise ValueError('MODEL.REGIONSPOT.PROPOSALS is "rpn" but no RPN was given: set '
                             'MODEL.REGIONSPOT.RPN_WEIGHTS (see configs/eval_lvis_rpn.yaml)')
        self.rpn = rpn
        self.sam_auto = (SamAutoProposalGenerator(localizer, sam_auto_settings or {})
                         if localizer is not None else None)
        self.selection = dict(topk=topk, score_thresh=score_thresh, nms_thresh=nms_thresh)

    @classmethod
    def from_config(cls, cfg, localizer: nn.Module) -> "RegionProposalGenerator":
        rs = cfg.MODEL.REGIONSPOT
        rpn = None
        if rs.PROPOSALS == "rpn" or rs.RPN_WEIGHTS:
            from .rpn import RPNProposalGenerator

            rpn = RPNProposalGenerator(cfg, rs.RPN_WEIGHTS, rs.RPN_INPUT_FORMAT)
        return cls(rs.PROPOSALS, localizer=localizer,
                   sam_auto_settings=SamAutoProposalGenerator.settings_from_config(cfg), rpn=rpn,
                   topk=rs.PROPOSAL_TOPK, score_thresh=rs.PROPOSAL_SCORE_THRESH,
                   nms_thresh=rs.PROPOSAL_NMS_THRESH)

    def train(self, mode: bool = True):
        """The RPN is frozen: it stays in eval mode."""
        super().train(mode)
        if self.rpn is not None:
            self.rpn.eval()
        return self

    def generate(self, source: str, features: Sequence, reports: Optional[Sequence[FilterReport]] = None
                 ) -> List[Instances]:
        """Proposals computed from the images ("rpn" or "sam_auto"), selected.

        Args:
            source: "rpn" or "sam_auto" (any source this generator can run, whatever ``PROPOSALS`` is).
            features: B :class:`~regionspot.structures.ImageFeatures` (image, SAM
                embedding and its input size).
            reports: optional B filter reports; SAM's own filters and the selection record
                what they removed there.

        Returns:
            B ``Instances`` with ``proposal_boxes`` (XYXY_ABS pixels of the encoded image) and
            ``objectness_logits`` (+ ``proposal_masks`` for "sam_auto").

        Raises:
            ValueError: another source, or "rpn" without RPN weights.
        """
        reports = reports or [None] * len(features)
        if source == "rpn":
            if self.rpn is None:
                raise ValueError('proposals "rpn" need an RPN: build the model with '
                                 'MODEL.REGIONSPOT.RPN_WEIGHTS set (see configs/eval_lvis_rpn.yaml)')
            generated = self.rpn([f.image for f in features])
        elif source == "sam_auto" and self.sam_auto is not None:
            generated = [self.sam_auto(f.image, f.sam_embedding, f.sam_input_size, report=r)
                         for f, r in zip(features, reports)]
        else:
            raise ValueError(f'the model generates proposals only for {GENERATED_SOURCES}, not {source!r}')
        selected = []
        for p, r in zip(generated, reports):
            keep = select_proposals(p.proposal_boxes.tensor, logit_to_score(p.objectness_logits),
                                    **self.selection, report=r)
            selected.append(p[keep])
        return selected

    @stage("proposals")
    def forward(self, batched_inputs: Sequence[Mapping], features: Sequence,
                reports: Optional[Sequence[FilterReport]] = None) -> List[Instances]:
        """The proposals of each image from :attr:`source`.

        Args:
            batched_inputs: B input dicts (see :class:`~regionspot.modeling.meta_arch.RegionSpot`).
            features: their B ``ImageFeatures``.
            reports: optional B filter reports (see :meth:`generate`).

        Returns:
            B ``Instances`` (see :meth:`generate`) on the features' device.

        Raises:
            ValueError: an input lacks the boxes its source needs (named by file name, with the
                ways to pass them).
        """
        if self.source in GENERATED_SOURCES:
            return self.generate(self.source, features, reports)
        key = "instances" if self.source == "gt" else "proposals"
        out = []
        for x in batched_inputs:
            if key not in x:
                what = ("'instances' with gt_boxes (MODEL.REGIONSPOT.PROPOSALS is 'gt': the given boxes are the "
                        "proposals; to recognise your own boxes use RegionSpotPredictor.predict(boxes), or set "
                        "PROPOSALS to 'sam_auto' or 'rpn' to find regions without boxes)"
                        if key == "instances" else
                        "'proposals' (with PROPOSALS 'file' the test loader attaches them from the proposal file)")
                raise ValueError(f"image {x.get('file_name', '?')!r} has no boxes to recognise: "
                                 f"RegionSpot needs {what}")
            out.append(proposals_from_ground_truth(x[key]) if key == "instances" else x[key])
        device = features[0].semantic.device if features else None
        return [p.to(device) for p in out] if device is not None else out
