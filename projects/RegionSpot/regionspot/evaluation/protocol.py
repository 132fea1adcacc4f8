"""The evaluation protocol of a run, as a record stored and printed with every AP table.

RegionSpot's AP depends as much on the protocol as on the model (paper Table 1: the same
model gives 56.6 AP on ground-truth boxes and 23.7 on GLIP's): where the boxes came from,
how the proposal score is fused, how many (box, class) pairs an image keeps, and the
evaluator's cap. :func:`evaluation_protocol` gathers all of it from the config.
"""

import os
from typing import Dict, Optional

from ..proposal_sources import proposal_file_for
from ..structures import RecognitionProtocol

SOURCE_NAMES = {"gt": "ground-truth boxes (score 1)", "file": "file", "rpn": "RPN",
                "sam_auto": "SAM automatic masks"}


def evaluation_protocol(cfg, dataset_name: Optional[str] = None,
                        num_classes: Optional[int] = None) -> Dict[str, object]:
    """The protocol record of an evaluation (JSON-serialisable).

    Returns:
        dict with ``proposals`` (source), ``proposal_file``, ``proposal_topk``,
        ``proposal_score_thresh``, ``proposal_nms_thresh``, the fields of
        :class:`~regionspot.structures.RecognitionProtocol` (``class_score``,
        ``proposal_score_power``, ``selection``, ``topk``, ``nms_thresh``,
        ``tap_class_thresh``, ``max_detections``) and ``description``, one line saying all of it.
    """
    rs = cfg.MODEL.REGIONSPOT
    protocol = RecognitionProtocol.from_config(cfg)
    source = rs.PROPOSALS
    record: Dict[str, object] = {"proposals": source, "proposal_file": None}
    selection = ""
    if source != "gt":
        record.update(proposal_topk=int(rs.PROPOSAL_TOPK), proposal_score_thresh=float(rs.PROPOSAL_SCORE_THRESH),
                      proposal_nms_thresh=float(rs.PROPOSAL_NMS_THRESH))
        selection = f"top {rs.PROPOSAL_TOPK} per image"
        if rs.PROPOSAL_SCORE_THRESH > 0:
            selection = f"score >= {rs.PROPOSAL_SCORE_THRESH:g}, " + selection
        if 0 < rs.PROPOSAL_NMS_THRESH < 1:
            selection = f"NMS {rs.PROPOSAL_NMS_THRESH:g}, " + selection
    if source == "file":
        path = proposal_file_for(cfg, dataset_name) if dataset_name else rs.PROPOSAL_FILE
        record["proposal_file"] = path
        what = f"file {os.path.basename(path)} ({selection})"
    elif source == "rpn":
        what = f"RPN {os.path.basename(rs.RPN_WEIGHTS)} ({selection})"
    elif source == "sam_auto":
        n = rs.SAM_AUTO.POINTS_PER_SIDE
        what = f"SAM automatic masks ({n}x{n} points; {selection})"
    else:
        what = SOURCE_NAMES["gt"]
    record.update(protocol.as_dict())
    record["description"] = f"proposals: {what}; {protocol.describe(num_classes)}"
    return record
