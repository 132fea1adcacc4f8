"""Head checkpoints: our layout, the released layout, and refusals."""

import logging
import os

import pytest
import torch

from regionspot.checkpoint import CheckpointError, RegionSpotCheckpointer


@pytest.fixture
def model(tiny_model):
    state = {k: v.clone() for k, v in tiny_model.head.state_dict().items()}
    yield tiny_model
    tiny_model.head.load_state_dict(state)


def _perturbed_head_state(model, prefix):
    return {prefix + k: torch.randn_like(v) for k, v in model.head.state_dict().items()}


def test_save_writes_only_the_head_atomically(model, tmp_path):
    checkpointer = RegionSpotCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    data = torch.load(tmp_path / "model_0000009.pth", weights_only=True)
    assert set(data["model"]) == {"head." + k for k in model.head.state_dict()}
    assert data["iteration"] == 9
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]  # no temporary files


def test_load_released_layout(model, tmp_path):
    """Head under `model.`, frozen `model.sam.*` / `model.clip_model.*`, trainer/iteration entries."""
    state = _perturbed_head_state(model, "model.")
    state["model.sam.image_encoder.pos_embed"] = torch.zeros(1, 64, 64, 768)
    state["model.clip_model.visual.proj"] = torch.zeros(1024, 768)
    path = tmp_path / "regionspot_bb.pth"
    torch.save({"model": state, "trainer": {}, "iteration": 450000}, path)
    RegionSpotCheckpointer(model).load(str(path))
    for k, v in model.head.state_dict().items():
        assert torch.equal(v, state["model." + k]), k


def test_load_our_layout_roundtrip(model, tmp_path):
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    RegionSpotCheckpointer(model, str(tmp_path)).save("ours")
    for p in model.head.parameters():
        torch.nn.init.zeros_(p)
    RegionSpotCheckpointer(model).load(str(tmp_path / "ours.pth"))
    assert all(torch.equal(before[k], v) for k, v in model.head.state_dict().items())


def test_missing_and_unexpected_keys_are_named(model, tmp_path, caplog):
    """Training (strict=False) loads what fits and logs the rest, as Detectron2 does."""
    state = _perturbed_head_state(model, "model.")
    del state["model.projector.bias"]
    state["model.extra_layer.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with caplog.at_level(logging.WARNING):
        RegionSpotCheckpointer(model, strict=False).load(str(path))
    text = caplog.text
    assert "projector.bias" in text and "extra_layer" in text
    with pytest.raises(CheckpointError,
                       match=r"partial.pth.*1 of its 60 parameter tensors are missing \(head.projector.bias\)"):
        RegionSpotCheckpointer(model).load(str(path))  # inference / evaluation: refused


def _head_of_depth(tiny_cfg, depth):
    from detectron2.modeling import build_model

    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.MODEL.REGIONSPOT.NUM_DECODER_LAYERS = depth
    return build_model(cfg)


@pytest.mark.parametrize("depth", [1, 6])
def test_a_head_of_another_depth_is_refused(model, tiny_cfg, tmp_path, depth):
    other = _head_of_depth(tiny_cfg, depth)
    RegionSpotCheckpointer(other, str(tmp_path)).save(f"depth{depth}")
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    expected = "missing" if depth == 1 else "unexpected \\(head.decoder.layers.3"
    with pytest.raises(CheckpointError,
                       match=f"depth{depth}.pth.*not a checkpoint of this RegionSpot head.*{expected}"):
        RegionSpotCheckpointer(model).load(str(tmp_path / f"depth{depth}.pth"))
    assert all(torch.equal(before[k], v) for k, v in model.head.state_dict().items())


def test_foreign_checkpoints_are_refused(model, tmp_path, sam_path):
    detector = {"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
                          "roi_heads.box_predictor.cls_score.weight": torch.zeros(81, 1024)}}
    torch.save(detector, tmp_path / "faster_rcnn.pth")
    with pytest.raises(CheckpointError, match="faster_rcnn.pth.*is not a RegionSpot head: this is a Detectron2 "
                                              "detection model"):
        RegionSpotCheckpointer(model).load(str(tmp_path / "faster_rcnn.pth"))
    with pytest.raises(CheckpointError, match="sam_random_tiny.pth.*this is SAM's.*MODEL.REGIONSPOT.SAM_WEIGHTS"):
        RegionSpotCheckpointer(model).load(sam_path)  # SAM's own weights file


def test_the_log_says_what_was_loaded_from_which_file(model, tmp_path, caplog):
    state = _perturbed_head_state(model, "model.")
    state["model.sam.image_encoder.pos_embed"] = torch.zeros(1, 64, 64, 768)
    torch.save({"model": state}, tmp_path / "released.pth")
    with caplog.at_level(logging.INFO, logger="fvcore.common.checkpoint"):
        RegionSpotCheckpointer(model).load(str(tmp_path / "released.pth"))
    assert "Loaded the RegionSpot head from" in caplog.text
    assert "released.pth (released layout): 60 of 60" in caplog.text


def test_wrong_shapes_are_refused(model, tmp_path):
    """A BB checkpoint (D=768) does not fit a head of another width."""
    state = _perturbed_head_state(model, "model.")
    state["model.to_clip.weight"] = torch.zeros(768, 256)
    state["model.projector.weight"] = torch.zeros(512, 768)
    path = tmp_path / "bb.pth"
    torch.save({"model": state}, path)
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        RegionSpotCheckpointer(model).load(str(path))
    assert "head.to_clip.weight: (768, 256) in the checkpoint, (64, 256) in the model" in str(e.value)
    assert "head.projector.weight" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.head.state_dict().items())  # nothing half-loaded


def test_corrupt_checkpoint(model, tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        RegionSpotCheckpointer(model).load(str(path))


def test_missing_checkpoint_is_named(model, tmp_path):
    with pytest.raises(CheckpointError, match="absent.pth.*MODEL.WEIGHTS"):
        RegionSpotCheckpointer(model).load(str(tmp_path / "absent.pth"))
