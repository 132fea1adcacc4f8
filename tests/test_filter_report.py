"""No silent empty result: every step that drops candidates says how many, and which key
controls it, in the log (one line) and in the output (predictor, demo JSON, metrics.json).

The random tiny SAM predicts IoUs of about 0.1 for every mask, so SAM's own default
``SAM_AUTO.PRED_IOU_THRESH`` (0.88) removes every mask: the situation of a real photo on
which SAM is not confident, reproduced without pretrained weights."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from regionspot.filter_report import FilterReport
from regionspot.modeling.postprocess import RecognitionProtocol, select_detections

pytestmark = pytest.mark.usefixtures("one_thread")

SAM_IOU_KEY = "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH"
POINTS = 4  # SAM_AUTO.POINTS_PER_SIDE: 16 point prompts, 3 masks each
GENERATED = POINTS * POINTS * 3


@pytest.fixture(scope="module")
def image():
    return (np.random.RandomState(5).rand(200, 300, 3) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def head(tiny_model, tmp_path_factory):
    """The tiny model's head written by the project's checkpointer (MODEL.WEIGHTS for the tools)."""
    from regionspot.checkpoint import RegionSpotCheckpointer

    folder = tmp_path_factory.mktemp("filter_head")
    RegionSpotCheckpointer(tiny_model, save_dir=str(folder)).save("head")
    return str(folder / "head.pth")


def _subprocess_env(tmp_path):
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                DETECTRON2_DATASETS=str(tmp_path / "datasets"))


def test_reports_sum_over_images_and_name_the_emptying_step():
    first, second = FilterReport(), FilterReport()
    first.add("sam_auto: predicted IoU", SAM_IOU_KEY, 0.88, "masks", 48, 0, "lower it")
    first.add("proposals: top-k", "MODEL.REGIONSPOT.PROPOSAL_TOPK", 1000, "boxes", 0, 0)
    second.add("sam_auto: predicted IoU", SAM_IOU_KEY, 0.88, "masks", 48, 5, "lower it")
    second.add("proposals: top-k", "MODEL.REGIONSPOT.PROPOSAL_TOPK", 1000, "boxes", 5, 5)
    line = first.warning("photo.jpg")
    assert "predicted IoU removed all 48 masks" in line and SAM_IOU_KEY in line and "\n" not in line
    assert second.warning("photo.jpg") is None
    total = FilterReport(images=0).merge(first).merge(second)
    back = FilterReport.from_dict(json.loads(json.dumps(total.as_dict())))
    iou, topk = back.steps
    assert (back.images, back.images_emptied) == (2, 1)
    assert (iou.candidates, iou.removed, iou.kept, iou.images, iou.images_emptied) == (96, 91, 5, 2, 1)
    assert (topk.candidates, topk.removed, topk.images_emptied) == (5, 0, 0)
    summary = back.summary_warning("evaluation on photos")
    assert "1 of 2 images" in summary and "removing 91 of 96 masks" in summary and SAM_IOU_KEY in summary
    with pytest.raises(ValueError, match="kept 3 of 2"):
        FilterReport().add("x", "KEY", 1, "boxes", 2, 3)


def test_sam_filters_are_counted_and_the_regions_are_sams_own(tiny_model, image, monkeypatch):
    """Every filter of SAM's generator is counted (crops, small regions included); what is left
    is exactly what SAM's own generator returns."""
    from segment_anything import SamAutomaticMaskGenerator

    settings = dict(tiny_model.proposal_generator.sam_auto.settings, points_per_side=POINTS, pred_iou_thresh=0.05,
                    stability_score_thresh=0.0, crop_n_layers=1, min_mask_region_area=20)
    monkeypatch.setattr(tiny_model.proposal_generator.sam_auto, "settings", settings)
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    features = tiny_model.encode_images([tensor])
    report = FilterReport()
    proposals = tiny_model.proposal_generator.sam_auto(tensor, features[0].sam_embedding, features[0].sam_input_size,
                                                       report=report)
    sams_own = SamAutomaticMaskGenerator(tiny_model.localizer.sam, output_mode="binary_mask", **settings)
    reference = sams_own.generate(image)  # SAM encodes the image (and its crops) itself
    assert {m.numpy().tobytes() for m in proposals.proposal_masks} == {r["segmentation"].tobytes() for r in reference}
    stages = [s.stage for s in report.steps]
    assert stages == ["sam_auto: predicted IoU", "sam_auto: masks at crop edges", "sam_auto: box NMS",
                      "sam_auto: NMS between crops (IoU 0.7)", "sam_auto: NMS after small-region clean-up"]
    assert report.steps[0].candidates == GENERATED * 5  # the whole image and 4 crops of layer 1
    for before, after in zip(report.steps, report.steps[1:]):
        assert after.candidates == before.kept
    assert report.steps[-1].kept == len(proposals) == len(reference)


def test_predictor_says_which_filter_left_nothing(tiny_model, image, caplog, monkeypatch):
    """predict(proposals="sam_auto") with SAM's default thresholds: no region, and why."""
    from regionspot.predictor import RegionSpotPredictor

    assert tiny_model.proposal_generator.sam_auto.settings["pred_iou_thresh"] == 0.88  # the config's default
    monkeypatch.setitem(tiny_model.proposal_generator.sam_auto.settings, "points_per_side", POINTS)
    predictor = RegionSpotPredictor(tiny_model, 448, 853, vocabulary=["cat", "dog"])
    predictor.set_image(image)
    with caplog.at_level("WARNING", logger="regionspot"):
        out = predictor.predict(proposals="sam_auto")
    assert out.labels == []
    step = out.filters.emptying_step()
    assert (step.stage, step.key, step.setting, step.candidates, step.removed) == (
        "sam_auto: predicted IoU", SAM_IOU_KEY, 0.88, GENERATED, GENERATED)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and SAM_IOU_KEY in warnings[0] and f"all {GENERATED} masks" in warnings[0]
    json.dumps(out.filters.as_dict())  # JSON as it is
    # given boxes are never filtered: an empty report, no warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="regionspot"):
        given = predictor.predict([[10, 10, 100, 120]])
    assert given.filters.steps == [] and not caplog.records


def test_model_outputs_carry_the_report_and_the_evaluator_sums_it(tiny_model, image, monkeypatch):
    """forward (what evaluation runs) with sam_auto: each output's "filters"; the evaluator's sum."""
    from regionspot.filter_report import FilterReportEvaluator

    monkeypatch.setattr(tiny_model.proposal_generator, "source", "sam_auto")
    monkeypatch.setitem(tiny_model.proposal_generator.sam_auto.settings, "points_per_side", POINTS)
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    inputs = [{"image": tensor, "height": 400, "width": 600}, {"image": tensor.flip(-1).contiguous()}]
    outputs = tiny_model(inputs)
    assert all(len(o["instances"]) == 0 for o in outputs)
    assert [o["filters"].emptying_step().key for o in outputs] == [SAM_IOU_KEY, SAM_IOU_KEY]
    evaluator = FilterReportEvaluator()
    evaluator.reset()
    evaluator.process(inputs, outputs)
    assert evaluator.evaluate() is None  # adds no metric beside AP
    summary = evaluator.summary
    assert (summary["images"], summary["images_emptied"], summary["images_without_detections"]) == (2, 2, 2)
    first = summary["steps"][0]
    assert (first["key"], first["candidates"], first["removed"], first["images_emptied"]) == (
        SAM_IOU_KEY, 2 * GENERATED, 2 * GENERATED, 2)
    # the protocol's selection is counted too: top-k (box, class) pairs, with nothing in
    assert summary["steps"][-1]["key"] == "MODEL.REGIONSPOT.TEST_TOPK"


def test_tap_class_threshold_that_removes_every_pair_is_reported():
    probs = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    protocol = RecognitionProtocol(selection="tap", tap_class_thresh=0.7, nms_thresh=0.5, topk=300)
    report = FilterReport()
    det = select_detections(probs, torch.ones(2), boxes, protocol, torch.ones(2), report=report)
    assert det.scores.numel() == 0
    step = report.emptying_step()
    assert (step.key, step.candidates, step.removed, step.unit) == (
        "MODEL.REGIONSPOT.TAP_CLASS_THRESH", 4, 4, "(box, class) pairs")
    assert [s.key.rsplit(".", 1)[-1] for s in report.steps] == ["TAP_CLASS_THRESH", "TEST_NMS_THRESH", "TEST_TOPK"]


def test_demo_names_the_filter_in_the_log_and_the_json(tmp_path, image, sam_path, clip_path, head):
    """The real demo, as a user runs it: --proposals sam_auto with SAM's default thresholds."""
    photo = tmp_path / "in" / "photo.png"
    photo.parent.mkdir()
    Image.fromarray(image).save(photo)
    cmd = [sys.executable, "demo/demo.py", "--config-file", "configs/regionspot_sample_cpu.yaml",
           "--input", str(photo), "--proposals", "sam_auto", "--vocabulary", "custom", "--custom-vocabulary",
           "cat,dog", "--output", str(tmp_path / "out"), "--min-score", "0.2",
           "--opts", "MODEL.WEIGHTS", head, "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path,
           "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"),
           "MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", str(POINTS)]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    lines = [line for line in console.splitlines() if SAM_IOU_KEY in line]
    assert len(lines) == 1 and "sam_auto: predicted IoU" in lines[0] and f"all {GENERATED} masks" in lines[0]
    written = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert written["predictions"] == []
    first = written["filters"]["steps"][0]
    assert (first["stage"], first["key"], first["candidates"], first["removed"], first["kept"]) == (
        "sam_auto: predicted IoU", SAM_IOU_KEY, GENERATED, GENERATED, 0)
    assert written["filters"]["images_emptied"] == 1
    # SAM's thresholds off: the regions come through and --min-score removes them, said likewise
    cmd[cmd.index("0.2")] = "0.9"
    cmd += ["MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH", "0.0",
            "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH", "0.0"]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    lines = [line for line in console.splitlines() if "--min-score" in line and "removed all" in line]
    assert len(lines) == 1 and "minimum score" in lines[0]
    written = json.loads((tmp_path / "out" / "photo.json").read_text())
    last = written["filters"]["steps"][-1]
    assert written["predictions"] == [] and (last["key"], last["setting"], last["kept"]) == ("--min-score", 0.9, 0)
    assert last["candidates"] == last["removed"] > 0


def test_evaluation_writes_the_filters_to_metrics(tmp_path, sam_path, clip_path, head):
    """train_net.py --eval-only with a detector's file whose scores are all below
    PROPOSAL_SCORE_THRESH: metrics.json says so, and the log says it once."""
    from regionspot.data.datasets.regionspot_sample import prepare_regionspot_sample
    from regionspot.data.proposal_files import ProposalSet, write_proposal_file

    json_path, _ = prepare_regionspot_sample(str(tmp_path / "datasets" / "regionspot_sample"))
    sample = json.load(open(json_path))
    boxes = {str(im["id"]): [] for im in sample["images"]}
    for ann in sample["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes[str(ann["image_id"])].append([x, y, x + w, y + h])
    scores = {k: np.full(len(v), 0.5, np.float32) for k, v in boxes.items()}
    path = write_proposal_file(ProposalSet("memory", "glip", boxes=boxes, scores=scores), str(tmp_path / "p.json"),
                               "glip")
    out = tmp_path / "eval"
    cmd = [sys.executable, "train_net.py", "--config-file", "configs/regionspot_sample_cpu.yaml", "--eval-only",
           "MODEL.WEIGHTS", head, "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
           "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"), "OUTPUT_DIR", str(out),
           "MODEL.REGIONSPOT.PROPOSALS", "file", "MODEL.REGIONSPOT.PROPOSAL_FILE", path,
           "MODEL.REGIONSPOT.PROPOSAL_SCORE_THRESH", "0.6", "MODEL.MASK_ON", "False"]
    proc = subprocess.run(cmd, cwd=REPO, env=_subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    metrics = json.load(open(out / "inference" / "regionspot_sample" / "metrics.json"))
    filters = metrics["filters"]
    n_images, n_boxes = len(sample["images"]), len(sample["annotations"])
    assert (filters["images"], filters["images_emptied"], filters["images_without_detections"]) == (
        n_images, n_images, n_images)
    step = next(s for s in filters["steps"] if s["key"] == "MODEL.REGIONSPOT.PROPOSAL_SCORE_THRESH")
    assert (step["stage"], step["setting"], step["candidates"], step["removed"], step["images_emptied"]) == (
        "proposals: score threshold", 0.6, n_boxes, n_boxes, n_images)
    lines = [line for line in console.splitlines() if "PROPOSAL_SCORE_THRESH" in line and "emptied" in line]
    assert len(lines) == 1 and f"{n_images} of {n_images} images" in lines[0]
