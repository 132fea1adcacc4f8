"""Inspect and convert proposal files (a detector's boxes for RegionSpot's ``file`` source).

    python tools/proposals.py inspect FILE [--format auto] [--dataset NAME | --gt JSON]
                                      [--topk K] [--score-thresh S] [--nms-thresh T]
                                      [--output REPORT.json]
    python tools/proposals.py convert INPUT --to {glip,coco,detectron2} --output OUT
                                      [--format auto] [--overwrite]

Formats (``regionspot.data.proposal_files``; boxes in original-image pixels): ``glip``
(the GLIP-box JSON object of the released RegionSpot code, XYXY, probabilities), ``coco`` (a
COCO results list, XYWH, probabilities) and ``detectron2`` (Detectron2's proposal pickle,
XYXY, objectness logits). ``--format auto`` detects the format from the content.

``inspect`` prints the format, the number of images and boxes, boxes per image
(min / median / mean / max) and the score range (min / mean / max). With ``--dataset`` (a
name registered in Detectron2's DatasetCatalog; ``regionspot_sample`` is registered by
RegionSpot) or ``--gt`` (an LVIS- or COCO-format JSON: ``images`` with id/height/width,
``annotations`` with image_id, XYWH ``bbox`` and ``iscrowd``), the boxes are attached to the
dataset as in evaluation (``attach_proposals`` with ``--score-thresh``, ``--nms-thresh``,
``--topk``) and it also prints the coverage report and the class-agnostic recall of the
non-crowd ground-truth boxes at IoU 0.5 and 0.75: a ground-truth box counts as recalled when a
kept proposal of its image overlaps it with at least that IoU (ground-truth boxes of images the
file lacks count as missed). ``--output`` writes the same figures as JSON.

``convert`` reads INPUT and writes it as ``--to``. Class labels are lost in the detectron2
format; COCO needs a category_id, so boxes without a label get category 1.

The project's log lines (e.g. a ``--register``ed dataset) are shown on the console and, with
``--output OUT``, also written to ``OUT.log``. Errors in the input (unreadable or invalid
file, unknown dataset, output that would overwrite the input or an existing file without
``--overwrite``) print one line ``proposals.py: error: <message>`` and exit with status 2;
``--debug`` prints the traceback too (it is also in ``OUT.log``).
"""

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional, Sequence

import numpy as np

from regionspot.tools.common import run_tool

IOU_THRESHOLDS = (0.5, 0.75)
PROG = "proposals.py"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser with the ``inspect`` and ``convert`` sub-commands."""
    from regionspot.cli import add_debug_argument
    from regionspot.data.proposal_files import PROPOSAL_FILE_FORMATS

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="statistics, coverage of a dataset and recall of its boxes")
    inspect.add_argument("file", help="proposal file")
    inspect.add_argument("--format", default="auto", choices=("auto",) + PROPOSAL_FILE_FORMATS)
    source = inspect.add_mutually_exclusive_group()
    source.add_argument("--dataset", help="name of a dataset registered in Detectron2's DatasetCatalog")
    source.add_argument("--gt", help="LVIS- or COCO-format ground-truth JSON")
    inspect.add_argument("--topk", type=int, default=None, help="keep at most K boxes per image")
    inspect.add_argument("--score-thresh", type=float, default=0.0, help="drop boxes scoring below S")
    inspect.add_argument("--nms-thresh", type=float, default=0.0, help="class-agnostic NMS IoU (0: none)")
    inspect.add_argument("--output", help="write the figures to this JSON file (and the log to OUTPUT.log)")
    from regionspot.data.datasets.user import add_register_argument

    add_register_argument(inspect)
    add_debug_argument(inspect)

    convert = sub.add_parser("convert", help="write a proposal file in another format")
    convert.add_argument("input", help="proposal file to read")
    convert.add_argument("--to", required=True, choices=PROPOSAL_FILE_FORMATS, help="format to write")
    convert.add_argument("--output", required=True, help="file to write (and the log to OUTPUT.log)")
    convert.add_argument("--format", default="auto", choices=("auto",) + PROPOSAL_FILE_FORMATS,
                         help="format of the input (default: detect)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_debug_argument(convert)
    return parser


# ----------------------------------------------------------------------------- ground truth


def load_gt_dicts(path: str) -> List[dict]:
    """Dataset dicts from an LVIS- or COCO-format JSON: image_id, height, width, file_name and
    annotations (``bbox`` XYWH_ABS, ``bbox_mode``, ``iscrowd``).

    Raises:
        InputError: the file is not JSON, or lacks images/annotations or their keys.
    """
    from detectron2.structures import BoxMode

    from regionspot.data.validation import InputError

    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not a valid JSON file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path}: expected an LVIS/COCO JSON object with 'images' and 'annotations' lists")
    records = {}
    for img in data["images"]:
        if not isinstance(img, dict) or any(k not in img for k in ("id", "height", "width")):
            raise InputError(f"{path}: image entry {str(img)[:80]} lacks id, height or width")
        records[img["id"]] = {"image_id": img["id"], "height": int(img["height"]), "width": int(img["width"]),
                              "file_name": img.get("file_name", ""), "annotations": []}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or "image_id" not in ann or "bbox" not in ann:
            raise InputError(f"{path}: annotation {str(ann)[:80]} lacks image_id or bbox")
        if ann["image_id"] not in records:
            raise InputError(f"{path}: annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
        records[ann["image_id"]]["annotations"].append(
            {"bbox": ann["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": int(ann.get("iscrowd", 0))})
    return list(records.values())


def load_dataset_dicts(name: str) -> List[dict]:
    """Dataset dicts of a dataset registered in Detectron2's catalog (RegionSpot's included)."""
    from detectron2.data import DatasetCatalog

    import regionspot.data.datasets  # noqa: F401  (registers regionspot_sample)
    from regionspot.data.validation import InputError

    names = sorted(DatasetCatalog.list())
    if name not in names:
        shown = [n for n in names if "regionspot" in n] + [n for n in names if "lvis" in n or "coco_2017" in n]
        raise InputError(f"dataset {name!r} is not registered in Detectron2's DatasetCatalog "
                         f"(registered: {', '.join(shown[:8])}, ...)")
    return DatasetCatalog.get(name)


# ----------------------------------------------------------------------------- recall


def _gt_boxes_xyxy(record: dict) -> np.ndarray:
    """(G, 4) float32 XYXY_ABS boxes of the record's non-crowd annotations."""
    from detectron2.structures import BoxMode

    boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
             for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def proposal_recall(dataset_dicts: Sequence[dict], thresholds=IOU_THRESHOLDS) -> dict:
    """Class-agnostic recall of the non-crowd ground-truth boxes by the attached proposals.

    Args:
        dataset_dicts: dicts with ``annotations`` and the ``proposal_boxes`` that
            ``attach_proposals`` added (XYXY_ABS, original pixels).
        thresholds: IoU thresholds.

    Returns:
        ``{"gt_boxes": G, "recall": {"0.5": r, "0.75": r}}`` (recall None when G = 0).
    """
    import torch
    from detectron2.structures import Boxes, pairwise_iou

    best = []
    for record in dataset_dicts:
        gt = _gt_boxes_xyxy(record)
        if not len(gt):
            continue
        proposals = record.get("proposal_boxes", np.zeros((0, 4), np.float32))
        if len(proposals):
            iou = pairwise_iou(Boxes(torch.from_numpy(gt)), Boxes(torch.as_tensor(proposals, dtype=torch.float32)))
            best.append(iou.max(dim=1).values.numpy())
        else:
            best.append(np.zeros(len(gt), dtype=np.float32))
    best = np.concatenate(best) if best else np.zeros(0, dtype=np.float32)
    recall = {str(t): (float((best >= t).mean()) if best.size else None) for t in thresholds}
    return {"gt_boxes": int(best.size), "recall": recall}


# ----------------------------------------------------------------------------- commands


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_summary(summary: dict):
    print(f"file: {summary['file']}")
    print(f"format: {summary['format']}")
    print(f"images: {summary['images']}  boxes: {summary['boxes']}  class labels: "
          f"{'yes' if summary['has_labels'] else 'no'}")
    per_image, scores = summary["boxes_per_image"], summary["scores"]
    if per_image:
        print("boxes per image: min {min} / median {median} / mean {mean} / max {max}".format(
            **{k: _fmt(v) for k, v in per_image.items()}))
    if scores:
        print("scores: min {min} / mean {mean} / max {max}".format(**{k: _fmt(v) for k, v in scores.items()}))


def _print_coverage(coverage: dict, recall: dict):
    print(f"dataset images: {coverage['images_in_dataset']}  with proposals: {coverage['images_with_proposals']}"
          f"  without: {coverage['images_without_proposals']}"
          + (f" (e.g. {coverage['missing_image_ids'][:5]})" if coverage["missing_image_ids"] else ""))
    print(f"file images not in the dataset: {coverage['file_images_not_in_dataset']}"
          + (f" (e.g. {coverage['unknown_image_ids'][:5]})" if coverage["unknown_image_ids"] else ""))
    print(f"selection: score >= {coverage['score_thresh']}, NMS IoU {coverage['nms_thresh'] or 'off'}, "
          f"top-k {coverage['topk'] or 'all'}")
    print(f"boxes for the dataset: {coverage['boxes_in_file_for_dataset']}  degenerate dropped: "
          f"{coverage['degenerate_boxes_dropped']}  below score: {coverage['boxes_below_score_thresh']}  "
          f"removed by NMS: {coverage['boxes_removed_by_nms']}  by top-k: {coverage['boxes_removed_by_topk']}  "
          f"kept: {coverage['boxes_kept']}")
    values = "  ".join(f"IoU {t}: {_fmt(r) if r is not None else 'n/a'}" for t, r in recall["recall"].items())
    print(f"class-agnostic recall of {recall['gt_boxes']} ground-truth boxes: {values}")


def log_to(output: str, inputs: Sequence[str]) -> str:
    """Also log to ``<output>.log`` (the run's log file, next to ``output``); returns its path.

    Raises:
        InputError: ``output`` or its log file would overwrite one of ``inputs``.
    """
    from regionspot.cli import setup_logging
    from regionspot.data.validation import InputError

    log = output + ".log"
    for target in (output, log):
        for path in inputs:
            if os.path.exists(path) and os.path.exists(target) and os.path.samefile(path, target):
                raise InputError(f"refusing to write {target}: it is the input file {path}")
    setup_logging(log)
    return log


def run_inspect(args: argparse.Namespace) -> int:
    """``inspect``: print (and optionally write) statistics, coverage and recall."""
    from regionspot.data.dataset_proposals import attach_proposals
    from regionspot.data.proposal_files import read_proposal_file
    from regionspot.io import write_json_atomic

    if args.output:
        inputs = [p for p in (args.file, args.gt) if p] + [json_file for _, json_file, _ in args.register]
        log_to(args.output, inputs)
    from regionspot.data.datasets.user import register_from_args

    register_from_args(args.register)
    dicts = None  # the dataset first: a wrong name fails before any output
    if args.dataset:
        dicts = load_dataset_dicts(args.dataset)
    elif args.gt:
        dicts = load_gt_dicts(args.gt)
    proposals = read_proposal_file(args.file, args.format)
    report = proposals.summary()
    _print_summary(report)
    if dicts is not None:
        coverage = attach_proposals(dicts, proposals, score_thresh=args.score_thresh,
                                    nms_thresh=args.nms_thresh, topk=args.topk)
        recall = proposal_recall(dicts)
        _print_coverage(coverage, recall)
        report["dataset"] = args.dataset or args.gt
        report["coverage"] = coverage
        report.update(recall)
    if args.output:
        write_json_atomic(args.output, report)
        print(f"wrote {args.output}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """``convert``: read INPUT, write it as ``--to`` to ``--output``."""
    from regionspot.data.proposal_files import read_proposal_file, write_proposal_file
    from regionspot.data.validation import InputError

    if os.path.exists(args.output):
        if os.path.realpath(args.output) == os.path.realpath(args.input):
            raise InputError(f"refusing to write {args.output}: it is the input file")
        if not args.overwrite:
            raise InputError(f"{args.output} exists; pass --overwrite to replace it")
    log_to(args.output, [args.input])
    proposals = read_proposal_file(args.input, args.format)
    if args.to == "detectron2" and proposals.has_labels():
        print("note: Detectron2's proposal format has no class labels; they are not written")
    write_proposal_file(proposals, args.output, args.to)
    print(f"wrote {proposals.num_boxes} boxes of {proposals.num_images} images from {args.input} "
          f"({proposals.format}) to {args.output} ({args.to})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status (2 for bad input, with one ``proposals.py: error:``
    line on stderr; the traceback too with ``--debug``)."""
    with warnings.catch_warnings():  # import-time deprecation noise of dependencies
        for message in (".*torch.jit.script.*deprecated.*", ".*pkg_resources is deprecated.*"):
            warnings.filterwarnings("ignore", message=message)
        args = build_parser().parse_args(argv)
        run = run_inspect if args.command == "inspect" else run_convert
        return run_tool(lambda: run(args), PROG, args.debug)  # the log file once the output is known


if __name__ == "__main__":
    sys.exit(main())
