"""Export region embeddings (the head's output per region, in the vision-language model's space)
and search them: text query -> nearest regions across the images; region -> nearest regions.

Export, from a registered dataset (its annotation boxes) or a folder of images with boxes:

    python tools/export_region_embeddings.py --config-file configs/regionspot_bl.yaml \\
        --dataset lvis_v1_val --max-images 500 --output out/embeddings --opts MODEL.WEIGHTS regionspot_bl.pth
    python tools/export_region_embeddings.py --config-file ... --input "photos/*.jpg" \\
        --boxes boxes.json --output out/embeddings --opts MODEL.WEIGHTS ...
    python tools/export_region_embeddings.py --config-file ... --input "photos/*.jpg" \\
        --proposals sam_auto --output out/embeddings --opts MODEL.WEIGHTS ...

``--boxes`` is the demo's format (``{image path or file name: [[x0, y0, x1, y1], ...]}``).
It writes two files into ``--output`` (each atomically):

- ``region_embeddings.safetensors``: ``embeddings`` (R, E) float32 rows of unit L2 norm
  (:meth:`regionspot.RegionSpotPredictor.embed`), ``boxes`` (R, 4) float32 XYXY_ABS pixels of
  their image, ``image_index`` (R,) int64 row of ``images`` in the index;
- ``region_embeddings.json``, the index: ``format``, ``version``, the model (``config_file``,
  ``weights``, ``pair`` (localizer / vision-language model), ``embed_dim``, ``logit_scale``,
  ``class_score``), ``images`` (file name, height, width, image id) and ``regions`` (image row,
  box, and the annotation's ``category`` for a dataset).

Search (``--search FOLDER``, with the same config: the stored embeddings are compared with the
config's vision-language model, refused when it is not the one that made them):

    python tools/export_region_embeddings.py --config-file ... --search out/embeddings --text "a red umbrella"
    python tools/export_region_embeddings.py --config-file ... --search out/embeddings --region 12
    python tools/export_region_embeddings.py --config-file ... --search out/embeddings --classify "cat,dog,sofa"

``--text``: cosine between the query's text embedding (the model's prompt ensemble) and every
region; ``--region K``: cosine between region K and every other region; ``--classify``: each
region's best class in a new vocabulary, scored exactly as the model scores live
(``LOGIT_SCALE x cosine``, then ``TEST_SCORE``: :func:`regionspot.predictor.score_embeddings`).
Each prints the ``--top`` best. Errors print one line and exit with status 2.
"""

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

from regionspot.model_zoo import resolve_config_file
from regionspot.tools.common import ToolError, load_config, run_tool

PROG = "export_region_embeddings.py"
TENSORS = "region_embeddings.safetensors"
INDEX = "region_embeddings.json"
FORMAT = "regionspot-region-embeddings"
VERSION = 1
logger = logging.getLogger("regionspot.export_region_embeddings")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    from regionspot.cli import add_debug_argument
    from regionspot.data.datasets.user import add_register_argument

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="RegionSpot config (yaml)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", help="a registered dataset: embed its annotation boxes")
    source.add_argument("--input", nargs="+", help="image paths or glob patterns (with --boxes or --proposals)")
    source.add_argument("--search", metavar="FOLDER", help="search an export instead (with --text, --region or "
                                                             "--classify)")
    parser.add_argument("--boxes", help="with --input: JSON {image: [[x0, y0, x1, y1], ...]} (the demo's format)")
    parser.add_argument("--proposals", choices=("sam_auto",), help="with --input: SAM's automatic masks' boxes")
    parser.add_argument("--max-images", type=int, default=0, help="with --dataset: the first N images only (0: all)")
    parser.add_argument("--output", help="folder for region_embeddings.safetensors and region_embeddings.json")
    query = parser.add_mutually_exclusive_group()
    query.add_argument("--text", help="with --search: the regions nearest to this text")
    query.add_argument("--region", type=int, help="with --search: the regions nearest to region K")
    query.add_argument("--classify", help='with --search: label every region with this vocabulary ("a,b,c")')
    parser.add_argument("--top", type=int, default=5, help="results shown (default 5)")
    parser.add_argument("--untrained-head", action="store_true",
                        help="allow an empty MODEL.WEIGHTS (a randomly initialised head, on purpose)")
    add_register_argument(parser)
    add_debug_argument(parser)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


# ----------------------------------------------------------------------------- export
def dataset_items(name: str, max_images: int) -> List[Dict]:
    """(file name, boxes, categories, image id) of a registered dataset's images with boxes."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from regionspot.transforms import annotation_boxes_xyxy

    if name not in DatasetCatalog.list():
        raise ToolError(f"--dataset {name!r} is not registered (register one with --register NAME JSON IMAGE_ROOT)")
    classes = MetadataCatalog.get(name).get("thing_classes", None)
    items = []
    for record in DatasetCatalog.get(name):
        annotations = [a for a in record.get("annotations", []) if a.get("iscrowd", 0) == 0]
        if not annotations:
            continue
        classes = classes or MetadataCatalog.get(name).get("thing_classes", None)
        items.append({"file_name": record["file_name"], "image_id": record.get("image_id"),
                      "boxes": annotation_boxes_xyxy(annotations).tolist(),
                      "categories": [classes[a["category_id"]] if classes else int(a["category_id"])
                                     for a in annotations]})
        if max_images and len(items) >= max_images:
            break
    if not items:
        raise ToolError(f"--dataset {name!r} has no image with annotation boxes")
    return items


def export(args) -> int:
    """Embed every region and write the two files."""
    import torch
    from safetensors.torch import save

    from regionspot.cli import boxes_for
    from regionspot.data.validation import InputError, check_boxes, image_size, read_image
    from regionspot.engine.trainer import head_weights_record
    from regionspot.io import atomic_write, write_json_atomic
    from regionspot.predictor import RegionSpotPredictor

    if not args.output:
        raise ToolError("--output FOLDER is needed to export")
    if args.dataset:
        if args.boxes or args.proposals:
            raise ToolError("--dataset embeds the dataset's annotation boxes: drop --boxes / --proposals")
        items = dataset_items(args.dataset, args.max_images)
    else:
        if bool(args.boxes) == bool(args.proposals):
            raise ToolError("--input needs either --boxes FILE or --proposals sam_auto")
        items = []
        table = read_boxes_table(args.boxes) if args.boxes else None
        for path in expand(args.input):
            try:
                size = image_size(path)
                boxes = None
                if table is not None:
                    key, given = boxes_for(table, path, args.boxes)
                    boxes = check_boxes(given, size, f"the boxes of {key!r} in {args.boxes}").tolist()
            except InputError as e:
                raise ToolError(str(e)) from None
            items.append({"file_name": path, "image_id": None, "boxes": boxes, "categories": None})
    cfg = load_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS and not args.untrained_head:
        raise ToolError("MODEL.WEIGHTS is empty: add --opts MODEL.WEIGHTS FILE, or --untrained-head on purpose")
    predictor = RegionSpotPredictor.from_config(cfg, allow_untrained_head=args.untrained_head)
    from tqdm import tqdm

    embeddings, boxes, image_index, images, regions = [], [], [], [], []
    for item in tqdm(items, desc="region embeddings", unit="image", disable=not sys.stderr.isatty()):
        image = read_image(item["file_name"], "RGB")
        predictor.set_image(image)
        if item["boxes"] is not None:
            b = torch.as_tensor(item["boxes"], dtype=torch.float32).reshape(-1, 4)
            e = predictor.embed(b) if len(b) else torch.zeros(0, predictor.model.semantic_encoder.embed_dim)
        else:
            out = predictor.predict(proposals=args.proposals, vocabulary=["object"])
            b, e = out.boxes, out.embeddings
        row = len(images)
        images.append({"file_name": item["file_name"], "image_id": item["image_id"], "height": image.shape[0],
                       "width": image.shape[1]})
        for j, box in enumerate(b.tolist()):
            region = {"image": row, "box_xyxy": [round(v, 2) for v in box]}
            if item["categories"] is not None:
                region["category"] = item["categories"][j]
            regions.append(region)
        embeddings.append(e.float())
        boxes.append(b.float())
        image_index.append(torch.full((len(b),), row, dtype=torch.int64))
    tensors = {"embeddings": torch.cat(embeddings).contiguous(), "boxes": torch.cat(boxes).contiguous(),
               "image_index": torch.cat(image_index).contiguous()}
    blob = save(tensors)
    atomic_write(os.path.join(args.output, TENSORS), lambda f: f.write(blob))
    write_json_atomic(os.path.join(args.output, INDEX), {
        "format": FORMAT, "version": VERSION, "config_file": os.path.abspath(resolve_config_file(args.config_file)),
        "weights": head_weights_record(cfg.MODEL.WEIGHTS), "pair": predictor.model.pair,
        "embed_dim": int(tensors["embeddings"].shape[1]), "logit_scale": float(predictor.model.logit_scale),
        "class_score": predictor.protocol.class_score,
        "source": args.dataset or (args.boxes and "boxes") or args.proposals,
        "images": images, "regions": regions})
    print(f"{len(regions)} regions of {len(images)} images -> {os.path.join(args.output, TENSORS)} "
          f"(+ {INDEX}); embeddings (R, E) = {tuple(tensors['embeddings'].shape)}", flush=True)
    return 0


def expand(patterns: Sequence[str]) -> List[str]:
    """Paths of ``--input`` in the order given (the demo's :func:`~regionspot.cli.expand_inputs`)."""
    from regionspot.cli import expand_inputs

    paths = expand_inputs(patterns)
    if not paths:
        raise ToolError("--input matched no file")
    return paths


def read_boxes_table(path: str) -> dict:
    """The --boxes JSON object (the demo's format, :func:`~regionspot.cli.read_boxes_file`)."""
    from regionspot.cli import read_boxes_file

    return read_boxes_file(path)


# ----------------------------------------------------------------------------- search
class RegionStore:
    """An export read back: ``embeddings`` (R, E) float32, ``boxes`` (R, 4), ``image_index``
    (R,) int64 and the ``index`` dict (:data:`INDEX`).

    Raises:
        ToolError: the folder lacks the files, or they are not an export of this format.
    """

    def __init__(self, folder: str):
        from safetensors.torch import load_file

        index_path, tensors_path = os.path.join(folder, INDEX), os.path.join(folder, TENSORS)
        for path in (index_path, tensors_path):
            if not os.path.isfile(path):
                raise ToolError(f"--search {folder!r}: {os.path.basename(path)} not found (write it with --output)")
        with open(index_path) as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ToolError(f"{index_path} is not a {FORMAT} index of version {VERSION}")
        tensors = load_file(tensors_path)
        self.embeddings, self.boxes, self.image_index = tensors["embeddings"], tensors["boxes"], tensors["image_index"]
        if len(self.embeddings) != len(self.index["regions"]):
            raise ToolError(f"{folder}: {len(self.embeddings)} embeddings but {len(self.index['regions'])} regions "
                            "in the index")

    def describe(self, r: int) -> str:
        region = self.index["regions"][r]
        image = self.index["images"][region["image"]]
        category = f" [{region['category']}]" if "category" in region else ""
        return f"region {r}{category}: {os.path.basename(image['file_name'])} box {region['box_xyxy']}"


def nearest(embeddings, query, top: int, exclude: Optional[int] = None):
    """(cosines, indices) of the ``top`` rows of ``embeddings`` (R, E, unit rows) nearest to
    ``query`` (E,) by cosine, best first (``exclude``: a row left out)."""
    import torch

    cosines = embeddings.float() @ torch.nn.functional.normalize(query.float(), dim=0)
    if exclude is not None:
        cosines[exclude] = float("-inf")
    k = min(top, len(cosines) - (exclude is not None))
    values, indices = cosines.topk(max(k, 0))
    return values.tolist(), indices.tolist()


def search(args) -> int:
    """Print the regions nearest to a text or a region, or label them with a vocabulary."""
    from regionspot.data.vocabularies import check_vocabulary
    from regionspot.modeling.backbones import build_vl_model
    from regionspot.predictor import score_embeddings

    store = RegionStore(args.search)
    if args.region is None and args.text is None and args.classify is None:
        raise ToolError("--search needs --text QUERY, --region K or --classify \"a,b,c\"")
    if args.region is not None:
        if not 0 <= args.region < len(store.embeddings):
            raise ToolError(f"--region {args.region}: the export has regions 0..{len(store.embeddings) - 1}")
        values, indices = nearest(store.embeddings, store.embeddings[args.region], args.top, exclude=args.region)
        print(f"nearest to {store.describe(args.region)}:")
        for v, i in zip(values, indices):
            print(f"  cosine {v:+.4f}  {store.describe(i)}")
        return 0
    cfg = load_config(args.config_file, args.opts, cpu_fallback=True)
    _, text_classifier, vl_identity = build_vl_model(cfg)
    # text is scored in the VL model's space: the localizer (and its name in the pair) does not matter here
    exported = (store.index.get("pair") or {}).get("vl_model")
    if exported != vl_identity:
        raise ToolError(f"the export was made with the vision-language model {exported!r}, this config gives "
                        f"{vl_identity!r}: text embeddings of another model do not live in the same space")
    device = "cpu"
    if args.text is not None:
        text = text_classifier.embed(check_vocabulary([args.text], "--text"), device)[0].cpu()
        values, indices = nearest(store.embeddings, text, args.top)
        print(f"nearest to the text {args.text!r}:")
        for v, i in zip(values, indices):
            print(f"  cosine {v:+.4f}  {store.describe(i)}")
        return 0
    names = check_vocabulary([n.strip() for n in args.classify.split(",") if n.strip()], "--classify")
    text = text_classifier.embed(names, device).cpu()
    probabilities = score_embeddings(store.embeddings, text, store.index["logit_scale"], store.index["class_score"])
    best, classes = probabilities.max(dim=1)
    order = best.argsort(descending=True)[:args.top].tolist()
    print(f"{len(names)} classes, the {len(order)} most confident regions:")
    for i in order:
        print(f"  {names[int(classes[i])]} {float(best[i]):.4f}  {store.describe(i)}")
    return 0


def run(args) -> int:
    from regionspot.data.datasets.user import register_from_args
    from regionspot.engine.launch import env_world_size

    if env_world_size() > 1:  # every process would write the same files: one export is one process
        raise ToolError(f"started by torchrun with WORLD_SIZE={env_world_size()}: the export runs in one process "
                        "(its files are written once); run it without torchrun, or with --nproc-per-node 1")
    register_from_args(args.register)
    if args.search:
        return search(args)
    if not (args.dataset or args.input):
        raise ToolError("give --dataset NAME or --input IMAGES (to export), or --search FOLDER")
    return export(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status (2 for bad input, with one error line)."""
    args = build_parser().parse_args(argv)
    return run_tool(lambda: run(args), PROG, args.debug)


if __name__ == "__main__":
    sys.exit(main())
