"""Every proposal source end to end through `train_net.py --eval-only` on the bundled sample:
detector files in the three formats (jittered ground truth must beat random boxes), the RPN
with random weights in Detectron2's checkpoint formats, SAM's automatic masks; the four
evaluation configs as written; clear errors for files and weights that do not fit."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

import train_net
from conftest import REPO
from regionspot.config import load_config
from regionspot.data.datasets.regionspot_sample import (
    _load_sample_dicts,
    prepare_regionspot_sample,
    sample_vocabulary_metadata,
)
from regionspot.data.proposal_files import ProposalFileError, ProposalSet, write_proposal_file
from regionspot.modeling.weights import WeightsError
from regionspot.testing.random_backbones import write_random_rpn

DATASET = "regionspot_sample_proposals"
FORMATS = ("glip", "coco", "detectron2")
# A small ResNet-18-FPN RPN: the family of configs/eval_lvis_rpn.yaml, cheap on a CPU.
SMALL_RPN = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "32",
             "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The sample registered under its own name, and its ground-truth boxes per image."""
    root = str(tmp_path_factory.mktemp("sample"))
    json_path, _ = prepare_regionspot_sample(root)
    DatasetCatalog.register(DATASET, lambda: _load_sample_dicts(root))
    MetadataCatalog.get(DATASET).set(json_file=json_path, image_root=os.path.join(root, "images"),
                                     evaluator_type="lvis", **sample_vocabulary_metadata())
    data = json.load(open(json_path))
    yield data
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def _proposals(sample, kind, seed=0):
    """Per image: ground-truth boxes jittered by up to 10% of their size, or random boxes."""
    rng = np.random.RandomState(seed)
    sizes = {im["id"]: (im["width"], im["height"]) for im in sample["images"]}
    boxes = {str(i): [] for i in sizes}
    for ann in sample["annotations"]:
        w_img, h_img = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        if kind == "jittered":
            x, y = x + rng.uniform(-0.1, 0.1) * w, y + rng.uniform(-0.1, 0.1) * h
            w, h = w * rng.uniform(0.9, 1.1), h * rng.uniform(0.9, 1.1)
        else:
            w, h = rng.uniform(0.05, 0.5) * w_img, rng.uniform(0.05, 0.5) * h_img
            x, y = rng.uniform(0, w_img - w), rng.uniform(0, h_img - h)
        x0, y0 = max(0.0, x), max(0.0, y)
        boxes[str(ann["image_id"])].append([x0, y0, min(w_img, x + w), min(h_img, y + h)])
    scores = {k: rng.uniform(0.3, 0.9, len(v)) for k, v in boxes.items()}
    return ProposalSet("memory", "glip", boxes=boxes, scores=scores)


def _eval(out, sam_path, clip_path, *opts, config="configs/regionspot_sample_cpu.yaml"):
    argv = ["--config-file", os.path.join(REPO, config), "--eval-only", "--untrained-head",
            "MODEL.DEVICE", "cpu", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", os.path.join(os.path.dirname(out), "cache"), "OUTPUT_DIR", out,
            "MODEL.REGIONSPOT.VOCABULARY", "dataset", "DATASETS.TEST", f"('{DATASET}',)",
            "INPUT.MIN_SIZE_TEST", "448", "INPUT.MAX_SIZE_TEST", "853", "DATALOADER.NUM_WORKERS", "0", *opts]
    train_net.main(train_net.get_parser().parse_args(argv))
    return json.load(open(os.path.join(out, "inference", DATASET, "metrics.json")))


@pytest.fixture(autouse=True)
def repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def test_detector_files_in_every_format(tmp_path, sample, sam_path, clip_path):
    """Jittered ground truth scores clearly above random boxes, identically in all three formats."""
    ap = {}
    for kind in ("jittered", "random"):
        proposals = _proposals(sample, kind)
        for fmt in FORMATS:
            path = write_proposal_file(proposals, str(tmp_path / f"{kind}.{fmt}"), fmt)
            m = _eval(str(tmp_path / f"{kind}_{fmt}"), sam_path, clip_path, "MODEL.REGIONSPOT.PROPOSALS", "file",
                      "MODEL.REGIONSPOT.PROPOSAL_FILE", path)
            assert m["proposals"] == "file" and m["protocol"]["proposal_file"] == path
            assert f"file {os.path.basename(path)}" in m["protocol"]["description"]
            assert m["proposal_coverage"]["format"] == fmt and m["proposal_coverage"]["images_without_proposals"] == 0
            ap[kind, fmt] = m["results"]["bbox"]["AP"]
    for kind in ("jittered", "random"):  # the same boxes and scores in every format
        assert ap[kind, "glip"] == pytest.approx(ap[kind, "coco"], abs=0.05) == pytest.approx(ap[kind, "detectron2"],
                                                                                               abs=0.05)
    assert ap["jittered", "glip"] > 15 and ap["jittered", "glip"] > 5 * max(ap["random", "glip"], 1.0), ap


def test_missing_and_unknown_images_are_reported(tmp_path, sample, sam_path, clip_path, capsys):
    proposals = _proposals(sample, "jittered")
    boxes, scores = dict(proposals.boxes), dict(proposals.scores)
    dropped = sorted(boxes)[0]
    del boxes[dropped], scores[dropped]
    boxes["999999"], scores["999999"] = np.array([[0, 0, 10, 10]], np.float32), np.array([0.5], np.float32)
    path = write_proposal_file(ProposalSet("memory", "glip", boxes=boxes, scores=scores), str(tmp_path / "p.json"),
                               "glip")
    m = _eval(str(tmp_path / "run"), sam_path, clip_path, "MODEL.REGIONSPOT.PROPOSALS", "file",
              "MODEL.REGIONSPOT.PROPOSAL_FILE", path)
    coverage = m["proposal_coverage"]
    assert coverage["images_without_proposals"] == 1 and coverage["missing_image_ids"] == [int(dropped)]
    assert coverage["file_images_not_in_dataset"] == 1 and coverage["unknown_image_ids"] == [999999]
    console = capsys.readouterr().out  # what a person sees
    assert "have no entry in the file" in console and "not in the dataset" in console
    detections = json.load(open(tmp_path / "run" / "inference" / DATASET / "lvis_instances_results.json"))
    assert int(dropped) not in {d["image_id"] for d in detections}


def test_malformed_files_are_refused_before_any_image(tmp_path, sample, sam_path, clip_path):
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps({"1": {"boxes": [[0, 0, 10, 10]], "scores": [float("nan")]}}))
    with pytest.raises(ProposalFileError, match="nan.json.*image 1"):
        _eval(str(tmp_path / "a"), sam_path, clip_path, "MODEL.REGIONSPOT.PROPOSALS", "file",
              "MODEL.REGIONSPOT.PROPOSAL_FILE", str(nan))
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"123456": {"boxes": [[0, 0, 10, 10]], "scores": [0.5]}}))
    with pytest.raises(ProposalFileError, match="foreign.json.*matches no image"):
        _eval(str(tmp_path / "b"), sam_path, clip_path, "MODEL.REGIONSPOT.PROPOSALS", "file",
              "MODEL.REGIONSPOT.PROPOSAL_FILE", str(foreign))
    with pytest.raises(ValueError, match="PROPOSAL_FILE"):
        _eval(str(tmp_path / "c"), sam_path, clip_path, "MODEL.REGIONSPOT.PROPOSALS", "file")


@pytest.fixture(scope="module")
def rpn_weights(tmp_path_factory):
    """Random small RPNs written as a Detectron2 checkpoint (.pth) and a model-zoo pickle (.pkl)."""
    folder = tmp_path_factory.mktemp("rpn")
    cfg = load_config(os.path.join(REPO, "configs", "eval_lvis_rpn.yaml"), SMALL_RPN)
    return {fmt: write_random_rpn(str(folder / f"rpn_r18.{fmt}"), cfg, seed=0, fmt=fmt) for fmt in ("pth", "pkl")}


def test_every_evaluation_config_runs_as_written(tmp_path, sample, sam_path, clip_path, rpn_weights):
    """configs/eval_lvis_{gt,glip,rpn,sam_auto}.yaml with small random backbones and the sample."""
    path = write_proposal_file(_proposals(sample, "jittered"), str(tmp_path / "glip.json"), "glip")
    extra = {
        "gt": [],
        "glip": ["MODEL.REGIONSPOT.PROPOSAL_FILE", path],
        "rpn": SMALL_RPN + ["MODEL.REGIONSPOT.RPN_WEIGHTS", rpn_weights["pkl"]],
        "sam_auto": ["MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", "4", "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH",
                     "0.0", "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH", "0.0"],
    }
    expected_source = {"gt": "gt", "glip": "file", "rpn": "rpn", "sam_auto": "sam_auto"}
    for name, opts in extra.items():
        m = _eval(str(tmp_path / name), sam_path, clip_path, "MODEL.WEIGHTS", "", *opts,
                  config=f"configs/eval_lvis_{name}.yaml")
        assert m["proposals"] == expected_source[name], name
        assert {"AP", "APr", "APc", "APf"} <= set(m["results"]["bbox"]), name
        assert ("segm" in m["results"]) == (name in ("glip", "sam_auto")), name  # Table 6: masks with GLIP
        detections = json.load(open(tmp_path / name / "inference" / DATASET / "lvis_instances_results.json"))
        assert detections and all(d["score"] <= 1 for d in detections), name


def test_rpn_from_a_detectron2_checkpoint_gives_its_own_boxes(tmp_path, sample, sam_path, clip_path, rpn_weights):
    m = _eval(str(tmp_path / "rpn"), sam_path, clip_path, "MODEL.REGIONSPOT.PROPOSALS", "rpn",
              "MODEL.REGIONSPOT.RPN_WEIGHTS", rpn_weights["pth"], "MODEL.REGIONSPOT.PROPOSAL_TOPK", "20",
              *SMALL_RPN, *_rpn_architecture())
    assert m["protocol"]["proposal_topk"] == 20 and "RPN rpn_r18.pth (top 20 per image)" in m["protocol"]["description"]
    detections = json.load(open(tmp_path / "rpn" / "inference" / DATASET / "lvis_instances_results.json"))
    gt_boxes = {tuple(a["bbox"]) for a in sample["annotations"]}
    assert not any(tuple(d["bbox"]) in gt_boxes for d in detections)  # its own boxes, not the ground truth
    per_image = {}
    for d in detections:
        per_image.setdefault(d["image_id"], set()).add(tuple(d["bbox"]))
    assert max(len(b) for b in per_image.values()) <= 20


def _rpn_architecture():
    """The R-FPN keys of configs/eval_lvis_rpn.yaml, for the sample config."""
    cfg = load_config(os.path.join(REPO, "configs", "eval_lvis_rpn.yaml"))
    return ["MODEL.BACKBONE.NAME", cfg.MODEL.BACKBONE.NAME,
            "MODEL.RESNETS.OUT_FEATURES", str(list(cfg.MODEL.RESNETS.OUT_FEATURES)),
            "MODEL.FPN.IN_FEATURES", str(list(cfg.MODEL.FPN.IN_FEATURES)),
            "MODEL.ANCHOR_GENERATOR.SIZES", str([list(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES]),
            "MODEL.RPN.IN_FEATURES", str(list(cfg.MODEL.RPN.IN_FEATURES))]


def test_rpn_weights_that_do_not_fit_are_refused(tmp_path, sample, sam_path, clip_path, rpn_weights):
    from detectron2.modeling import build_model

    cfg = load_config(os.path.join(REPO, "configs", "eval_lvis_rpn.yaml"),
                      ["MODEL.DEVICE", "cpu", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path,
                       "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.RPN_WEIGHTS", rpn_weights["pth"]])
    with pytest.raises(WeightsError, match=r"rpn_r18.pth.*does not fit.*(missing|shape)"):
        build_model(cfg)  # an R-18 file for the R-50 RPN of the config
    cfg.MODEL.REGIONSPOT.RPN_WEIGHTS = sam_path
    with pytest.raises(WeightsError, match="sam_random_tiny.pth.*does not fit.*missing"):
        build_model(cfg)  # SAM's weights are not an RPN
    cfg.MODEL.REGIONSPOT.RPN_WEIGHTS = str(tmp_path / "absent.pkl")
    with pytest.raises(WeightsError, match="absent.pkl.*RPN_WEIGHTS.*model_final_02ce48"):
        build_model(cfg)
    cfg.MODEL.REGIONSPOT.RPN_WEIGHTS = ""
    with pytest.raises(WeightsError, match="not found: ''.*RPN_WEIGHTS"):
        build_model(cfg)


def test_rpn_weights_load_exactly(sample, rpn_weights):
    """Both checkpoint formats load every tensor of the file into the RPN."""
    from regionspot.modeling.proposals.rpn import RPNProposalGenerator

    cfg = load_config(os.path.join(REPO, "configs", "eval_lvis_rpn.yaml"), SMALL_RPN)
    reference = torch.load(rpn_weights["pth"], weights_only=True)["model"]
    for fmt in ("pth", "pkl"):
        state = RPNProposalGenerator(cfg, rpn_weights[fmt]).state_dict()
        assert set(state) == set(reference)
        assert all(torch.equal(state[k], reference[k]) for k in reference)
