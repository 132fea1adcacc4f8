"""Where the boxes to recognise come from: four proposal sources, one representation.

RegionSpot recognises boxes that something else proposes (paper Sec. 4, Table 1). Every
source hands the model Detectron2 proposals: an ``Instances`` per image with

- ``proposal_boxes``: ``Boxes``, (N, 4) float32 XYXY_ABS pixels of the image the model sees
  (the mapper's resized image);
- ``objectness_logits``: (N,) float32, the proposal score as a logit. ``sigmoid`` of it is
  the proposal score in [0, 1] that inference fuses with the class probability
  (``score = proposal_score ** PROPOSAL_SCORE_POWER * class probability``). A score of
  exactly 1 (ground truth) is stored as ``+inf``, 0 as ``-inf``;
- optionally ``proposal_masks``: (N, H, W) bool masks that come with the proposals
  (``sam_auto``), used as the mask output instead of SAM's box-prompted masks.

Sources (``MODEL.REGIONSPOT.PROPOSALS``), one module each:

- ``gt`` (:mod:`.gt`): the dataset's ground-truth boxes, score 1 (the paper's main protocol);
- ``file`` (:mod:`regionspot.data.proposal_files`, read by the data loader): a detector's
  results on disk (GLIP layout, COCO results list or Detectron2's proposal pickle), attached
  to the dataset dicts as Detectron2's precomputed-proposal keys and turned into
  ``proposals`` by the mapper;
- ``rpn`` (:mod:`.rpn`): Detectron2's RPN with its own weights, in the same forward;
- ``sam_auto`` (:mod:`.sam_auto`): SAM's automatic mask generator ("recognise everything").

Every step that drops proposals (SAM's own filters, :func:`select_proposals`) can record what
it removed, and the key that controls it, in the image's filter report (:mod:`regionspot.filter_report`).
The selection and the score conventions live in :mod:`regionspot.proposal_sources`, shared
with the data loader; they are re-exported here.
"""

from ...proposal_sources import (  # noqa: F401
    PROPOSAL_SOURCES,
    check_proposal_source,
    logit_to_score,
    score_to_logit,
    select_proposals,
)

__all__ = ["PROPOSAL_SOURCES", "score_to_logit", "logit_to_score", "select_proposals",
           "check_proposal_source"]
