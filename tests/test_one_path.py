"""One recognition path: the evaluator's forward, the predictor, the demo and the benchmark give
identical results for the same image, boxes and vocabulary."""

import json

import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode
from PIL import Image

from conftest import REPO, load_tool
from regionspot import RegionSpotPredictor
from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.data.mapper import RegionSpotDatasetMapper

BOXES = [[10.0, 20.0, 200.0, 150.0], [220.0, 50.0, 440.0, 290.0], [0.0, 0.0, 450.0, 300.0]]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray((np.random.RandomState(3).rand(300, 450, 3) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def evaluated(tiny_model, tiny_cfg, photo):
    """What train_net's evaluation computes for the photo: mapper, then model.forward."""
    record = {"file_name": photo, "height": 300, "width": 450, "image_id": 1,
              "annotations": [{"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0}
                              for b in BOXES]}
    inputs = RegionSpotDatasetMapper(tiny_cfg, False)(record)
    with torch.no_grad():
        instances = tiny_model.eval()([inputs])[0]["instances"]
    return inputs, instances


def _per_box(instances, num_classes):
    """(N, C) scores and the mask of each box, from the (box, class) pairs of the evaluator's output."""
    scores = torch.full((len(BOXES), num_classes), float("nan"))
    masks = [None] * len(BOXES)
    for i, box in enumerate(BOXES):
        rows = torch.nonzero((instances.pred_boxes.tensor - torch.tensor(box)).abs().max(1).values < 1e-3)[:, 0]
        scores[i, instances.pred_classes[rows]] = instances.scores[rows]
        masks[i] = instances.pred_masks[int(rows[0])]
    return scores, masks


def test_predictor_equals_the_evaluator(tiny_model, tiny_cfg, photo, evaluated):
    _, instances = evaluated
    vocabulary = tiny_model.class_names
    assert len(instances) == len(BOXES) * len(vocabulary)  # every pair is kept (top 900)
    predictor = RegionSpotPredictor(tiny_model, tiny_cfg.INPUT.MIN_SIZE_TEST, tiny_cfg.INPUT.MAX_SIZE_TEST,
                                    vocabulary=vocabulary)
    predictor.set_image(np.asarray(Image.open(photo)))
    out = predictor.predict(BOXES)
    scores, masks = _per_box(instances, len(vocabulary))
    assert torch.equal(out.probabilities, scores)  # bit for bit: the same computation
    for i in range(len(BOXES)):
        assert torch.equal(out.masks[i], masks[i])
    assert torch.equal(out.classes, scores.argmax(1))


def test_demo_equals_the_predictor(tiny_model, tiny_cfg, photo, tmp_path, sam_path, clip_path, monkeypatch):
    from demo import demo

    RegionSpotCheckpointer(tiny_model, str(tmp_path)).save("head")  # the demo builds its own model
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps({"photo.png": BOXES}))
    vocabulary = tiny_model.class_names
    monkeypatch.chdir(REPO)
    assert demo.main(["--config-file", "configs/regionspot_sample_cpu.yaml", "--input", photo,
                      "--boxes", str(boxes_file), "--vocabulary", "custom", "--custom-vocabulary", ",".join(vocabulary),
                      "--output", str(tmp_path / "out"), "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path,
                      "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR",
                      tiny_cfg.MODEL.REGIONSPOT.TEXT_CACHE_DIR, "MODEL.WEIGHTS", str(tmp_path / "head.pth")]) == 0
    written = json.loads((tmp_path / "out" / "photo.json").read_text())["predictions"]
    predictor = RegionSpotPredictor(tiny_model, tiny_cfg.INPUT.MIN_SIZE_TEST, tiny_cfg.INPUT.MAX_SIZE_TEST,
                                    vocabulary=vocabulary)
    predictor.set_image(np.asarray(Image.open(photo)))
    assert written == predictor.predict(BOXES).to_json()


def test_benchmark_stages_equal_the_evaluator(tiny_model, evaluated):
    tool = load_tool("benchmarks.stages")
    inputs, instances = evaluated
    n = len(BOXES)
    _, _, results = tool.stage_pass(tiny_model, inputs["image"], {n: inputs["instances"].gt_boxes.tensor},
                                    (300, 450), torch.device("cpu"))
    assert tool.same_detections(results[n], instances)
