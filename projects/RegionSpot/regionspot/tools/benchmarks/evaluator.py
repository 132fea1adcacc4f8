"""Time the two LVIS evaluator backends on a synthetic LVIS-val-sized set and check they agree.

    regionspot-benchmark eval [--images 19809] [--dets-per-image 300] [--seed 0]
        [--segm] [--segm-images 1000] [--skip-reference] [--output FILE] [--quick]

The set (:func:`make_synthetic_lvis`, seeded, written as LVIS v1 json under a temporary
folder in /tmp and removed afterwards) imitates LVIS v1 val: ``--images`` images (19,809 by
default) of 240-640 x 320-640 pixels with sparse COCO-like ids, the 1203 LVIS v1 categories
with their frequencies (Detectron2's ``LVIS_CATEGORIES``), on average ~12 ground-truth boxes
per image over 1-5 positive categories (frequent categories more likely, as in LVIS), ~8
negative categories per image and ~15 % of the positive categories marked not exhaustive.
Each image gets ``--dets-per-image`` results (2 % of the images 20 % more, so that LVIS's
300-per-image cap is exercised): jittered copies of its ground truth (mostly the right
category) and random boxes whose category is, half of the time, one the image is labelled
for (so they count) and otherwise any of the 1203; scores rounded to 4 decimals (many ties
within and across images, where the two implementations must break ties alike); 0.1 % of the
boxes are degenerate (zero width: dropped by the LVIS API's area filter).

Timed: the evaluation call of each backend on the same results and the same loaded
``lvis.LVIS`` ground truth (what ``LVISEvaluator`` holds), i.e.
``detectron2.evaluation.lvis_evaluation._evaluate_predictions_on_lvis`` (backend "lvis",
the LVIS API: ``LVISResults`` + ``LVISEval``) and
``regionspot.evaluation.fast_lvis.evaluate_predictions_on_lvis_fast`` (backend
"faster_coco_eval"), box AP; with ``--segm`` also mask AP on a smaller set
(``--segm-images``, RLE masks). The fast backend runs first (the LVIS API modifies the
result dicts it is given, adding areas, ids and box polygons). Making the set and loading the
json are not timed. The metrics of both must agree to ``--tolerance`` (1e-4 percent points);
the exit status is 1 if they do not.

JSON (written atomically): ``--output`` (default ``output/benchmark/eval_<host>.json``):
settings, set statistics, per task the seconds of each backend, their ratio (speed-up), both
metric dicts and the max absolute difference. ``--quick`` (for the tests): 300 images, 300
results each, box and mask AP (on 100 images) unless ``--images``/``--segm-images`` say otherwise.
The run's log (the project's and Detectron2's lines) goes to the console and ``<output>.log``;
an input error ends with one line ``benchmark.py eval: error: <message>`` and exit status 2
(``--debug``: with the traceback).
"""

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from regionspot.tools.common import SOURCE_DIR, output_path, run_tool

SCHEMA = "regionspot-eval-benchmark/1"
PROG = "benchmark.py eval"
SUMMARY = "the LVIS evaluator backends (LVIS API vs faster-coco-eval) on a synthetic LVIS-val-sized set"
FREQUENCY_WEIGHT = {"f": 30.0, "c": 3.0, "r": 0.3}


def _octagon(x, y, w, h):
    """Polygons (N, 16) of the octagons inscribed in boxes (corners cut at a quarter)."""
    qx, qy = w / 4, h / 4
    pts = [x + qx, y, x + w - qx, y, x + w, y + qy, x + w, y + h - qy,
           x + w - qx, y + h, x + qx, y + h, x, y + h - qy, x, y + qy]
    return np.stack(pts, axis=-1)


def make_synthetic_lvis(num_images: int, dets_per_image: int = 300, *, seed: int = 0, gt_per_image: float = 12.0,
                        masks: bool = False, over_cap_fraction: float = 0.02, relevant_fraction: float = 0.5,
                        degenerate_fraction: float = 0.001, score_decimals: int = 4,
                        shuffle_results: bool = False,
                        frequency_weights: Optional[Dict[str, float]] = None) -> Tuple[dict, List[dict]]:
    """A seeded synthetic LVIS v1-format ground truth and COCO-style results for it.

    Args:
        num_images: images (LVIS v1 val: 19,809).
        dets_per_image: results per image; ``over_cap_fraction`` of the images get 20 % more
            (at least one more).
        seed: numpy seed; the same arguments give the same set.
        gt_per_image: mean ground-truth boxes per image (Poisson, at least 1).
        masks: also give every annotation a polygon (the octagon inscribed in its box; area =
            the polygon's) and every result a compressed RLE mask (Detectron2's format: str
            counts) of a jittered octagon.
        relevant_fraction: share of the random results whose category is one the image is
            labelled for (positive or negative); the others get any of the 1203.
        degenerate_fraction: share of results with zero width.
        score_decimals: scores are rounded to this many decimals (ties).
        shuffle_results: return the results in random order (images interleaved) instead of
            grouped by image.
        frequency_weights: relative chance of a rare / common / frequent category to be in an
            image ({"r": .., "c": .., "f": ..}; default :data:`FREQUENCY_WEIGHT`, LVIS-like).

    Returns:
        (LVIS-format dict with images, annotations, categories; list of result dicts with
        image_id, category_id, bbox [x, y, w, h], score and, with ``masks``, segmentation).
    """
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    rng = np.random.default_rng(seed)
    cats = sorted(LVIS_CATEGORIES, key=lambda c: c["id"])
    categories = [{"id": c["id"], "name": c["name"], "synset": c["synset"], "frequency": c["frequency"]}
                  for c in cats]
    num_cats = len(categories)
    cat_ids = np.array([c["id"] for c in cats])
    frequency_weights = frequency_weights or FREQUENCY_WEIGHT
    weights = np.array([frequency_weights[c["frequency"]] for c in cats], dtype=np.float64)
    probs = weights / weights.sum()

    img_ids = np.sort(rng.choice(np.arange(1, 30 * num_images + 2), size=num_images, replace=False))
    widths = rng.integers(320, 641, size=num_images)
    heights = rng.integers(240, 641, size=num_images)
    images, annotations = [], []
    gt_img, gt_cat, gt_box = [], [], []
    labelled = []  # per image: category indices it is labelled for (positive + negative)
    ann_id = 1
    for i in range(num_images):
        W, H = float(widths[i]), float(heights[i])
        n_gt = max(1, int(rng.poisson(gt_per_image)))
        n_pos = 1 + min(int(rng.poisson(1.5)), n_gt - 1, 4)
        pos = rng.choice(num_cats, size=n_pos, replace=False, p=probs)
        which = np.concatenate([np.arange(n_pos), rng.integers(0, n_pos, size=n_gt - n_pos)])
        g_cat = pos[which]
        w = np.exp(rng.uniform(np.log(4.0), np.log(0.9 * W), size=n_gt))
        h = np.clip(w * np.exp(rng.normal(0.0, 0.5, size=n_gt)), 3.0, 0.95 * H)
        x = rng.uniform(0.0, W - w)
        y = rng.uniform(0.0, H - h)
        box = np.round(np.stack([x, y, w, h], axis=1), 2)
        neg_pool = np.setdiff1d(np.arange(num_cats), pos)
        n_neg = min(int(rng.poisson(8.0)), len(neg_pool))
        p_neg = probs[neg_pool] / probs[neg_pool].sum()
        neg = rng.choice(neg_pool, size=n_neg, replace=False, p=p_neg)
        not_exhaustive = pos[rng.random(n_pos) < 0.15]
        images.append({
            "id": int(img_ids[i]), "height": int(H), "width": int(W),
            "file_name": f"{int(img_ids[i]):012d}.jpg",
            "coco_url": f"http://images.cocodataset.org/val2017/{int(img_ids[i]):012d}.jpg",
            "neg_category_ids": sorted(int(cat_ids[c]) for c in neg),
            "not_exhaustive_category_ids": sorted(int(cat_ids[c]) for c in not_exhaustive),
        })
        for k in range(n_gt):
            bx, by, bw, bh = (float(v) for v in box[k])
            ann = {"id": ann_id, "image_id": int(img_ids[i]), "category_id": int(cat_ids[g_cat[k]]),
                   "bbox": [bx, by, bw, bh], "area": round(bw * bh, 4)}
            if masks:
                poly = _octagon(bx, by, bw, bh)
                ann["segmentation"] = [[round(float(v), 2) for v in poly]]
                ann["area"] = round(bw * bh * 7.0 / 8.0, 4)  # the octagon's area
            else:
                ann["segmentation"] = [[bx, by, bx + bw, by, bx + bw, by + bh, bx, by + bh]]
            annotations.append(ann)
            ann_id += 1
        gt_img.append(np.full(n_gt, i))
        gt_cat.append(g_cat)
        gt_box.append(box)
        labelled.append(np.concatenate([pos, neg]))
    gt_img = np.concatenate(gt_img)
    gt_cat = np.concatenate(gt_cat)
    gt_box = np.concatenate(gt_box)
    gt_start = np.searchsorted(gt_img, np.arange(num_images))
    gt_count = np.bincount(gt_img, minlength=num_images)
    lab_count = np.array([len(x) for x in labelled])
    lab_start = np.concatenate([[0], np.cumsum(lab_count)[:-1]])
    lab_flat = np.concatenate(labelled)

    # results, all images at once
    n_det = np.full(num_images, dets_per_image)
    over = rng.random(num_images) < over_cap_fraction
    n_det[over] = np.maximum(dets_per_image + 1, int(dets_per_image * 1.2))
    det_img = np.repeat(np.arange(num_images), n_det)
    total = len(det_img)
    slot = np.arange(total) - np.repeat(np.cumsum(n_det) - n_det, n_det)
    n_jit = np.minimum(2 * gt_count, n_det // 2)
    jitter = slot < n_jit[det_img]
    W = widths[det_img].astype(float)
    H = heights[det_img].astype(float)
    # jittered copies of the ground truth
    src = gt_start[det_img] + slot % np.maximum(gt_count[det_img], 1)
    gb = gt_box[src]
    noise = rng.normal(0.0, 0.08, size=(total, 4))
    jx = gb[:, 0] + noise[:, 0] * gb[:, 2]
    jy = gb[:, 1] + noise[:, 1] * gb[:, 3]
    jw = gb[:, 2] * np.exp(noise[:, 2])
    jh = gb[:, 3] * np.exp(noise[:, 3])
    right = rng.random(total) < 0.8
    lab_pick = lab_flat[lab_start[det_img] + (rng.random(total) * lab_count[det_img]).astype(int)]
    jit_cat = np.where(right, gt_cat[src], lab_pick)
    # random boxes
    rw = np.exp(rng.uniform(np.log(4.0), np.log(0.9 * W)))
    rh = np.clip(rw * np.exp(rng.normal(0.0, 0.5, size=total)), 3.0, 0.95 * H)
    rx = rng.uniform(0.0, 1.0, size=total) * (W - rw)
    ry = rng.uniform(0.0, 1.0, size=total) * (H - rh)
    rel = rng.random(total) < relevant_fraction
    rnd_cat = np.where(rel, lab_pick, rng.integers(0, num_cats, size=total))
    x = np.where(jitter, jx, rx)
    y = np.where(jitter, jy, ry)
    w = np.where(jitter, jw, rw)
    h = np.where(jitter, jh, rh)
    w[rng.random(total) < degenerate_fraction] = 0.0
    cat = np.where(jitter, jit_cat, rnd_cat)
    score = np.where(jitter, rng.beta(5.0, 2.0, size=total), rng.beta(2.0, 5.0, size=total))
    score = np.round(score, score_decimals)
    # float32 values, as a model's outputs (instances_to_coco_json: tensor.tolist())
    boxes = np.stack([x, y, w, h], axis=1).astype(np.float32).astype(np.float64)
    score = score.astype(np.float32).astype(np.float64)
    # within an image, results in random order
    order = np.lexsort((rng.random(total), det_img))
    if shuffle_results:
        order = rng.permutation(total)
    det_img, cat, boxes, score = det_img[order], cat[order], boxes[order], score[order]
    img_list = img_ids[det_img].tolist()
    cat_list = cat_ids[cat].tolist()
    box_list = boxes.tolist()
    score_list = score.tolist()
    results = [{"image_id": a, "category_id": b, "bbox": c, "score": d}
               for a, b, c, d in zip(img_list, cat_list, box_list, score_list)]
    if masks:
        import pycocotools.mask as mask_util

        polys = _octagon(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
        polys += rng.normal(0.0, 1.0, size=polys.shape)
        starts = np.searchsorted(det_img, np.arange(num_images)) if not shuffle_results else None
        if shuffle_results:
            for k, r in enumerate(results):
                i = det_img[k]
                rle = mask_util.frPyObjects([polys[k].tolist()], int(heights[i]), int(widths[i]))[0]
                r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("utf-8")}
        else:
            for i in range(num_images):
                a, b = starts[i], starts[i] + n_det[i]
                rles = mask_util.frPyObjects(polys[a:b].tolist(), int(heights[i]), int(widths[i]))
                for r, rle in zip(results[a:b], rles):
                    r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("utf-8")}
    gt = {"info": {"description": f"synthetic LVIS v1-format set (seed {seed})"}, "images": images,
          "annotations": annotations, "categories": categories, "licenses": []}
    return gt, results


def set_statistics(gt: dict, results: Sequence[dict]) -> dict:
    """Counts that describe a synthetic set (for the report)."""
    per_image = np.bincount(np.unique([r["image_id"] for r in results], return_inverse=True)[1])
    return {
        "images": len(gt["images"]), "categories": len(gt["categories"]),
        "annotations": len(gt["annotations"]), "results": len(results),
        "max_results_per_image": int(per_image.max()) if len(per_image) else 0,
        "images_over_300_results": int((per_image > 300).sum()),
        "mean_neg_categories_per_image": float(np.mean([len(i["neg_category_ids"]) for i in gt["images"]])),
        "mean_not_exhaustive_categories_per_image": float(
            np.mean([len(i["not_exhaustive_category_ids"]) for i in gt["images"]])),
    }


def _max_diff(a: Dict[str, float], b: Dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) for k in a)


def time_backends(lvis_api, results: List[dict], iou_type: str, *, max_dets: int = 300,
                  skip_reference: bool = False) -> dict:
    """Run both backends on the same results (fast first) and time each evaluation call.

    Returns:
        {"faster_coco_eval": {"seconds", "metrics"}, "lvis": {...} (unless skipped),
        "speedup", "max_abs_diff"}.
    """
    from detectron2.evaluation.lvis_evaluation import _evaluate_predictions_on_lvis

    from regionspot.evaluation.fast_lvis import evaluate_predictions_on_lvis_fast

    out = {}
    gc.collect()
    tic = time.perf_counter()
    fast = evaluate_predictions_on_lvis_fast(lvis_api, results, iou_type, max_dets_per_image=max_dets)
    out["faster_coco_eval"] = {"seconds": time.perf_counter() - tic, "metrics": fast}
    print(f"[{iou_type}] faster_coco_eval: {out['faster_coco_eval']['seconds']:.1f} s  {fast}", flush=True)
    if not skip_reference:
        gc.collect()
        tic = time.perf_counter()
        ref = _evaluate_predictions_on_lvis(lvis_api, results, iou_type, max_dets_per_image=max_dets)
        out["lvis"] = {"seconds": time.perf_counter() - tic, "metrics": ref}
        print(f"[{iou_type}] lvis (LVIS API): {out['lvis']['seconds']:.1f} s  {ref}", flush=True)
        out["speedup"] = out["lvis"]["seconds"] / out["faster_coco_eval"]["seconds"]
        out["max_abs_diff"] = _max_diff(ref, fast)
    return out


def _run_task(tmpdir: str, name: str, num_images: int, dets: int, seed: int, masks: bool, iou_type: str,
              skip_reference: bool) -> dict:
    from lvis import LVIS

    tic = time.perf_counter()
    gt, results = make_synthetic_lvis(num_images, dets, seed=seed, masks=masks)
    made = time.perf_counter() - tic
    path = os.path.join(tmpdir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(gt, f)
    stats = set_statistics(gt, results)
    del gt
    lvis_api = LVIS(path)
    print(f"[{iou_type}] synthetic set: {stats} (made in {made:.1f} s)", flush=True)
    timing = time_backends(lvis_api, results, iou_type, skip_reference=skip_reference)
    return {"set": stats, "seed": seed, **timing}


def _host() -> str:
    return platform.node().split(".")[0] or "host"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This subcommand's options, added to ``p``."""
    from regionspot.cli import add_debug_argument

    p.add_argument("--images", type=int, default=None,
                   help="images of the box-AP set (default 19809, LVIS v1 val; --quick 300)")
    p.add_argument("--dets-per-image", type=int, default=300, help="results per image (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segm", action="store_true", help="also time mask AP (on --segm-images images)")
    p.add_argument("--segm-images", type=int, default=None,
                   help="images of the mask-AP set (default 1000; --quick 100)")
    p.add_argument("--skip-reference", action="store_true", help="time the fast backend only")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |difference| of any metric, percent points")
    p.add_argument("--output", default=None, help="JSON file (default output/benchmark/eval_<host>.json); "
                                                  "the log goes to OUTPUT.log")
    p.add_argument("--quick", action="store_true", help="a small run for the tests (300 images; masks on 100)")
    add_debug_argument(p)


def resolve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The ``--quick`` and default sizes filled in (a bad value ends in ``parser.error``: exit 2)."""
    if args.quick:
        args.segm = True
    if args.images is None:
        args.images = 300 if args.quick else 19809
    if args.segm_images is None:
        args.segm_images = 100 if args.quick else 1000
    if args.images < 1 or args.dets_per_image < 1 or args.segm_images < 1:
        parser.error("--images, --dets-per-image and --segm-images must be positive")
    return args


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``regionspot-benchmark eval``: build the set(s), time both backends, write the JSON; 0 if
    the backends agree, else 1 (2 for an input error, in one ``benchmark.py eval: error:`` line)."""
    args = resolve_settings(args, parser)
    return run_tool(lambda: run(args), PROG, args.debug)  # the log file next to the JSON (run)


def run(args: argparse.Namespace) -> int:
    """:func:`run_command` once the command line is parsed and resolved."""
    import faster_coco_eval
    import lvis

    from regionspot.cli import setup_logging
    from regionspot.environment import git_commit, peak_rss_bytes
    from regionspot.io import write_json_atomic

    logging.getLogger("lvis").setLevel(logging.WARNING)
    output = args.output or output_path("benchmark", f"eval_{_host()}.json")
    setup_logging(output + ".log")
    report = {
        "schema": SCHEMA,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": _host(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "faster_coco_eval_version": faster_coco_eval.__version__,
        "lvis_version": getattr(lvis, "__version__", "0.5.3"),
        "git_commit": git_commit(SOURCE_DIR),
        "settings": {"images": args.images, "dets_per_image": args.dets_per_image, "seed": args.seed,
                     "segm": args.segm, "segm_images": args.segm_images if args.segm else None,
                     "max_dets_per_image": 300, "tolerance": args.tolerance, "quick": args.quick,
                     "skip_reference": args.skip_reference},
        "tasks": {},
    }
    tmpdir = tempfile.mkdtemp(prefix="regionspot_eval_bench_", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        report["tasks"]["bbox"] = _run_task(tmpdir, "bbox", args.images, args.dets_per_image, args.seed, False,
                                            "bbox", args.skip_reference)
        gc.collect()
        if args.segm:
            report["tasks"]["segm"] = _run_task(tmpdir, "segm", args.segm_images, args.dets_per_image,
                                                args.seed + 1, True, "segm", args.skip_reference)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    diffs = [t["max_abs_diff"] for t in report["tasks"].values() if "max_abs_diff" in t]
    report["max_abs_diff"] = max(diffs) if diffs else None
    report["agree"] = all(d <= args.tolerance for d in diffs)
    report["peak_rss_bytes"] = peak_rss_bytes()
    write_json_atomic(output, report)
    for task, t in report["tasks"].items():
        line = f"{task}: faster_coco_eval {t['faster_coco_eval']['seconds']:.1f} s"
        if "lvis" in t:
            line += (f", lvis {t['lvis']['seconds']:.1f} s, speed-up {t['speedup']:.1f}x, "
                     f"max |diff| {t['max_abs_diff']:.2e}")
        print(line)
    print(f"wrote {output}")
    if not report["agree"]:
        print(f"the backends DISAGREE (max |diff| {report['max_abs_diff']} > {args.tolerance})", file=sys.stderr)
        return 1
    return 0
