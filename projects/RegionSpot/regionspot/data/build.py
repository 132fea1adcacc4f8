"""The test data loader: Detectron2's, with a detector's proposals attached when configured.

With ``PROPOSALS`` "file" the dataset dicts get the proposal file's boxes as Detectron2's
precomputed-proposal keys (``modeling/proposals/file.py``), and the mapper turns them into
``proposals``; the coverage of the file (images it lacks, ids the dataset lacks) is returned
so the evaluation can report it. Every other source uses Detectron2's loader unchanged.
"""

import logging
from typing import Optional, Tuple

from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts

from ..evaluation.protocol import proposal_file_for
from .mapper import RegionSpotDatasetMapper

logger = logging.getLogger(__name__)


def build_regionspot_test_loader(cfg, dataset_name: str) -> Tuple[object, Optional[dict]]:
    """Test loader of one dataset, and the coverage report of its proposal file.

    Args:
        cfg: a RegionSpot config.
        dataset_name: a dataset registered in Detectron2's ``DatasetCatalog``.

    Returns:
        (loader, coverage): Detectron2's test loader (batch 1, inference sampler) with
        :class:`RegionSpotDatasetMapper`; ``coverage`` is the report of
        :func:`~regionspot.modeling.proposals.file.attach_proposals` with ``PROPOSALS`` "file",
        else None.

    Raises:
        ValueError: ``MODEL.LOAD_PROPOSALS`` set (RegionSpot selects precomputed proposals with
            ``MODEL.REGIONSPOT.PROPOSALS "file"``); no proposal file configured.
        ProposalFileError: the file is malformed or matches no image of the dataset.
    """
    rs = cfg.MODEL.REGIONSPOT
    if cfg.MODEL.LOAD_PROPOSALS:
        raise ValueError('MODEL.LOAD_PROPOSALS is set: RegionSpot reads precomputed proposals with '
                         'MODEL.REGIONSPOT.PROPOSALS "file" and MODEL.REGIONSPOT.PROPOSAL_FILE (or '
                         'DATASETS.PROPOSAL_FILES_TEST); leave MODEL.LOAD_PROPOSALS False')
    mapper = RegionSpotDatasetMapper(cfg, False)
    if rs.PROPOSALS != "file":
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper), None
    from ..modeling.proposals.file import attach_proposals, read_proposal_file

    path = proposal_file_for(cfg, dataset_name)
    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    proposals = read_proposal_file(path, rs.PROPOSAL_FILE_FORMAT)
    coverage = attach_proposals(dicts, proposals, score_thresh=rs.PROPOSAL_SCORE_THRESH,
                                nms_thresh=rs.PROPOSAL_NMS_THRESH, topk=rs.PROPOSAL_TOPK)
    loader = build_detection_test_loader(dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)
    return loader, coverage
