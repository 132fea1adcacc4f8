"""The dataset mapper: one augmentation for image and boxes, GT boxes kept at test time,
clear errors for bad images and boxes."""

import copy

import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode
from PIL import Image

from regionspot.data.mapper import RegionSpotDatasetMapper
from regionspot.data.validation import InputError

H, W = 200, 320  # non-square
BOX = [40.0, 30.0, 150.0, 120.0]  # XYXY


@pytest.fixture
def image_file(tmp_path):
    """A dark image with one bright rectangle exactly where BOX is."""
    image = np.zeros((H, W, 3), dtype=np.uint8)
    x0, y0, x1, y1 = map(int, BOX)
    image[y0:y1, x0:x1] = 255
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    return str(path)


def _dict(path, boxes=(BOX,), mode=BoxMode.XYXY_ABS):
    return {"file_name": path, "height": H, "width": W, "image_id": 1,
            "annotations": [{"bbox": list(b), "bbox_mode": mode, "category_id": 2, "iscrowd": 0,
                             "segmentation": [[0, 0, 1, 0, 1, 1]]} for b in boxes]}


def _mapper(tiny_cfg, is_train, flip=False, min_size=400):
    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.INPUT.MIN_SIZE_TRAIN = (min_size,)
    cfg.INPUT.MIN_SIZE_TEST = min_size
    cfg.INPUT.RANDOM_FLIP = "horizontal" if flip else "none"
    mapper = RegionSpotDatasetMapper(cfg, is_train)
    if flip:  # force the flip
        mapper.augmentations.augs[-1].prob = 1.0
    return mapper


def _bright_box(image):
    ys, xs = np.nonzero(image[0].numpy() > 128)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("flip", [False, True])
def test_image_and_boxes_get_the_same_augmentation(tiny_cfg, image_file, flip):
    out = _mapper(tiny_cfg, True, flip=flip)(_dict(image_file))
    image, box = out["image"], out["instances"].gt_boxes.tensor[0]
    scale = 400 / H
    assert image.shape == (3, 400, round(W * scale)) and image.dtype == torch.uint8
    np.testing.assert_allclose(box.numpy(), _bright_box(image), atol=1.5)  # box still frames the object
    expected = np.array(BOX) * scale
    if flip:
        expected = np.array([W * scale - expected[2], expected[1], W * scale - expected[0], expected[3]])
    np.testing.assert_allclose(box.numpy(), expected, atol=1e-3)
    assert not out["instances"].has("gt_masks")  # boxes only; masks come from SAM


def test_ground_truth_boxes_reach_the_model_at_test_time(tiny_cfg, image_file):
    out = _mapper(tiny_cfg, False)(_dict(image_file, [[40, 30, 110, 90]], BoxMode.XYWH_ABS))
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor[0].numpy(), np.array(BOX) * 2, atol=1e-3)
    assert out["instances"].gt_classes.tolist() == [2]


def test_image_without_boxes(tiny_cfg, image_file):
    out = _mapper(tiny_cfg, False)(_dict(image_file, []))
    assert len(out["instances"]) == 0


def test_boxes_through_every_resize_back_to_the_original_frame(tiny_model, tiny_cfg, image_file):
    """original -> mapper resize (short side 400) -> SAM's 256 long side -> results in original pixels."""
    boxes = [BOX, [0.0, 0.0, W, H], [300.0, 150.0, 320.0, 200.0]]
    out = _mapper(tiny_cfg, False)(_dict(image_file, boxes))
    tiny_model.test_topk = 1000
    try:
        result = tiny_model([out])[0]["instances"]
    finally:
        tiny_model.test_topk = 900
    assert result.image_size == (H, W)
    assert len(result) == len(boxes) * 4  # every (box, class) pair of the 4-class vocabulary
    got = {tuple(np.round(b.numpy(), 3)) for b in result.pred_boxes.tensor}
    assert got == {tuple(np.round(np.array(b, dtype=np.float32), 3)) for b in boxes}
    masks = result.pred_masks
    assert masks.shape == (len(result), H, W) and masks.dtype == torch.bool


def test_missing_image_is_named(tiny_cfg, tmp_path):
    with pytest.raises(InputError, match="image file not found: .*nothere.jpg"):
        _mapper(tiny_cfg, False)(_dict(str(tmp_path / "nothere.jpg")))


def test_training_skips_an_unreadable_image_and_counts_it(tiny_cfg, tmp_path, caplog):
    """In training a missing file is skipped (MapDataset then takes another image), logged by name."""
    import logging

    mapper = _mapper(tiny_cfg, True)
    with caplog.at_level(logging.WARNING, logger="regionspot.data.mapper"):
        assert mapper(_dict(str(tmp_path / "gone.jpg"))) is None
        assert mapper(_dict(str(tmp_path / "gone_too.jpg"))) is None
    assert mapper.skipped_images == 2
    assert "2 so far" in caplog.text and "gone_too.jpg" in caplog.text


def test_corrupt_image_is_named(tiny_cfg, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="cannot read image .*broken.jpg"):
        _mapper(tiny_cfg, False)(_dict(str(bad)))


@pytest.mark.parametrize("box,message", [
    ([10, 10, float("nan"), 50], "NaN"),
    ([10, 10, 10, 50], "zero area"),
    ([10, 10, W + 30, 50], "outside"),
])
def test_bad_boxes_are_named_with_their_file(tiny_cfg, image_file, box, message):
    with pytest.raises(InputError, match=f"photo.png.*box 1 .*{message}"):
        _mapper(tiny_cfg, True)(_dict(image_file, [BOX, box]))


def test_box_slightly_outside_is_clipped(tiny_cfg, image_file):
    out = _mapper(tiny_cfg, False)(_dict(image_file, [[-0.5, 0.0, W + 0.5, H]]))
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor[0].numpy(), [0, 0, W * 2, H * 2], atol=1e-3)


def test_mapper_does_not_modify_the_dataset_dict(tiny_cfg, image_file):
    d = _dict(image_file)
    before = copy.deepcopy(d)
    _mapper(tiny_cfg, True)(d)
    assert d == before


def test_unknown_proposal_source_is_refused(tiny_cfg):
    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.MODEL.REGIONSPOT.PROPOSALS = "selective_search"
    with pytest.raises(ValueError, match="PROPOSALS must be one of"):
        RegionSpotDatasetMapper(cfg, False)


def test_file_proposals_go_through_detectron2s_transform(tiny_cfg, image_file):
    """Precomputed proposals (Detectron2's dataset-dict keys) get the image's resize; the mapper
    keeps every attached box: the file's top-k ran once, when the loader attached them."""
    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.MODEL.REGIONSPOT.PROPOSALS = "file"
    cfg.MODEL.REGIONSPOT.PROPOSAL_TOPK = 2
    cfg.INPUT.MIN_SIZE_TEST = 400
    mapper = RegionSpotDatasetMapper(cfg, False)
    d = _dict(image_file)
    d["proposal_boxes"] = np.array([BOX, [0, 0, 10, 10], [5, 5, 50, 60]], dtype=np.float32)
    d["proposal_objectness_logits"] = np.array([3.0, 1.0, -1.0], dtype=np.float32)
    d["proposal_bbox_mode"] = BoxMode.XYXY_ABS
    out = mapper(d)
    proposals = out["proposals"]
    assert len(proposals) == 3 and proposals.image_size == tuple(out["image"].shape[1:])
    np.testing.assert_allclose(proposals.proposal_boxes.tensor[0].numpy(), np.array(BOX) * 2, atol=1e-4)
    np.testing.assert_allclose(proposals.objectness_logits.numpy(), [3.0, 1.0, -1.0])
    with pytest.raises(InputError, match="photo.png.*no proposals attached"):
        mapper(_dict(image_file))
    assert "proposals" not in RegionSpotDatasetMapper(cfg, True)(_dict(image_file))  # training: ground truth only


def test_the_file_sources_top_k_runs_once(tiny_cfg, image_file):
    """attach_proposals applies PROPOSAL_TOPK and records it once in the image's filter report;
    the mapper passes the attached boxes on without cutting them again."""
    from regionspot.data.proposal_files import ProposalSet, attach_proposals
    from regionspot.filter_report import report_of_input

    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.MODEL.REGIONSPOT.PROPOSALS = "file"
    cfg.MODEL.REGIONSPOT.PROPOSAL_TOPK = 2
    d = _dict(image_file)
    boxes = np.array([BOX, [0, 0, 10, 10], [5, 5, 50, 60], [20, 20, 40, 40]], dtype=np.float32)
    proposals = ProposalSet("memory", "glip", boxes={"1": boxes},
                            scores={"1": np.array([0.9, 0.8, 0.7, 0.6], np.float32)})
    coverage = attach_proposals([d], proposals, topk=cfg.MODEL.REGIONSPOT.PROPOSAL_TOPK)
    assert (coverage["boxes_removed_by_topk"], coverage["boxes_kept"]) == (2, 2)
    cfg.MODEL.REGIONSPOT.PROPOSAL_TOPK = 1  # a second cut would now show
    out = RegionSpotDatasetMapper(cfg, False)(d)
    assert len(out["proposals"]) == 2
    steps = [s for s in report_of_input(out).steps if s.key == "MODEL.REGIONSPOT.PROPOSAL_TOPK"]
    assert [(s.candidates, s.removed) for s in steps] == [(4, 2)]
