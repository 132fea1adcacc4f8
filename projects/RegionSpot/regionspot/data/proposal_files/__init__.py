"""Proposal source ``file``: a detector's boxes stored on disk, read by the data loader.

Reads, validates, converts and attaches boxes that some detector wrote to a file, so that
RegionSpot recognises them (paper Sec. 4: boxes from GLIP, or from any other detector).

Three formats are understood; in all of them boxes are in pixels of the ORIGINAL image (the
image as the dataset stores it, before any resizing by the mapper):

``"glip"``
    The layout of the GLIP-box file released with the released RegionSpot code: one JSON
    object ``{str(image_id): {"boxes": [[x0, y0, x1, y1], ...], "scores": [...],
    "labels": [...]}}``. Boxes are XYXY, scores are probabilities in [0, 1], ``labels``
    (optional) are the detector's class ids.
``"coco"``
    The COCO results list that detectors' evaluators write (Detectron2's
    ``coco_instances_results.json``, mmdetection's ``*.bbox.json``...): a JSON list of
    ``{"image_id": int, "bbox": [x, y, w, h], "score": float, "category_id": int}``. Boxes
    are XYWH, scores probabilities in [0, 1], ``category_id`` optional; other keys
    (``segmentation``...) are ignored.
``"detectron2"``
    Detectron2's precomputed-proposal pickle (what ``detectron2.data.build
    .load_proposals_into_dataset`` reads): a dict with ``"ids"`` (image ids), ``"boxes"``
    (list of (N_i, 4) float arrays), ``"objectness_logits"`` (list of (N_i,) float arrays,
    LOGITS: score = sigmoid(logit), so +-inf are allowed) and optional ``"bbox_mode"`` (a
    ``BoxMode`` value; XYXY_ABS by default; XYXY_ABS and XYWH_ABS are accepted). The legacy
    Detectron (v1) names ``"indexes"`` (= ids) and ``"scores"`` (= objectness_logits) are
    renamed as Detectron2 renames them. The file has no class labels.

Reading gives a :class:`ProposalSet` (per image: XYXY_ABS float32 boxes, scores in [0, 1],
int64 labels). :func:`attach_proposals` puts one image's boxes into its Detectron2 dataset dict
under Detectron2's precomputed-proposal keys, which the mapper turns into
``dataset_dict["proposals"]`` with ``detectron2.data.detection_utils.transform_proposals``.

Every problem with a file's content raises :class:`ProposalFileError`, whose message names the
file and, where it applies, the image id, the box index and the offending value.

Pickles can run code when loaded; the detectron2 format is read with an unpickler that only
builds lists, dicts, numpy arrays and Detectron2's ``BoxMode``, and refuses anything else.

One module per job; the package re-exports the public names:

- :mod:`.proposal_set`: :class:`ProposalSet` (the one representation), the format names,
  :class:`ProposalFileError`;
- :mod:`.loading`: the file's kind and format (:func:`detect_format`), a pickle read without
  running code, :func:`read_proposal_file`;
- :mod:`.parsing`: one parser per format, every value checked;
- :mod:`.writing`: :func:`write_proposal_file`.

Attaching a file's boxes to dataset dicts is dataset-dict work:
:func:`regionspot.data.dataset_proposals.attach_proposals` (re-exported here).
"""

from ..dataset_proposals import attach_proposals
from .loading import detect_format, read_proposal_file
from .proposal_set import BOX_TOLERANCE_FRACTION, PROPOSAL_FILE_FORMATS, ProposalFileError, ProposalSet
from .writing import write_proposal_file

__all__ = ["PROPOSAL_FILE_FORMATS", "BOX_TOLERANCE_FRACTION", "ProposalFileError", "ProposalSet",
           "detect_format", "read_proposal_file", "write_proposal_file", "attach_proposals"]
