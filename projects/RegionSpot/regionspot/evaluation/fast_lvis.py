"""LVIS AP with the ``faster-coco-eval`` package (C++ matching and accumulation), equal to the
LVIS API's numbers.

The reference is the LVIS API (``lvis.LVISResults`` + ``lvis.LVISEval``) as Detectron2's
``_evaluate_predictions_on_lvis`` runs it: the protocol of the LVIS paper (Gupta et al., CVPR
2019), i.e. federated evaluation with at most 300 detections per image, IoU thresholds
0.50:0.05:0.95, 101 recall points, area ranges all / small (< 32^2) / medium / large (> 96^2)
and category groups rare / common / frequent. On the LVIS v1 val size (~20k images, 1203
categories, 300 detections per image) that pure-Python evaluation takes many minutes.
:func:`evaluate_predictions_on_lvis_fast` computes the same AP, AP50, AP75, APs, APm, APl,
APr, APc, APf (percent) with ``faster_coco_eval.COCOeval_faster(..., lvis_style=True)``.

What the LVIS API does, and how it is reproduced here (``lvis`` 0.5.3):

1. ``LVISResults`` keeps the ``max_dets_per_image`` (300) highest-scoring detections of each
   image: a stable sort by score, so among equal scores the earlier result wins
   (:func:`limit_dets_per_image`, applied FIRST, before anything else looks at the results).
   Its output is grouped by image (images in order of their first result) -- the order the
   API later breaks score ties in.
2. ``LVISEval`` looks only at annotations and results with ``0 < area < inf`` (its
   ``get_ann_ids`` filter): a result whose box has zero width/height (``area = w * h``) or an
   empty mask (mask area) is dropped, after the cap. Ground truth with area 0 is dropped too.
3. A result counts only in the categories the image is labelled for: its category is present
   in the image's (kept) ground truth or is in the image's ``neg_category_ids``; other
   results are dropped. An unmatched result of a category in the image's
   ``not_exhaustive_category_ids`` is ignored (not a false positive). faster-coco-eval's
   ``lvis_style=True`` implements both rules (``lvis_mark``); this module also applies the
   first one before calling it, as a vectorised pre-filter, so that only relevant results are
   handed over (faster-coco-eval then drops nothing more).
4. Matching, the precision/recall curves and the averages (101-point interpolated precision,
   mean over the entries that are not -1, per frequency group for APr/APc/APf) are
   faster-coco-eval's C++ with ``params.maxDets = [max_dets_per_image]`` (a no-op cap per
   image and category, as every image already holds at most that many results), and its
   ``summarize`` with ``lvis_style=True``.

Every category's AP depends only on that category's results and ground truth, and an image
without either contributes nothing to it; so the categories are evaluated in chunks, each
over only the images that hold a ground truth or a result of the chunk's categories (in
increasing id order, the order both APIs concatenate images in, so score ties across images
break the same way). This keeps memory bounded and avoids the images x 1203 categories grid
of per-pair bookkeeping. The chunks' precision/recall arrays are put together and summarised
once by faster-coco-eval.

Known difference, checked for and refused: a ground-truth annotation with a true ``ignore``
flag (LVIS: an ignored region that is still matched one-to-one) or ``iscrowd`` flag (the LVIS
API ignores ``iscrowd``; faster-coco-eval would treat it as a COCO crowd region) cannot be
expressed to faster-coco-eval; LVIS v1 has neither. Annotation id 0 is a "no match" marker in
both implementations alike.
"""

import gc
import logging
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "EVALUATOR_BACKENDS",
    "LVIS_METRICS",
    "LVISFormatError",
    "check_evaluator_backend",
    "check_lvis_format",
    "limit_dets_per_image",
    "evaluate_predictions_on_lvis_fast",
]

#: Values of ``TEST.EVALUATOR_BACKEND``: "lvis" (the LVIS API through Detectron2, the
#: reference) and "faster_coco_eval" (this module).
EVALUATOR_BACKENDS = ("lvis", "faster_coco_eval")

#: The metrics (percent) Detectron2's ``_evaluate_predictions_on_lvis`` returns, in its order.
LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")

# faster-coco-eval's ``stats_as_dict`` label of each metric.
_STATS_LABELS = {
    "AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small", "APm": "AP_medium",
    "APl": "AP_large", "APr": "APr", "APc": "APc", "APf": "APf",
}

_FREQUENCIES = ("r", "c", "f")

# Per chunk of categories: at most this many (image, category) cells in faster-coco-eval's
# grid (a chunk's images x its categories; per cell it keeps Python bookkeeping and ~0.7 kB of
# C++ results). 300 to 30,000 all take 24-28 s on the LVIS-val-sized synthetic set (2 cores).
DEFAULT_MAX_CELLS_PER_CHUNK = 3_000


class LVISFormatError(ValueError):
    """The dataset is not in LVIS format (the fast backend needs LVIS's category frequencies
    and per-image negative / not-exhaustive category lists)."""


def check_evaluator_backend(backend: str) -> str:
    """Return ``backend`` if it is a known ``TEST.EVALUATOR_BACKEND`` value.

    Raises:
        ValueError: an unknown value; the message names ``TEST.EVALUATOR_BACKEND``.
    """
    if backend not in EVALUATOR_BACKENDS:
        raise ValueError(f"TEST.EVALUATOR_BACKEND must be one of {EVALUATOR_BACKENDS}, got {backend!r}")
    return backend


def check_lvis_format(dataset: dict, name: str = "the dataset") -> None:
    """Check that an annotation dict is LVIS-format as far as the evaluation needs it.

    The LVIS API reads, and the fast backend therefore needs: every category's
    ``frequency`` ("r", "c" or "f", for APr/APc/APf) and every image's ``neg_category_ids``
    and ``not_exhaustive_category_ids`` (federated evaluation), plus ``height``/``width``.

    Raises:
        LVISFormatError: something is missing; the message says what and where.
    """
    categories = dataset.get("categories") or []
    if not categories:
        raise LVISFormatError(f"{name} has no categories; the faster_coco_eval LVIS backend needs an "
                              f"LVIS-format dataset")
    for cat in categories:
        if cat.get("frequency") not in _FREQUENCIES:
            raise LVISFormatError(
                f"{name} is not LVIS-format: category {cat.get('id')!r} ({cat.get('name', '?')!r}) has frequency "
                f"{cat.get('frequency')!r}, expected one of {_FREQUENCIES}; the faster_coco_eval LVIS backend "
                f"(TEST.EVALUATOR_BACKEND) needs LVIS's category frequencies for APr/APc/APf (use a COCO evaluator "
                f"for COCO-format data)")
    for img in dataset.get("images", []):
        for key in ("neg_category_ids", "not_exhaustive_category_ids", "height", "width"):
            if key not in img:
                raise LVISFormatError(f"{name} is not LVIS-format: image {img.get('id')!r} has no {key!r} (the "
                                      f"LVIS API's federated evaluation needs it)")


def limit_dets_per_image(image_ids: Sequence, scores: Sequence, max_dets: int) -> np.ndarray:
    """Which results ``lvis.LVISResults`` keeps, in the order it keeps them.

    The LVIS API's rule (``LVISResults.limit_dets_per_image``): results are grouped by image,
    images in the order of their first result; an image with more than ``max_dets`` results
    keeps its ``max_dets`` highest-scoring ones, sorted by decreasing score with a stable sort
    (equal scores keep their input order); an image with at most ``max_dets`` keeps all of
    them in input order. ``max_dets < 0`` keeps everything, in input order (no grouping).

    Args:
        image_ids: (N,) image id of each result.
        scores: (N,) score of each result.
        max_dets: the cap (LVIS: 300).

    Returns:
        int64 indices into the N results, in LVISResults' order.
    """
    image_ids = np.asarray(image_ids)
    scores = np.asarray(scores, dtype=np.float64)
    n = len(image_ids)
    if max_dets < 0 or n == 0:
        return np.arange(n, dtype=np.int64)
    _, first, inverse, counts = np.unique(image_ids, return_index=True, return_inverse=True, return_counts=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group = rank[inverse]
    over = counts[inverse] > max_dets
    # primary key: image group; then -score for capped images only; then input position
    order = np.lexsort((np.arange(n), np.where(over, -scores, 0.0), group))
    if not over.any():
        return order
    sorted_group = group[order]
    starts = np.searchsorted(sorted_group, np.arange(len(first)))
    position = np.arange(n) - starts[sorted_group]
    keep = ~over[order] | (position < max_dets)
    return order[keep]


def _noop(*args, **kwargs):
    pass


def _small_table(results: Dict[str, float]) -> str:
    try:
        from detectron2.utils.logger import create_small_table
    except ImportError:  # pragma: no cover - detectron2 is a dependency
        return "  ".join(f"{k}: {v:.3f}" for k, v in results.items())
    return create_small_table(results)


class _GroundTruth:
    """The parts of an LVIS annotation dict the evaluation reads, as arrays (see the module
    docstring for the LVIS API rules applied here)."""

    def __init__(self, dataset: dict, iou_type: str):
        check_lvis_format(dataset)
        self.categories = sorted(dataset["categories"], key=lambda c: c["id"])
        self.cat_ids = np.array([int(c["id"]) for c in self.categories], dtype=np.int64)
        images = sorted(dataset["images"], key=lambda i: int(i["id"]))
        self.img_ids = np.array([int(i["id"]) for i in images], dtype=np.int64)
        if len(np.unique(self.img_ids)) != len(self.img_ids) or len(np.unique(self.cat_ids)) != len(self.cat_ids):
            raise LVISFormatError("the dataset has duplicate image or category ids")
        # the image fields faster-coco-eval reads (sizes for masks; LVIS's category lists)
        self.images = [{"id": int(i["id"]), "height": int(i["height"]), "width": int(i["width"]),
                        "neg_category_ids": [int(c) for c in i["neg_category_ids"]],
                        "not_exhaustive_category_ids": [int(c) for c in i["not_exhaustive_category_ids"]]}
                       for i in images]
        self.num_cats = len(self.cat_ids)

        anns = dataset.get("annotations", [])
        key = "bbox" if iou_type == "bbox" else "segmentation"
        img_idx, img_ok = self.image_index(np.fromiter((a["image_id"] for a in anns), np.int64, len(anns)))
        cat_idx, cat_ok = self.category_index(np.fromiter((a["category_id"] for a in anns), np.int64, len(anns)))
        area = np.fromiter((a["area"] for a in anns), np.float64, len(anns))
        # LVISEval's get_ann_ids(img_ids, cat_ids): images and categories of the dataset, 0 < area < inf
        keep = np.flatnonzero(img_ok & cat_ok & (area > 0) & (area < np.inf))
        for i in keep.tolist():
            ann = anns[i]
            if key not in ann:
                raise LVISFormatError(f"ground-truth annotation {ann.get('id')!r} has no {key!r} "
                                      f"({iou_type} AP needs it)")
            if ann.get("ignore") or ann.get("iscrowd"):
                raise ValueError(
                    f"ground-truth annotation {ann.get('id')!r} has an 'ignore' or 'iscrowd' flag: the LVIS API "
                    f"honours 'ignore' (and disregards 'iscrowd') in a way faster-coco-eval cannot express; "
                    f"evaluate this dataset with TEST.EVALUATOR_BACKEND lvis")
        self.anns = [anns[i] for i in keep]
        self.ann_img = img_idx[keep]
        self.ann_cat = cat_idx[keep]
        self.key = key
        # (image, category) cells that are labelled: present in the kept ground truth, or negative
        positive = self.ann_img * self.num_cats + self.ann_cat
        neg_codes = []
        cat_lookup = {int(c): k for k, c in enumerate(self.cat_ids)}
        for k, img in enumerate(self.images):
            neg_codes.extend(k * self.num_cats + cat_lookup[c] for c in img["neg_category_ids"] if c in cat_lookup)
        self.labelled = np.unique(np.concatenate([positive, np.array(neg_codes, dtype=np.int64)]))

    def image_index(self, ids: np.ndarray):
        """Index of each image id in the sorted image ids, and whether it is there."""
        return _lookup(self.img_ids, ids)

    def category_index(self, ids: np.ndarray):
        """Index of each category id in the sorted category ids, and whether it is there."""
        return _lookup(self.cat_ids, ids)


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray):
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return idx, sorted_ids[idx] == ids


def _chunk_categories(gt_cells: np.ndarray, dt_cells: np.ndarray, num_cats: int, max_cells: int) -> List[tuple]:
    """Group category indices (in increasing order) so that each group's
    (images with a gt or result of the group) x (group size) stays under ``max_cells``.

    Args:
        gt_cells, dt_cells: codes ``image_index * num_cats + category_index``.

    Returns:
        a list of (category indices, sorted image indices) with at least one image each.
    """
    cells = np.unique(np.concatenate([gt_cells, dt_cells]))
    cat = cells % num_cats
    img = cells // num_cats
    order = np.lexsort((img, cat))
    cat, img = cat[order], img[order]
    bounds = np.searchsorted(cat, np.arange(num_cats + 1))
    chunks, current, current_imgs = [], [], set()
    for c in range(num_cats):
        images = img[bounds[c]:bounds[c + 1]]
        if len(images) == 0:
            continue
        union = current_imgs.union(images.tolist())
        if current and len(union) * (len(current) + 1) > max_cells:
            chunks.append((current, current_imgs))
            current, union = [], set(images.tolist())
        current = current + [c]
        current_imgs = union
    if current:
        chunks.append((current, current_imgs))
    return [(np.array(cats, dtype=np.int64), np.array(sorted(imgs), dtype=np.int64)) for cats, imgs in chunks]


def evaluate_predictions_on_lvis_fast(
    lvis_gt,
    lvis_results: List[dict],
    iou_type: str,
    max_dets_per_image: Optional[int] = None,
    class_names=None,
    *,
    max_cells_per_chunk: int = DEFAULT_MAX_CELLS_PER_CHUNK,
) -> Dict[str, float]:
    """LVIS AP of COCO-style results, computed with faster-coco-eval; the same numbers as the
    LVIS API (``LVISResults`` with ``max_dets_per_image``, then ``LVISEval``) -- a drop-in for
    Detectron2's ``lvis_evaluation._evaluate_predictions_on_lvis``.

    Args:
        lvis_gt: an ``lvis.LVIS`` object (its ``dataset``) or an LVIS-format annotation dict.
        lvis_results: result dicts with ``image_id``, ``category_id`` (dataset ids),
            ``score`` and ``bbox`` ([x, y, w, h], for "bbox") or ``segmentation`` (compressed
            RLE, for "segm"; a ``bbox`` there is not used, as Detectron2 drops it so that
            mask AP uses mask areas). Not modified.
        iou_type: "bbox" or "segm".
        max_dets_per_image: LVIS's cap on results per image (None: 300, LVIS's value),
            applied first, as ``LVISResults`` does (:func:`limit_dets_per_image`).
        class_names: unused (accepted for the reference function's signature).
        max_cells_per_chunk: memory/speed knob of the category chunking (results do not
            depend on it).

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"}: percent, as the
        reference (-100 where the LVIS API gives -1, e.g. no category of a frequency group
        has ground truth; NaN for every metric when there are no results).

    Raises:
        LVISFormatError: the ground truth is not LVIS-format (no frequencies, no negative
            category lists).
        ValueError: an unknown ``iou_type``; a result whose image is not in the dataset (the
            LVIS API asserts the same); ground truth with ``ignore``/``iscrowd`` flags.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    metrics = list(LVIS_METRICS)
    if len(lvis_results) == 0:
        logger.warning("No predictions from the model!")
        return {m: float("nan") for m in metrics}
    if max_dets_per_image is None:
        max_dets_per_image = 300
    # millions of short-lived dicts: the cyclic garbage collector would rescan them again and again
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _evaluate(lvis_gt, lvis_results, iou_type, max_dets_per_image, max_cells_per_chunk)
    finally:
        if gc_was_enabled:
            gc.enable()


def _evaluate(lvis_gt, lvis_results, iou_type, max_dets_per_image, max_cells_per_chunk):
    from faster_coco_eval import COCO, COCOeval_faster
    from faster_coco_eval import __version__ as fce_version

    metrics = list(LVIS_METRICS)
    tic = time.perf_counter()
    dataset = getattr(lvis_gt, "dataset", lvis_gt)
    gt = _GroundTruth(dataset, iou_type)
    key = gt.key
    logger.info(f"Evaluating {iou_type} with the faster_coco_eval backend (faster-coco-eval {fce_version}, LVIS "
                f"mode), max detections per image = {max_dets_per_image}")

    # 1. LVISResults' cap, first
    n = len(lvis_results)
    res_img = np.fromiter((r["image_id"] for r in lvis_results), np.int64, n)
    res_score = np.fromiter((r["score"] for r in lvis_results), np.float64, n)
    kept = limit_dets_per_image(res_img, res_score, max_dets_per_image)
    if len(kept) == 0:
        logger.warning("No predictions left after the per-image cap!")
        return {m: float("nan") for m in metrics}
    img_idx, img_ok = gt.image_index(res_img[kept])
    if not img_ok.all():
        bad = res_img[kept][~img_ok][0]
        raise ValueError(f"result for image {int(bad)}, which is not in the dataset (the LVIS API refuses this "
                         f"too: 'Results do not correspond to current LVIS set')")
    cat_idx, cat_ok = gt.category_index(
        np.fromiter((lvis_results[i]["category_id"] for i in kept), np.int64, len(kept)))
    # 2. areas as LVISResults computes them, and LVISEval's 0 < area < inf filter
    try:
        if key == "bbox":
            area = np.fromiter((lvis_results[i]["bbox"][2] * lvis_results[i]["bbox"][3] for i in kept),
                               np.float64, len(kept))
        else:
            import pycocotools.mask as mask_util

            # one RLE at a time, as LVISResults does (pycocotools' list form overflows at 256 masks)
            area = np.fromiter((mask_util.area(lvis_results[i]["segmentation"]) for i in kept), np.float64,
                               len(kept))
    except KeyError:
        raise ValueError(f"{iou_type} evaluation needs {key!r} in every result") from None
    cells = img_idx * gt.num_cats + cat_idx
    # 3. the federated rule: only categories present in, or negative for, the image
    relevant = cat_ok & (area > 0) & (area < np.inf) & np.isin(cells, gt.labelled)
    sel = np.flatnonzero(relevant)
    dt_src, dt_area, dt_cells = kept[sel], area[sel], cells[sel]
    if max_dets_per_image >= 0:
        max_dets = max_dets_per_image
    else:  # no per-image cap (LVISResults with max_dets < 0): faster-coco-eval must cap nothing
        max_dets = int(np.unique(dt_cells, return_counts=True)[1].max()) if len(dt_cells) else 1
    gt_cells = gt.ann_img * gt.num_cats + gt.ann_cat

    # 4. faster-coco-eval, by chunks of categories
    num_t, num_r, num_a = 10, 101, 4
    precision = -np.ones((num_t, num_r, gt.num_cats, num_a, 1))
    recall = -np.ones((num_t, gt.num_cats, num_a, 1))
    chunks = _chunk_categories(gt_cells, dt_cells, gt.num_cats, max_cells_per_chunk)
    chunk_of_cat = np.full(gt.num_cats, -1, dtype=np.int64)
    for k, (cats, _) in enumerate(chunks):
        chunk_of_cat[cats] = k
    # ground truth and results as Python lists ordered by chunk (stable: input order kept inside)
    gt_chunk = chunk_of_cat[gt.ann_cat]
    gt_order = np.argsort(gt_chunk, kind="stable")
    gt_bounds = np.searchsorted(gt_chunk[gt_order], np.arange(len(chunks) + 1)).tolist()
    gt_anns = [gt.anns[i] for i in gt_order.tolist()]
    gt_img = [int(a["image_id"]) for a in gt_anns]
    gt_cat = [int(a["category_id"]) for a in gt_anns]
    dt_chunk = chunk_of_cat[dt_cells % gt.num_cats]
    dt_order = np.argsort(dt_chunk, kind="stable")
    dt_bounds = np.searchsorted(dt_chunk[dt_order], np.arange(len(chunks) + 1)).tolist()
    src = dt_src[dt_order]
    dt_img = res_img[src].tolist()
    dt_cat = gt.cat_ids[(dt_cells % gt.num_cats)[dt_order]].tolist()
    dt_score = res_score[src].tolist()
    dt_area = dt_area[dt_order].tolist()
    dt_geometry = [lvis_results[i][key] for i in src.tolist()]
    categories = [dict(c) for c in gt.categories]
    cells_total = 0
    for k, (cats, imgs) in enumerate(chunks):
        cells_total += len(cats) * len(imgs)
        images = [gt.images[i] for i in imgs.tolist()]
        chunk_cats = [categories[c] for c in cats.tolist()]
        a, b = gt_bounds[k], gt_bounds[k + 1]
        gts = [{"id": ann["id"], "image_id": i, "category_id": c, "area": ann["area"], "iscrowd": 0, key: ann[key]}
               for ann, i, c in zip(gt_anns[a:b], gt_img[a:b], gt_cat[a:b])]
        a, b = dt_bounds[k], dt_bounds[k + 1]
        dts = [{"id": j, "image_id": i, "category_id": c, "score": s, "area": ar, key: g}
               for j, i, c, s, ar, g in zip(range(1, b - a + 1), dt_img[a:b], dt_cat[a:b], dt_score[a:b],
                                            dt_area[a:b], dt_geometry[a:b])]
        coco_gt = COCO({"images": images, "annotations": gts, "categories": chunk_cats})
        coco_dt = COCO({"images": images, "annotations": dts, "categories": chunk_cats})
        evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, lvis_style=True, print_function=_noop)
        evaluator.params.maxDets = [max_dets]
        evaluator.params.imgIds = [img["id"] for img in images]
        evaluator.params.catIds = [int(gt.cat_ids[c]) for c in cats.tolist()]
        evaluator.evaluate()
        evaluator.accumulate()
        precision[:, :, cats] = evaluator.eval["precision"]
        recall[:, cats] = evaluator.eval["recall"]

    # 5. faster-coco-eval's LVIS summary over all categories
    summary = COCOeval_faster(COCO({"images": [], "annotations": [], "categories": categories}), None, iou_type,
                              lvis_style=True, print_function=_noop)
    summary.params.maxDets = [max_dets]
    # indices of the rare / common / frequent categories, as LVISEval._prepare_freq_group makes them
    summary.freq_groups = [[k for k, c in enumerate(categories) if c["frequency"] == f] for f in _FREQUENCIES]
    summary.eval = {"precision": precision, "recall": recall,
                    "counts": [num_t, num_r, gt.num_cats, num_a, 1]}
    summary.summarize()
    stats = summary.stats_as_dict
    results = {m: float(stats[_STATS_LABELS[m]] * 100) for m in metrics}
    logger.info(f"faster_coco_eval backend: {len(dt_src)} of {n} results evaluated ({len(kept)} after the "
                f"{max_dets_per_image}-per-image cap), {len(chunks)} category chunks, {cells_total} image x "
                f"category cells, {time.perf_counter() - tic:.1f} s")
    logger.info(f"Evaluation results for {iou_type} (backend: faster_coco_eval): \n" + _small_table(results))
    return results
