"""RegionSpot from Detectron2's own entry points, as a Detectron2 user writes them: get_cfg +
add_regionspot_config, build_model, DetectionCheckpointer, DefaultPredictor, Visualizer."""

import logging
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import Visualizer

from regionspot.config import add_regionspot_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cfg(sam_path, clip_path, head_path, tmp_path):
    cfg = get_cfg()
    add_regionspot_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"))
    cfg.MODEL.DEVICE = "auto"
    cfg.MODEL.WEIGHTS = head_path
    cfg.MODEL.REGIONSPOT.SAM_WEIGHTS = sam_path
    cfg.MODEL.REGIONSPOT.CLIP_WEIGHTS = clip_path
    cfg.MODEL.REGIONSPOT.TEXT_CACHE_DIR = str(tmp_path / "cache")
    return cfg


def _photo():
    from regionspot.data.datasets.regionspot_sample import prepare_regionspot_sample, sample_root
    from regionspot.data.validation import read_image

    _, image_root = prepare_regionspot_sample(sample_root())
    return read_image(os.path.join(image_root, "chelsea.png"), "BGR")  # DefaultPredictor takes BGR


def test_build_model_resolves_auto_and_starts_with_the_config_vocabulary(cfg):
    model = build_model(cfg)
    assert cfg.MODEL.DEVICE in ("cpu", "cuda") and model.device.type == cfg.MODEL.DEVICE
    assert model.vocabularies.pending == list(MetadataCatalog.get("regionspot_sample").thing_classes)


def test_detection_checkpointer_reports_only_head_keys(cfg, tmp_path, caplog):
    model = build_model(cfg)
    with caplog.at_level(logging.INFO, logger="fvcore"):
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    assert "not found in the checkpoint" not in caplog.text and "image_encoder" not in caplog.text
    head = torch.load(cfg.MODEL.WEIGHTS, weights_only=True)["model"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in head.items())
    # a checkpoint missing one head key: that key, and no backbone key, is reported
    del head["head.projector.bias"]
    torch.save({"model": head}, tmp_path / "partial.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fvcore"):
        DetectionCheckpointer(build_model(cfg)).load(str(tmp_path / "partial.pth"))
    assert "head.projector.bias" in caplog.text
    assert "localizer." not in caplog.text and "semantic_encoder." not in caplog.text
    # Detectron2's own save keeps the frozen SAM/CLIP out
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("d2")
    saved = torch.load(tmp_path / "d2.pth", weights_only=False)["model"]
    assert saved and all(k.startswith("head.") for k in saved)


def test_default_predictor_and_visualizer_with_sam_auto(cfg):
    cfg.MODEL.REGIONSPOT.PROPOSALS = "sam_auto"
    cfg.MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE = 4
    cfg.MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH = 0.0
    cfg.MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH = 0.0
    predictor = DefaultPredictor(cfg)
    image = _photo()
    instances = predictor(image)["instances"].to("cpu")
    assert len(instances) > 0
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances).get_image()
    assert drawn.shape == image.shape and np.abs(drawn.astype(int) - image[:, :, ::-1]).mean() > 1


def test_float_and_uint8_images_give_identical_instances(cfg):
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    image = torch.as_tensor(np.ascontiguousarray(_photo()[:, :, ::-1].transpose(2, 0, 1)))
    inst = Instances(tuple(image.shape[1:]))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 200.0, 250.0], [150.0, 30.0, 400.0, 290.0]]))
    inst.gt_classes = torch.tensor([0, 1])
    with torch.no_grad():
        a = model([{"image": image, "instances": inst}])[0]["instances"]
        b = model([{"image": image.float(), "instances": inst}])[0]["instances"]
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
    for bad, message in ((image.float() * 2, "values in 0-255"), (image.float().fill_(float("nan")), "NaN"),
                         (image[:2], "must be a \\(3, H, W\\)")):
        with pytest.raises(ValueError, match=message):
            model([{"image": bad, "instances": inst}])


def test_default_predictor_with_gt_proposals_says_how_to_pass_boxes(cfg):
    predictor = DefaultPredictor(cfg)
    with pytest.raises(ValueError, match="RegionSpotPredictor.predict\\(boxes\\)"):
        predictor(_photo())


def test_a_paper_config_in_a_detectron2_users_first_lines(sam_path, tmp_path, caplog):
    """regionspot_bb.yaml with its weight files (small random ones in the official formats):
    get_cfg, add_regionspot_config, merge_from_file, build_model, DetectionCheckpointer.load,
    DefaultPredictor, Visualizer; no project call, no backbone key in the checkpointer's log."""
    from regionspot.testing.random_backbones import write_random_clip

    cfg = get_cfg()
    add_regionspot_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "regionspot_bb.yaml"))
    cfg.MODEL.REGIONSPOT.SAM_WEIGHTS = sam_path
    cfg.MODEL.REGIONSPOT.CLIP_WEIGHTS = write_random_clip(str(tmp_path / "ViT-B-16.pt"), "tiny")
    cfg.MODEL.REGIONSPOT.TEXT_CACHE_DIR = str(tmp_path / "cache")
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("head")
    cfg.MODEL.WEIGHTS = str(tmp_path / "head.pth")

    model = build_model(cfg)
    with caplog.at_level(logging.INFO, logger="fvcore"):
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    assert "not found" not in caplog.text and "localizer." not in caplog.text and "semantic_encoder." not in caplog.text
    lvis_classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).thing_classes
    assert len(lvis_classes) == 1203 and model.vocabularies.pending == list(lvis_classes)

    cfg.MODEL.REGIONSPOT.PROPOSALS = "sam_auto"
    cfg.MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE = 4
    cfg.MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH = 0.0
    cfg.MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH = 0.0
    image = _photo()
    instances = DefaultPredictor(cfg)(image)["instances"].to("cpu")
    assert len(instances) > 0 and int(instances.pred_classes.max()) < 1203
    visualizer = Visualizer(image[:, :, ::-1], MetadataCatalog.get(cfg.DATASETS.TEST[0]))
    drawn = visualizer.draw_instance_predictions(instances)
    assert drawn.get_image().shape == image.shape
