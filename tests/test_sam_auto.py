"""sam_auto proposals: SAM's automatic mask generator on the embedding the model already has."""

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

SETTINGS = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture
def model(tiny_model, monkeypatch):
    sam_auto = tiny_model.proposal_generator.sam_auto
    monkeypatch.setattr(sam_auto, "settings", dict(sam_auto.settings, **SETTINGS))
    return tiny_model


@pytest.fixture(scope="module")
def image():
    return torch.from_numpy((np.random.RandomState(5).rand(200, 300, 3) * 255).astype(np.uint8)).permute(2, 0, 1)


def test_the_image_is_encoded_once_and_regions_equal_sams_own(model, image, monkeypatch):
    features = model.encode_images([image])
    calls = []
    encoder = model.localizer.sam.image_encoder
    with monkeypatch.context() as patch:
        patch.setattr(encoder, "forward", lambda x: calls.append(1) or pytest.fail("SAM re-encoded the image"))
        proposals = model.generate_proposals("sam_auto", features)[0]
    assert calls == []
    settings = dict(model.proposal_generator.sam_auto.settings)
    reference = SamAutomaticMaskGenerator(model.localizer.sam, output_mode="binary_mask", **settings).generate(
        np.ascontiguousarray(image.permute(1, 2, 0).numpy()))  # SAM encodes the image itself
    assert len(proposals) == len(reference) > 0
    ref_masks = {r["segmentation"].tobytes() for r in reference}
    assert {m.numpy().tobytes() for m in proposals.proposal_masks} == ref_masks


def test_regions_become_scored_boxes_with_their_masks(model, image, monkeypatch):
    """Mask box (inclusive pixel extents) -> XYXY_ABS; score = predicted IoU x stability; best first."""
    h, w = image.shape[-2:]
    masks = np.zeros((2, h, w), dtype=bool)
    masks[0, 10:20, 30:60] = True
    masks[1, 50:150, 0:300] = True
    regions = [
        {"segmentation": masks[0], "bbox": [30, 10, 29, 9], "predicted_iou": 0.5, "stability_score": 0.8},
        {"segmentation": masks[1], "bbox": [0, 50, 299, 99], "predicted_iou": 1.02, "stability_score": 0.9},
    ]
    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", lambda self, img: regions)
    proposals = model.generate_proposals("sam_auto", model.encode_images([image]))[0]
    assert proposals.proposal_boxes.tensor.tolist() == [[0, 50, 300, 150], [30, 10, 60, 20]]
    torch.testing.assert_close(proposals.objectness_logits.sigmoid(), torch.tensor([0.9, 0.4]))  # clipped to 1
    assert torch.equal(proposals.proposal_masks, torch.from_numpy(masks[[1, 0]]))
    # the region's own mask is the mask output, resized to the original image
    recognition = model.recognize(model.encode_images([image]), [proposals], model.text_embeddings)[0]
    out = model.postprocess(recognition, (400, 600), mask_on=True)
    first = out.pred_masks[int((out.pred_boxes.tensor[:, 1] == 100).nonzero()[0])]
    assert first.shape == (400, 600) and first[100:300].all() and not first[:100].any() and not first[300:].any()


def test_settings_are_checked(tiny_cfg):
    from regionspot.modeling.proposals.sam_auto import SamAutoProposalGenerator

    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE = 0
    with pytest.raises(ValueError, match="SAM_AUTO.POINTS_PER_SIDE"):
        SamAutoProposalGenerator.settings_from_config(cfg)
    cfg.MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE = 8
    cfg.MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH = 1.5
    with pytest.raises(ValueError, match="PRED_IOU_THRESH"):
        SamAutoProposalGenerator.settings_from_config(cfg)
