"""The scoring protocol (score fusion, top-k, TAP, per box, NMS) and masks shared per box."""

import math

import pytest
import torch
from detectron2.structures import Instances

from regionspot.evaluation.lvis_evaluation import encode_masks_once
from regionspot.modeling.postprocess import RecognitionProtocol, SharedMasks, class_probabilities, select_detections

PROBS = torch.tensor([[0.7, 0.2, 0.1],
                      [0.1, 0.1, 0.8],
                      [0.4, 0.5, 0.1]])
BOXES = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 80, 90]], dtype=torch.float32)


def test_topk_pairs_fuse_the_proposal_score():
    scores = torch.tensor([1.0, 0.5, 0.25])
    det = select_detections(PROBS, scores, BOXES, RecognitionProtocol(topk=4))
    fused = PROBS * scores[:, None]
    expected = fused.flatten().topk(4)
    torch.testing.assert_close(det.scores, expected.values)
    assert det.box_index.tolist() == (expected.indices // 3).tolist()
    assert det.classes.tolist() == (expected.indices % 3).tolist()
    # power 0 ignores the proposal score; power 2 squares it
    det0 = select_detections(PROBS, scores, BOXES, RecognitionProtocol(topk=9, proposal_score_power=0))
    torch.testing.assert_close(det0.scores, PROBS.flatten().sort(descending=True).values)
    det2 = select_detections(PROBS, scores, BOXES, RecognitionProtocol(topk=9, proposal_score_power=2))
    torch.testing.assert_close(det2.scores, (PROBS * scores[:, None] ** 2).flatten().sort(descending=True).values)


def test_a_box_may_carry_several_classes_and_nms_is_per_class():
    det = select_detections(PROBS, torch.ones(3), BOXES, RecognitionProtocol(topk=9))
    assert len(det.scores) == 9 and det.box_index.tolist().count(0) == 3
    nms = select_detections(PROBS, torch.ones(3), BOXES, RecognitionProtocol(topk=9, nms_thresh=0.5))
    # boxes 0 and 1 overlap (IoU 0.91): per class only the better one stays; box 2 keeps all
    assert len(nms.scores) == 6
    pairs = set(zip(nms.box_index.tolist(), nms.classes.tolist()))
    assert (0, 0) in pairs and (1, 0) not in pairs and (1, 2) in pairs and (0, 2) not in pairs
    assert {(2, c) for c in range(3)} <= pairs


def test_tap_protocol():
    """TAP: classes above the threshold per box, score sqrt(p x clip(iou, 0, 1))."""
    iou = torch.tensor([0.81, 1.2, 0.25])
    protocol = RecognitionProtocol(selection="tap", tap_class_thresh=0.15, topk=100)
    det = select_detections(PROBS, torch.ones(3), BOXES, protocol, iou_predictions=iou)
    expected = {(b, c): math.sqrt(PROBS[b, c].item() * min(iou[b].item(), 1.0))
                for b in range(3) for c in range(3) if PROBS[b, c] > 0.15}
    got = {(b, c): s for b, c, s in zip(det.box_index.tolist(), det.classes.tolist(), det.scores.tolist())}
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())
    assert det.scores.tolist() == sorted(det.scores.tolist(), reverse=True)
    with pytest.raises(ValueError, match="IoU"):
        select_detections(PROBS, torch.ones(3), BOXES, protocol)


def test_per_box_selection_keeps_box_order():
    det = select_detections(PROBS, torch.tensor([1.0, 0.5, 1.0]), BOXES, RecognitionProtocol(selection="per_box"))
    assert det.box_index.tolist() == [0, 1, 2] and det.classes.tolist() == [0, 2, 1]
    torch.testing.assert_close(det.scores, torch.tensor([0.7, 0.4, 0.5]))


def test_class_probabilities():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    torch.testing.assert_close(class_probabilities(logits, "softmax"), logits.softmax(-1))
    torch.testing.assert_close(class_probabilities(logits, "sigmoid"), logits.sigmoid())


@pytest.mark.parametrize("field,value,key", [
    ("class_score", "max", "TEST_SCORE"), ("selection", "all", "TEST_PROTOCOL"),
    ("topk", 0, "TEST_TOPK"), ("proposal_score_power", -1.0, "PROPOSAL_SCORE_POWER"),
    ("nms_thresh", 1.5, "TEST_NMS_THRESH"), ("max_detections", 0, "DETECTIONS_PER_IMAGE"),
])
def test_protocol_values_are_checked_with_the_key_named(field, value, key):
    with pytest.raises(ValueError, match=key):
        RecognitionProtocol(**{field: value})


def test_protocol_description_states_everything():
    text = RecognitionProtocol(topk=900, proposal_score_power=1.0).describe(1203)
    for part in ("softmax over 1203 classes", "proposal score^1 x class probability",
                 "top 900 (box, class) pairs per image", "no NMS", "evaluator keeps 300 per image"):
        assert part in text
    tap = RecognitionProtocol(selection="tap", nms_thresh=0.5, proposal_score_power=0).describe()
    assert "TAP protocol" in tap and "sqrt(class probability x SAM's predicted IoU)" in tap
    assert "NMS at IoU 0.5" in tap and "proposal score ignored" in tap


def test_shared_masks_behave_like_a_mask_tensor_in_instances():
    bitmaps = torch.zeros(2, 4, 5, dtype=torch.bool)
    bitmaps[0, :2] = True
    bitmaps[1, :, :1] = True
    masks = SharedMasks(bitmaps, torch.tensor([0, 0, 1, 0]))
    inst = Instances((4, 5))
    inst.pred_masks = masks
    inst.scores = torch.arange(4.0)
    assert torch.equal(inst.pred_masks.tensor(), bitmaps[[0, 0, 1, 0]])
    assert torch.equal(inst[2].pred_masks.tensor()[0], bitmaps[1])
    sub = inst[inst.scores > 0.5]
    assert len(sub) == 3 and torch.equal(sub.pred_masks.tensor(), bitmaps[[0, 1, 0]])
    joined = Instances.cat([inst, sub])
    assert torch.equal(joined.pred_masks.tensor(), torch.cat([bitmaps[[0, 0, 1, 0]], bitmaps[[0, 1, 0]]]))
    assert [m.sum().item() for m in masks] == [10, 10, 4, 10]
    compact = masks[torch.tensor([2])].compact()
    assert compact.bitmaps.shape[0] == 1 and torch.equal(compact.tensor(), bitmaps[[1]])
    with pytest.raises(ValueError, match="bool"):
        SharedMasks(bitmaps.float(), torch.tensor([0]))


def test_each_distinct_mask_is_encoded_once():
    import pycocotools.mask as mask_util

    bitmaps = torch.zeros(2, 6, 7, dtype=torch.bool)
    bitmaps[0, 1:3, 2:5] = True
    bitmaps[1, 4:, :] = True
    masks = SharedMasks(bitmaps, torch.tensor([1, 0, 1, 1]))
    rles = encode_masks_once(masks)
    assert len(rles) == 4 and rles[0] is rles[2] is rles[3] and rles[1] is not rles[0]
    assert (mask_util.decode(dict(rles[1], counts=rles[1]["counts"].encode())) == bitmaps[0].numpy()).all()
    assert (mask_util.decode(dict(rles[0], counts=rles[0]["counts"].encode())) == bitmaps[1].numpy()).all()
    plain = encode_masks_once(bitmaps[[1, 0]])
    assert plain[0] == rles[0] and plain[1] == rles[1]
