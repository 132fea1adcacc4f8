"""``regionspot-demo``: recognise regions in your own images with your own class names (in a
checkout also ``python demo/demo.py``, a thin wrapper). ``--config-file`` takes a yaml file or a
bundled config's name (:mod:`regionspot.model_zoo`).

Given boxes (e.g. a detector's, or drawn by hand):

    regionspot-demo --config-file regionspot_bl.yaml \\
        --input "photos/*.jpg" --boxes boxes.json \\
        --vocabulary custom --custom-vocabulary "cat,remote control,sofa" \\
        --output out/ --opts MODEL.WEIGHTS regionspot_bl.pth

Everything in the photo, with no detector and no box file (SAM's automatic masks; or
``--proposals rpn`` with ``MODEL.REGIONSPOT.RPN_WEIGHTS`` set):

    regionspot-demo --config-file regionspot_bl.yaml --input photo.jpg \\
        --proposals sam_auto --vocabulary lvis --min-score 0.2 --output out/ \\
        --opts MODEL.WEIGHTS regionspot_bl.pth

Click an object instead (SAM turns the clicks into a mask, the mask's box is recognised; X,Y
pixels, with ",0" for a negative click; ``--mask IMAGE`` adds a mask of the object as SAM's mask
prompt, or is the prompt alone), and draw where the head looked (paper Fig. 4):

    regionspot-demo --config-file regionspot_bl.yaml --input photo.jpg \
        --points 320,240 330,100,0 --attention --vocabulary coco --output out/ \
        --opts MODEL.WEIGHTS regionspot_bl.pth

``--attention`` also writes ``<output>/<name>_attention.png``: per region (up to
``--attention-regions``, best scores first) its box, then its token's cross-attention map over
CLIP's feature map for each decoder layer (heads averaged, class token excluded).

``--boxes`` is a JSON object mapping each image (its path as given, or its file name) to a
list of XYXY pixel boxes ``[[x0, y0, x1, y1], ...]``. For each image the demo writes
``<output>/<name>.jpg`` (boxes, labels, scores and SAM masks drawn with Detectron2's
Visualizer) and ``<output>/<name>.json`` (the predictions), and the run's log in
``<output>/log.txt``; two inputs with the same name in different formats get
``<name>_<ext>``, and ``"weights"``, the head file used. The JSON's
``"filters"`` say how many candidates each selection step removed (SAM's automatic-mask
thresholds, the ``PROPOSAL_*`` selection, ``--min-score``) and the key that controls it; a
step that removes everything is also logged, in one warning line.

With ``--backend onnxruntime --onnx-dir FOLDER`` the boxes are recognised by the folder that
``regionspot-export onnx`` wrote, on ONNX Runtime (:class:`regionspot.deploy.OnnxRegionSpotPredictor`;
``--boxes`` only; the config is not read, the folder holds the model):

    regionspot-demo --backend onnxruntime --onnx-dir out/regionspot_onnx --input photo.jpg \
        --boxes boxes.json --vocabulary custom --custom-vocabulary "cat,sofa" --output out/

Every input is checked before a model is loaded or anything is written, and a problem ends
the demo with one line and exit code 2 (``--debug`` for the traceback): the config, the
vocabulary, ``MODEL.WEIGHTS`` (empty only with ``--untrained-head``), each image (it exists
and is an image) and its boxes in ``--boxes``, and the output folder (writable, not an input's
folder, no output over an input). An image that fails later (while decoding or predicting)
is reported with its file name and the others go on; the exit code is then 1.
"""

import argparse
import logging
import os
import sys
import time

import numpy as np

from regionspot.attention_maps import attention_figure
from regionspot.cli import (
    add_debug_argument,
    boxes_for,
    expand_inputs,
    read_boxes_file,
    run_entry_point,
    setup_logging,
)
from regionspot.config import load_config
from regionspot.data.datasets.user import add_register_argument, register_from_args
from regionspot.data.validation import InputError, check_boxes, image_size, read_image
from regionspot.data.vocabularies import BUILTIN_VOCABULARIES, vocabulary_by_name
from regionspot.drawing import draw_predictions
from regionspot.engine.trainer import head_weights_record
from regionspot.io import atomic_write, write_json_atomic
from regionspot.predictor import PREDICTOR_SOURCES, RegionSpotPredictor

logger = logging.getLogger("regionspot.demo")
LOG_FILE = "log.txt"  # in --output, beside the drawings


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="RegionSpot demo: label regions with any vocabulary")
    parser.add_argument("--config-file", default="regionspot_bl.yaml", metavar="FILE",
                        help="a config yaml file or a bundled config's name (default: the bundled regionspot_bl.yaml)")
    parser.add_argument("--input", nargs="+", required=True, help="image paths or glob patterns")
    regions = parser.add_mutually_exclusive_group()
    regions.add_argument("--boxes", help="JSON file: {image: [[x0, y0, x1, y1], ...]}")
    regions.add_argument("--proposals", choices=PREDICTOR_SOURCES,
                         help="find the regions instead: sam_auto (SAM's automatic masks) or rpn "
                              "(needs MODEL.REGIONSPOT.RPN_WEIGHTS)")
    regions.add_argument("--points", nargs="+", metavar="X,Y[,LABEL]", type=parse_point,
                         help="clicks on one object in every input (pixels; LABEL 1 positive (default), 0 negative): "
                              "SAM's mask of the clicks, its box recognised")
    parser.add_argument("--mask", metavar="IMAGE",
                        help="a mask of one object as SAM's mask prompt (an image file, non-zero = object, any size "
                             "covering the photo), alone or with --points")
    parser.add_argument("--attention", action="store_true",
                        help="also write <name>_attention.png: each region's cross-attention maps (paper Fig. 4)")
    parser.add_argument("--attention-regions", type=int, default=4,
                        help="regions shown in the attention figure (best scores first; default 4)")
    parser.add_argument("--min-score", type=float, default=0.0,
                        help="keep regions whose score (proposal score x class probability) is at least this")
    parser.add_argument("--vocabulary", default="lvis",
                        help=f"{', '.join(BUILTIN_VOCABULARIES)}, custom (with --custom-vocabulary), or the name of a "
                             f"registered dataset (e.g. one given with --register) to use its categories")
    parser.add_argument("--custom-vocabulary", default="", help='comma-separated names, e.g. "cat,dog,sofa"')
    parser.add_argument("--output", required=True, help="folder for the drawn images and JSON files")
    parser.add_argument("--no-masks", action="store_true", help="draw boxes and labels only")
    parser.add_argument("--untrained-head", action="store_true",
                        help="allow an empty MODEL.WEIGHTS: recognise with a randomly initialised head on purpose "
                             "(its labels are chance); refused otherwise")
    add_register_argument(parser)
    add_debug_argument(parser)
    parser.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch",
                        help="pytorch (default): the config's model; onnxruntime: the export in --onnx-dir "
                             "(--boxes only)")
    parser.add_argument("--onnx-dir", metavar="FOLDER",
                        help="with --backend onnxruntime: a folder written by regionspot-export onnx")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def parse_point(text: str):
    """``"X,Y"`` or ``"X,Y,LABEL"`` -> (x, y, label) with label 1 (positive) or 0 (negative)."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or (len(values) == 3 and values[2] not in (0, 1)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected X,Y or X,Y,LABEL with LABEL 1 or 0")
    return values[0], values[1], int(values[2]) if len(values) == 3 else 1


def read_mask(path: str) -> np.ndarray:
    """``--mask``: (H, W) bool, True where the image file is non-zero."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L")) > 0
    except FileNotFoundError:
        raise InputError(f"--mask file not found: {path!r}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"--mask {path!r} is not an image: {e}") from None
    if not mask.any():
        raise InputError(f"--mask {path!r} is empty (no non-zero pixel)")
    return mask


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    if args.proposals == "rpn" and not cfg.MODEL.REGIONSPOT.RPN_WEIGHTS:
        raise ValueError("--proposals rpn needs the RPN's weights: add --opts MODEL.REGIONSPOT.RPN_WEIGHTS FILE "
                         "(and the RPN's architecture keys, see configs/eval_lvis_rpn.yaml)")
    if not cfg.MODEL.WEIGHTS and not args.untrained_head:
        raise ValueError("MODEL.WEIGHTS is empty: add --opts MODEL.WEIGHTS FILE (a RegionSpot checkpoint, released or "
                         "written by train_net.py), or pass --untrained-head to recognise with a randomly initialised "
                         "head on purpose")
    cfg.freeze()
    return cfg


def check_images(paths, box_table, boxes_file):
    """Every input image exists and is an image; with ``--boxes``, each has valid boxes there.

    Checked before any model is loaded or any output written, from the files' headers (no
    pixels decoded). Every problem is listed, one per image.

    Returns:
        ``{path: (N, 4) float32 boxes}`` (XYXY_ABS pixels of the image) with ``--boxes``, else ``{}``.

    Raises:
        InputError: one or more images are missing, unreadable, or lack valid boxes.
    """
    problems, boxes = [], {}
    if not paths:
        raise InputError("--input matched no file")
    for path in paths:
        try:
            size = image_size(path)
            if box_table is not None:
                key, raw = boxes_for(box_table, path, boxes_file)
                boxes[path] = check_boxes(raw, size, f"the boxes of {key!r} in {boxes_file}")
        except InputError as e:
            problems.append(str(e))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"{len(problems)} of {len(paths)} input image(s) cannot be used, nothing was computed: "
                         f"{shown}")
    return boxes


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
    targets = [(path, os.path.realpath(os.path.join(output, stem + ext))) for path, stem in plan.items()
               for ext in (".jpg", ".json", "_attention.png")]
    for path, target in targets + [("(the log)", os.path.realpath(os.path.join(output, LOG_FILE)))]:
        if target in inputs:
            raise InputError(f"writing {target} would overwrite the input image {path!r}; choose another --output")
    check_writable_folder(output, "--output")
    return plan


def check_writable_folder(folder: str, what: str) -> None:
    """``folder`` is a writable folder, or can be created: checked without creating anything.

    Raises:
        InputError: ``folder`` (or the first existing folder above it) is a file or cannot be
            written.
    """
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{what} {folder!r} cannot be written: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {folder!r} cannot be written: no write permission on {existing!r}")


def draw(image: np.ndarray, predictions, draw_masks: bool) -> np.ndarray:
    """Draw predictions with Detectron2's Visualizer; returns an (H, W, 3) uint8 RGB array
    (:func:`regionspot.drawing.draw_predictions`)."""
    return draw_predictions(image, predictions, draw_masks)


def _prog() -> str:
    """The name in error lines: ``regionspot-demo`` for the console script, else ``demo.py``."""
    return "regionspot-demo" if sys.argv and os.path.basename(sys.argv[0]) == "regionspot-demo" else "demo.py"


def main(argv=None) -> int:
    """The demo's command line; returns the exit code (0; 1 if an image failed; 2 for an input
    error, reported in one line before any model is loaded)."""
    args = get_parser().parse_args(argv)
    setup_logging()
    return run_entry_point(lambda: run(args), _prog(), args.debug)


def run(args) -> int:
    """Check every input, load the model, then recognise and draw each image."""
    if not (args.boxes or args.proposals or args.points or args.mask):
        raise InputError("give the regions: --boxes FILE, --proposals sam_auto|rpn, --points X,Y ... or --mask IMAGE")
    if args.mask and (args.boxes or args.proposals):
        raise InputError("--mask is a prompt of one object: use it alone or with --points, not with "
                         "--boxes or --proposals")
    onnx = args.backend == "onnxruntime"
    if onnx and (not args.onnx_dir or not args.boxes or args.points or args.mask or args.attention):
        raise InputError("--backend onnxruntime needs --onnx-dir FOLDER (written by regionspot-export onnx) and "
                         "--boxes FILE; it has no --proposals, --points, --mask or --attention")
    if onnx and not os.path.isfile(os.path.join(args.onnx_dir, "manifest.json")):
        raise InputError(f"--onnx-dir {args.onnx_dir!r} has no manifest.json: write the folder with "
                         f"regionspot-export onnx")
    mask = read_mask(args.mask) if args.mask else None
    register_from_args(args.register)
    box_table = read_boxes_file(args.boxes) if args.boxes else None
    vocabulary = vocabulary_by_name(args.vocabulary, args.custom_vocabulary or None)
    cfg = None if onnx else setup_cfg(args)
    paths = expand_inputs(args.input)
    given_boxes = check_images(paths, box_table, args.boxes)
    plan = plan_outputs(paths, args.output)
    os.makedirs(args.output, exist_ok=True)
    setup_logging(os.path.join(args.output, LOG_FILE))  # everything from here on is also in the log file
    if onnx:
        from regionspot.deploy import OnnxRegionSpotPredictor

        predictor = OnnxRegionSpotPredictor(args.onnx_dir, vocabulary=vocabulary)
        head = predictor.manifest["head"]
        weights = {"onnx_dir": os.path.abspath(args.onnx_dir), "head": head["weights"], "sha256": head["sha256"]}
        logger.info("ONNX Runtime (%s): %s, head %s", ", ".join(predictor.providers), args.onnx_dir, head["weights"])
    else:
        predictor = RegionSpotPredictor.from_config(cfg, vocabulary=vocabulary,
                                                    allow_untrained_head=args.untrained_head)
        weights = head_weights_record(cfg.MODEL.WEIGHTS)
    if onnx:
        pass  # the folder's head, logged above
    elif cfg.MODEL.WEIGHTS:
        logger.info("head: %s", weights)
    else:
        logger.warning("--untrained-head: recognising with a randomly initialised head; its labels are chance")
    import cv2

    failures = []
    for path in paths:
        start = time.perf_counter()
        try:
            image = read_image(path, "RGB")
            predictor.set_image(image)
            attention = args.attention
            if onnx:
                predictions = predictor.predict(given_boxes[path].numpy())
            elif box_table is not None:
                predictions = predictor.predict(given_boxes[path], return_attention=attention)
            elif args.points or mask is not None:
                points = [p[:2] for p in args.points] if args.points else None
                labels = [p[2] for p in args.points] if args.points else None
                predictions = predictor.predict(points=points, point_labels=labels, mask=mask,
                                                return_attention=attention)
            else:
                predictions = predictor.predict(proposals=args.proposals, return_attention=attention)
            predictions = predictions.above_score(args.min_score, key="--min-score", where=path)
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
        atomic_write(os.path.join(args.output, f"{stem}.jpg"), lambda f, encoded=encoded: f.write(encoded.tobytes()))
        if args.attention and len(predictions.labels):
            shown = predictions.select(predictions.scores.argsort(descending=True)[:max(1, args.attention_regions)])
            figure = attention_figure(image, shown.boxes, shown.attention,
                                      [f"{label} {score:.2f}" for label, score in zip(shown.labels, shown.scores)])
            ok, png = cv2.imencode(".png", figure[:, :, ::-1])
            if ok:
                atomic_write(os.path.join(args.output, f"{stem}_attention.png"),
                             lambda f, png=png: f.write(png.tobytes()))
        write_json_atomic(os.path.join(args.output, f"{stem}.json"),
                          {"image": path, "height": image.shape[0], "width": image.shape[1], "weights": weights,
                           "predictions": predictions.to_json(), "filters": predictions.filters.as_dict()})
        logger.info("%s: %d boxes in %.2fs -> %s", path, len(predictions.labels),
                    time.perf_counter() - start, os.path.join(args.output, stem + ".jpg"))
    if failures:
        logger.error("%d image(s) failed: %s", len(failures), ", ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
