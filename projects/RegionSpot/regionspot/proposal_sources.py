"""Proposal sources: their names, the file of the ``file`` source, and the one proposal selection.

Every proposal source hands the model Detectron2 proposals whose ``objectness_logits`` are
the proposal score as a logit (:func:`score_to_logit`, :func:`logit_to_score`); the same
selection (:func:`select_proposals`: score threshold, class-agnostic NMS, top-k) applies to
a proposal file's boxes (in the data loader, ``regionspot/data/dataset_proposals.py``) and to the
boxes the model generates (``rpn``, ``sam_auto``, in ``regionspot/modeling/proposals``).
:func:`check_proposal_source` validates ``MODEL.REGIONSPOT.PROPOSALS``; :func:`proposal_file_for`
names the file of the ``file`` source for a test dataset (the test loader reads it, the
evaluation protocol records it).

This module imports neither ``regionspot.modeling`` nor ``regionspot.data``.
"""

from typing import Optional

import numpy as np
import torch

PROPOSAL_SOURCES = ("gt", "file", "rpn", "sam_auto")


def score_to_logit(scores):
    """Proposal scores in [0, 1] -> logits (``objectness_logits``); 1 -> +inf, 0 -> -inf.

    Args:
        scores: float tensor or numpy array of probabilities, any shape.

    Returns:
        The same type and shape, float32.
    """
    if torch.is_tensor(scores):
        return torch.logit(scores.float())
    p = np.asarray(scores, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return (np.log(p) - np.log1p(-p)).astype(np.float32)


def logit_to_score(logits):
    """``objectness_logits`` -> proposal scores in [0, 1] (the sigmoid; +inf -> 1 exactly).

    Args:
        logits: float tensor or numpy array, any shape.

    Returns:
        The same type and shape, float32.
    """
    if torch.is_tensor(logits):
        return torch.sigmoid(logits.float())
    x = np.asarray(logits, dtype=np.float64)
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def select_proposals(boxes: torch.Tensor, scores: torch.Tensor, *, topk: Optional[int] = None,
                     score_thresh: float = 0.0, nms_thresh: float = 0.0, report=None) -> torch.Tensor:
    """Indices of the proposals to keep, best first: score threshold, class-agnostic NMS, top-k.

    The same selection applies to every predicted source (a file's boxes, the RPN's, SAM's
    automatic masks); ground-truth boxes are never filtered.

    Args:
        boxes: (N, 4) float XYXY boxes (any frame; NMS only compares them with each other).
        scores: (N,) float proposal scores in [0, 1].
        topk: keep at most this many (None or <= 0: no cap).
        score_thresh: drop proposals whose score is below it (0: keep all).
        nms_thresh: class-agnostic NMS IoU threshold; 0 (or >= 1) disables NMS.
        report: optional :class:`~regionspot.filter_report.FilterReport` of the
            image: each step that is on records how many boxes it removed, with its key
            (``MODEL.REGIONSPOT.PROPOSAL_SCORE_THRESH``, ``PROPOSAL_NMS_THRESH``,
            ``PROPOSAL_TOPK``).

    Returns:
        (K,) int64 indices into ``boxes``, sorted by decreasing score (stable for ties).
    """
    from torchvision.ops import nms

    def record(stage, key, setting, before, advice):
        if report is not None:
            report.add(f"proposals: {stage}", f"MODEL.REGIONSPOT.{key}", setting, "boxes", before,
                       order.numel(), advice)

    order = torch.argsort(scores, descending=True, stable=True)
    if score_thresh > 0:
        before = order.numel()
        order = order[scores[order] >= score_thresh]
        record("score threshold", "PROPOSAL_SCORE_THRESH", float(score_thresh), before, "lower it")
    if 0 < nms_thresh < 1:
        before = order.numel()
        if before > 1:
            kept = nms(boxes[order].float(), scores[order].float(), nms_thresh)
            order = order[kept.sort().values]  # nms returns by decreasing score; keep our stable order
        record("NMS", "PROPOSAL_NMS_THRESH", float(nms_thresh), before, "raise it (0 turns NMS off)")
    if topk is not None and topk > 0:
        before = order.numel()
        order = order[:topk]
        record("top-k", "PROPOSAL_TOPK", int(topk), before, "raise it")
    return order


def check_proposal_source(source: str) -> str:
    """Return ``source`` if it names a proposal source, else raise a ValueError naming the key."""
    if source not in PROPOSAL_SOURCES:
        raise ValueError(f"MODEL.REGIONSPOT.PROPOSALS must be one of {PROPOSAL_SOURCES}, got {source!r}")
    return source


def proposal_file_for(cfg, dataset_name: str) -> str:
    """The proposal file of one test dataset with ``PROPOSALS`` "file".

    ``DATASETS.PROPOSAL_FILES_TEST`` (Detectron2's key, one file per test dataset) when set,
    else ``MODEL.REGIONSPOT.PROPOSAL_FILE`` (one test dataset).

    Raises:
        ValueError: no file configured, or counts that do not match ``DATASETS.TEST``.
    """
    tests = list(cfg.DATASETS.TEST)
    files = list(cfg.DATASETS.PROPOSAL_FILES_TEST)
    if files:
        if len(files) != len(tests):
            raise ValueError(f"DATASETS.PROPOSAL_FILES_TEST has {len(files)} files for {len(tests)} datasets in "
                             f"DATASETS.TEST {tests}: give one file per dataset")
        return files[tests.index(dataset_name)]
    path = cfg.MODEL.REGIONSPOT.PROPOSAL_FILE
    if not path:
        raise ValueError('MODEL.REGIONSPOT.PROPOSALS is "file" but no file is set: give '
                         'MODEL.REGIONSPOT.PROPOSAL_FILE (or DATASETS.PROPOSAL_FILES_TEST, one per test dataset)')
    if len(tests) > 1:
        raise ValueError(f"MODEL.REGIONSPOT.PROPOSAL_FILE names one file but DATASETS.TEST has {len(tests)} "
                         f"datasets {tests}: list one file per dataset in DATASETS.PROPOSAL_FILES_TEST")
    return path


__all__ = ["PROPOSAL_SOURCES", "score_to_logit", "logit_to_score", "select_proposals",
           "check_proposal_source", "proposal_file_for"]
