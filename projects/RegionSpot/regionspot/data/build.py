"""The data loaders: training (several datasets mixed, resumable) and test (Detectron2's, with a
detector's proposals attached when configured).

With ``PROPOSALS`` "file" the dataset dicts get the proposal file's boxes as Detectron2's
precomputed-proposal keys (``data/dataset_proposals.py``), and the mapper turns them into
``proposals``; the coverage of the file (images it lacks, ids the dataset lacks) is returned
so the evaluation can report it, and each image's dict carries what the file's selection
removed from its boxes (``proposal_filters``, :mod:`regionspot.filter_report`),
which the model's per-image filter report starts from. Every other source uses Detectron2's
loader unchanged.
"""

import logging
from typing import Optional, Tuple

from detectron2.data import get_detection_dataset_dicts

from ..proposal_sources import proposal_file_for
from .mapper import RegionSpotDatasetMapper

logger = logging.getLogger(__name__)


def build_regionspot_test_loader(cfg, dataset_name: str) -> Tuple[object, Optional[dict]]:
    """Test loader of one dataset, and the coverage report of its proposal file.

    Args:
        cfg: a RegionSpot config.
        dataset_name: a dataset registered in Detectron2's ``DatasetCatalog``.

    Returns:
        (loader, coverage): the loader (:func:`build_batched_test_loader`: ``TEST.IMS_PER_BATCH``
        images per batch, Detectron2's inference sampler) with :class:`RegionSpotDatasetMapper`;
        ``coverage`` is the report of
        :func:`~regionspot.data.dataset_proposals.attach_proposals` with ``PROPOSALS`` "file",
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
    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    if rs.PROPOSALS != "file":
        return build_batched_test_loader(cfg, dicts, mapper), None
    from .dataset_proposals import attach_proposals
    from .proposal_files import read_proposal_file

    path = proposal_file_for(cfg, dataset_name)
    proposals = read_proposal_file(path, rs.PROPOSAL_FILE_FORMAT)
    coverage = attach_proposals(dicts, proposals, score_thresh=rs.PROPOSAL_SCORE_THRESH,
                                nms_thresh=rs.PROPOSAL_NMS_THRESH, topk=rs.PROPOSAL_TOPK)
    return build_batched_test_loader(cfg, dicts, mapper), coverage


def inference_batch_size(cfg) -> int:
    """Images per test batch: ``TEST.IMS_PER_BATCH``, or for 0, 16 on CUDA and 1 on the CPU."""
    if cfg.TEST.IMS_PER_BATCH > 0:
        return int(cfg.TEST.IMS_PER_BATCH)
    return 16 if str(cfg.MODEL.DEVICE).startswith("cuda") else 1


def build_batched_test_loader(cfg, dicts, mapper):
    """A test loader of :func:`inference_batch_size` images per batch.

    Detectron2's ``InferenceSampler`` (each process its contiguous share, every image once,
    in order), ``DATALOADER.NUM_WORKERS`` workers that read, resize and map the images (the
    mapper also makes SAM's and CLIP's resizes there), and pinned host memory when the model
    runs on CUDA, so the model's copies to the GPU are asynchronous (``non_blocking``).

    Args:
        cfg: a RegionSpot config (``MODEL.DEVICE`` resolved).
        dicts: the dataset dicts (Detectron2 standard format).
        mapper: a callable dict -> model input.

    Returns:
        ``torch.utils.data.DataLoader`` yielding lists of at most :func:`inference_batch_size` inputs.
    """
    import torch
    from detectron2.data.build import trivial_batch_collator
    from detectron2.data.common import DatasetFromList, MapDataset
    from detectron2.data.samplers import InferenceSampler

    dataset = MapDataset(DatasetFromList(list(dicts), copy=False), mapper)
    batches = torch.utils.data.BatchSampler(InferenceSampler(len(dataset)), inference_batch_size(cfg), drop_last=False)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.DATALOADER.NUM_WORKERS,
                                       collate_fn=trivial_batch_collator,
                                       pin_memory=str(cfg.MODEL.DEVICE).startswith("cuda"))


def build_regionspot_train_loader(cfg, mapper=None):
    """The training loader: every ``DATASETS.TRAIN`` dataset, mixed by ``DATALOADER.DATASET_RATIO``,
    in a deterministic, resumable order (:class:`~regionspot.data.samplers.ResumableBatchSampler`).

    Each dataset dict gets ``"dataset"`` (its dataset's name) so that the model scores it against
    that dataset's vocabulary. With ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``, images without a
    non-crowd box are left out (counted in the log). Detectron2's per-class histogram is not
    computed (minutes for V3Det's 13k classes).

    Returns:
        ``torch.utils.data.DataLoader`` yielding lists of ``SOLVER.IMS_PER_BATCH / world size``
        mapped dicts; its ``batch_sampler`` is the :class:`ResumableBatchSampler` (call its
        ``set_start_iter`` when resuming).

    Raises:
        ValueError: no training dataset, an empty one, or a batch that does not split evenly
            over the processes.
    """
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
    from detectron2.data.common import DatasetFromList, MapDataset
    from detectron2.utils import comm

    from .samplers import ResumableBatchSampler

    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("DATASETS.TRAIN is empty: name the datasets to train on")
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by the number of "
                         f"processes ({world})")
    all_dicts, sizes = [], []
    for name in names:
        dicts = DatasetCatalog.get(name)
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            kept = [d for d in dicts if any(a.get("iscrowd", 0) == 0 for a in d.get("annotations", []))]
            if len(kept) < len(dicts):
                logger.info("%s: %d of %d images have no box and are left out of training", name,
                            len(dicts) - len(kept), len(dicts))
            dicts = kept
        if not dicts:
            raise ValueError(f"training dataset {name!r} has no image with a box")
        for d in dicts:
            d["dataset"] = name
        all_dicts.extend(dicts)
        sizes.append(len(dicts))
    ratios = list(cfg.DATALOADER.DATASET_RATIO) or None
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    sampler = ResumableBatchSampler(sizes, ratios, batch_per_rank=cfg.SOLVER.IMS_PER_BATCH // world,
                                    rank=comm.get_rank(), world_size=world, seed=seed)
    logger.info("Training on %s: %s images, sampling ratios %s, seed %d", names, sizes, ratios or "by size", seed)
    dataset = MapDataset(DatasetFromList(all_dicts, copy=False), mapper or RegionSpotDatasetMapper(cfg, True))
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.DATALOADER.NUM_WORKERS,
                                       collate_fn=trivial_batch_collator, worker_init_fn=worker_init_reset_seed)
