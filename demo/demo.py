#!/usr/bin/env python
"""Recognise regions in your own images with your own class names.

Given boxes (e.g. a detector's, or drawn by hand):

    python demo/demo.py --config-file configs/regionspot_bl.yaml \\
        --input "photos/*.jpg" --boxes boxes.json \\
        --vocabulary custom --custom-vocabulary "cat,remote control,sofa" \\
        --output out/ --opts MODEL.WEIGHTS regionspot_bl.pth

Everything in the photo, with no detector and no box file (SAM's automatic masks; or
``--proposals rpn`` with ``MODEL.REGIONSPOT.RPN_WEIGHTS`` set):

    python demo/demo.py --config-file configs/regionspot_bl.yaml --input photo.jpg \\
        --proposals sam_auto --vocabulary lvis --min-score 0.2 --output out/ \\
        --opts MODEL.WEIGHTS regionspot_bl.pth

``--boxes`` is a JSON object mapping each image (its path as given, or its file name) to a
list of XYXY pixel boxes ``[[x0, y0, x1, y1], ...]``. For each image the demo writes
``<output>/<name>.jpg`` (boxes, labels, scores and SAM masks drawn with Detectron2's
Visualizer) and ``<output>/<name>.json`` (the predictions); two inputs with the same name in
different formats get ``<name>_<ext>``. The output folder may not be an input's folder, no
output may be an input, and the folder must be writable: checked before any image is
computed (exit code 2). An image that fails is reported with its file name and the others go
on; the exit code is 1 if any failed.
"""

import argparse
import glob
import json
import logging
import os
import sys
import time

import numpy as np

from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, Instances
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from regionspot import RegionSpotPredictor
from regionspot.predictor import PREDICTOR_SOURCES
from regionspot.checkpoint import CheckpointError
from regionspot.config import load_config
from regionspot.data.datasets.user import add_register_argument, register_from_args
from regionspot.data.validation import InputError, read_image
from regionspot.data.vocabularies import BUILTIN_VOCABULARIES, vocabulary_by_name
from regionspot.io import atomic_write, write_json_atomic
from regionspot.modeling.weights import WeightsError

logger = logging.getLogger("regionspot.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="RegionSpot demo: label regions with any vocabulary")
    parser.add_argument("--config-file", default="configs/regionspot_bl.yaml", metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, help="image paths or glob patterns")
    regions = parser.add_mutually_exclusive_group(required=True)
    regions.add_argument("--boxes", help="JSON file: {image: [[x0, y0, x1, y1], ...]}")
    regions.add_argument("--proposals", choices=PREDICTOR_SOURCES,
                         help="find the regions instead: sam_auto (SAM's automatic masks) or rpn "
                              "(needs MODEL.REGIONSPOT.RPN_WEIGHTS)")
    parser.add_argument("--min-score", type=float, default=0.0,
                        help="keep regions whose score (proposal score x class probability) is at least this")
    parser.add_argument("--vocabulary", default="lvis",
                        help=f"{', '.join(BUILTIN_VOCABULARIES)}, custom (with --custom-vocabulary), or the name of a "
                             f"registered dataset (e.g. one given with --register) to use its categories")
    parser.add_argument("--custom-vocabulary", default="", help='comma-separated names, e.g. "cat,dog,sofa"')
    parser.add_argument("--output", required=True, help="folder for the drawn images and JSON files")
    parser.add_argument("--no-masks", action="store_true", help="draw boxes and labels only")
    add_register_argument(parser)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    if args.proposals == "rpn" and not cfg.MODEL.REGIONSPOT.RPN_WEIGHTS:
        raise ValueError("--proposals rpn needs the RPN's weights: add --opts MODEL.REGIONSPOT.RPN_WEIGHTS FILE "
                         "(and the RPN's architecture keys, see configs/eval_lvis_rpn.yaml)")
    cfg.freeze()
    return cfg


def expand_inputs(patterns):
    """Paths in the order given; a pattern that matches nothing is kept to be reported."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        paths.extend(matches if matches else [pattern])
    return paths


def read_boxes_file(path: str) -> dict:
    """The --boxes JSON object; errors name the file (and the line of a syntax error)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        raise InputError(f"--boxes file not found: {path!r}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"--boxes {path!r} is not valid JSON: {e}") from None
    if not isinstance(table, dict):
        raise InputError(f"--boxes {path!r} must hold a JSON object {{image: [[x0, y0, x1, y1], ...]}}, "
                         f"got a {type(table).__name__}")
    return table


def boxes_for(table: dict, path: str, boxes_file: str):
    """(key, boxes) of an image in the --boxes table (keys: the path as given or the file name)."""
    for key in (path, os.path.normpath(path), os.path.basename(path)):
        if key in table:
            return key, table[key]
    raise InputError(f"no boxes for image {path!r} in {boxes_file} (keys are image paths or file names)")


def plan_outputs(paths, output: str) -> dict:
    """``{input path: output stem}``, every output distinct and never an input.

    Two inputs with the same name in different formats (photo.jpg, photo.png) get stems that
    keep the extension (photo_jpg, photo_png), said in the log.

    Raises:
        InputError: ``output`` is the folder of an input, an output would be an input file, or
            the folder cannot be written; checked before any image is computed.
    """
    out_real = os.path.realpath(output)
    inputs = {os.path.realpath(p) for p in paths if os.path.exists(p)}
    folders = {os.path.dirname(p) for p in inputs}
    if out_real in folders:
        raise InputError(f"--output {output!r} is the folder of input images; write the results to another folder "
                         f"(the drawings would sit beside, or over, the photos)")
    stems = {}
    for path in paths:
        stems.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)
    plan = {}
    for stem, group in stems.items():
        for path in group:
            plan[path] = stem if len(group) == 1 else f"{stem}_{os.path.splitext(path)[1].lstrip('.') or 'noext'}"
        if len(group) > 1:
            logger.info("inputs %s share the name %r: their outputs are %s", ", ".join(group), stem,
                        ", ".join(plan[p] + ".{jpg,json}" for p in group))
    if len(set(plan.values())) != len(plan):
        raise InputError("two inputs would write the same output name; rename one of them")
    for path, stem in plan.items():
        for ext in (".jpg", ".json"):
            target = os.path.realpath(os.path.join(output, stem + ext))
            if target in inputs:
                raise InputError(f"writing {target} would overwrite the input image {path!r}; choose another --output")
    try:
        os.makedirs(output, exist_ok=True)
        probe = os.path.join(output, f".regionspot-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--output {output!r} cannot be written: {e}") from None
    return plan


def draw(image: np.ndarray, predictions, draw_masks: bool) -> np.ndarray:
    """Draw predictions with Detectron2's Visualizer; returns an (H, W, 3) uint8 RGB array."""
    h, w = image.shape[:2]
    instances = Instances((h, w))
    instances.pred_boxes = Boxes(predictions.boxes)
    instances.scores = predictions.scores
    instances.pred_classes = predictions.classes
    if draw_masks:
        instances.pred_masks = predictions.masks
    metadata = Metadata(name="regionspot_demo", thing_classes=list(predictions.vocabulary))
    visualizer = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="regionspot")
    setup_logger(name="detectron2")
    try:
        register_from_args(args.register)
        box_table = read_boxes_file(args.boxes) if args.boxes else None
        vocabulary = vocabulary_by_name(args.vocabulary, args.custom_vocabulary or None)
        cfg = setup_cfg(args)
        paths = expand_inputs(args.input)
        plan = plan_outputs(paths, args.output)
        predictor = RegionSpotPredictor.from_config(cfg, vocabulary=vocabulary)
    except (OSError, ValueError, WeightsError, CheckpointError) as e:
        logger.error("%s", e)
        return 2
    import cv2

    failures = []
    for path in paths:
        start = time.perf_counter()
        try:
            image = read_image(path, "RGB")
            predictor.set_image(image)
            if box_table is not None:
                key, boxes = boxes_for(box_table, path, args.boxes)
                try:
                    predictions = predictor.predict(boxes)
                except InputError as e:
                    raise InputError(f"{e} (the boxes of {key!r} in {args.boxes})") from None
            else:
                predictions = predictor.predict(proposals=args.proposals)
            predictions = predictions.select(predictions.scores >= args.min_score)
        except (InputError, ValueError) as e:
            logger.error("%s: %s", path, e)
            failures.append(path)
            continue
        stem = plan[path]
        drawn = draw(image, predictions, not args.no_masks)
        ok, encoded = cv2.imencode(".jpg", drawn[:, :, ::-1])
        if not ok:
            logger.error("%s: could not encode the drawn image", path)
            failures.append(path)
            continue
        atomic_write(os.path.join(args.output, f"{stem}.jpg"), lambda f: f.write(encoded.tobytes()))
        write_json_atomic(os.path.join(args.output, f"{stem}.json"),
                          {"image": path, "height": image.shape[0], "width": image.shape[1],
                           "predictions": predictions.to_json()})
        logger.info("%s: %d boxes in %.2fs -> %s", path, len(predictions.labels),
                    time.perf_counter() - start, os.path.join(args.output, stem + ".jpg"))
    if failures:
        logger.error("%d image(s) failed: %s", len(failures), ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
