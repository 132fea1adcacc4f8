"""regionspot.data.proposal_files: reading, validating, writing and attaching proposal files."""

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.data.build import load_proposals_into_dataset
from detectron2.data.detection_utils import transform_proposals
from detectron2.structures import BoxMode

from regionspot.data.proposal_files import (
    PROPOSAL_FILE_FORMATS,
    ProposalFileError,
    ProposalSet,
    attach_proposals,
    detect_format,
    read_proposal_file,
    write_proposal_file,
)
from regionspot.data.validation import InputError
from regionspot.modeling.proposals import logit_to_score


def _proposal_set():
    """Three images (ids 1, 42, "img_7"), scores including exactly 0 and 1."""
    boxes = {"1": [[10.5, 20.25, 50, 60], [0, 0, 100, 80], [30, 30, 31, 32]],
             "42": [[5, 5, 15, 25]],
             "img_7": [[1, 2, 3, 4], [2, 2, 9, 9]]}
    scores = {"1": [0.9, 1.0, 0.123456], "42": [0.0], "img_7": [0.5, 0.25]}
    labels = {"1": [3, -1, 7], "42": [0], "img_7": [5, 5]}
    return ProposalSet("memory", "glip", boxes=boxes, scores=scores, labels=labels)


def _write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def _write_pickle(path, obj):
    path.write_bytes(pickle.dumps(obj))
    return str(path)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", PROPOSAL_FILE_FORMATS)
def test_round_trip_every_format(tmp_path, fmt):
    original = _proposal_set()
    path = write_proposal_file(original, str(tmp_path / f"p.{fmt}"), fmt)
    assert detect_format(path) == fmt
    back = read_proposal_file(path)  # format detected from the content
    assert back.format == fmt and back.path == path
    assert back.image_ids() == original.image_ids()
    for key in original.image_ids():
        assert back.boxes[key].dtype == np.float32 and back.boxes[key].shape == original.boxes[key].shape
        np.testing.assert_allclose(back.boxes[key], original.boxes[key], atol=1e-4)
        np.testing.assert_allclose(back.scores[key], original.scores[key], atol=1e-6)
        expected = np.full(len(original.labels[key]), -1) if fmt == "detectron2" else original.labels[key]
        if fmt == "coco":  # COCO needs a category: -1 is written as 1
            expected = np.where(expected < 0, 1, expected)
        np.testing.assert_array_equal(back.labels[key], expected)
    assert read_proposal_file(path, fmt).num_boxes == 6


def test_written_ids_are_ints_when_numeric(tmp_path):
    proposals = _proposal_set()
    coco = json.loads(open(write_proposal_file(proposals, str(tmp_path / "c.json"), "coco")).read())
    assert {e["image_id"] for e in coco} == {1, 42, "img_7"}
    assert coco[0]["bbox"] == pytest.approx([10.5, 20.25, 39.5, 39.75])  # XYWH
    with open(write_proposal_file(proposals, str(tmp_path / "d.pkl"), "detectron2"), "rb") as f:
        d2 = pickle.load(f)
    assert d2["ids"] == [1, 42, "img_7"] and d2["bbox_mode"] == BoxMode.XYXY_ABS
    assert d2["objectness_logits"][0].dtype == np.float32
    assert d2["objectness_logits"][0][1] == np.inf and d2["objectness_logits"][1][0] == -np.inf


def test_detectron2_reads_our_pickle(tmp_path):
    """Detectron2's own loader accepts the pickle and sees the same boxes, best first."""
    path = write_proposal_file(_proposal_set(), str(tmp_path / "d.pkl"), "detectron2")
    dicts = load_proposals_into_dataset([{"image_id": 1}, {"image_id": "img_7"}], path)
    np.testing.assert_allclose(dicts[0]["proposal_boxes"], [[0, 0, 100, 80], [10.5, 20.25, 50, 60], [30, 30, 31, 32]])
    np.testing.assert_allclose(logit_to_score(dicts[1]["proposal_objectness_logits"]), [0.5, 0.25], atol=1e-6)


def test_detectron2_legacy_names_and_xywh(tmp_path):
    legacy = {"indexes": np.array([5, 6]), "boxes": [np.array([[10, 20, 30, 40]], np.float32), np.zeros((0, 4))],
              "scores": [np.array([0.0], np.float32), np.zeros(0)], "bbox_mode": BoxMode.XYWH_ABS}
    proposals = read_proposal_file(_write_pickle(tmp_path / "legacy.pkl", legacy), "detectron2")
    assert proposals.image_ids() == ["5", "6"]
    np.testing.assert_allclose(proposals.boxes["5"], [[10, 20, 40, 60]])  # XYWH -> XYXY
    np.testing.assert_allclose(proposals.scores["5"], [0.5])  # sigmoid of logit 0
    assert proposals.boxes["6"].shape == (0, 4)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_detectron2_pickles_of_any_protocol(tmp_path, protocol):
    content = {"ids": ["a"], "boxes": [np.array([[1, 2, 3, 4]], np.float32)], "objectness_logits": [np.array([2.0])]}
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    assert detect_format(str(path)) == "detectron2"
    proposals = read_proposal_file(str(path))
    np.testing.assert_allclose(proposals.scores["a"], [1 / (1 + np.exp(-2.0))], rtol=1e-6)


def test_explicit_wrong_format_is_an_error(tmp_path):
    path = write_proposal_file(_proposal_set(), str(tmp_path / "g.json"), "glip")
    with pytest.raises(ProposalFileError) as e:
        read_proposal_file(path, "coco")
    assert path in str(e.value) and "'coco'" in str(e.value) and "'glip'" in str(e.value)
    with pytest.raises(ProposalFileError, match="pickle"):
        read_proposal_file(path, "detectron2")


# ----------------------------------------------------------------------------- attaching


def _records(*sizes):
    """Dataset dicts with image ids 1, 2, ... and the given (height, width)."""
    return [{"image_id": i + 1, "height": h, "width": w, "file_name": f"{i + 1}.jpg"} for i, (h, w) in enumerate(sizes)]


def test_attach_gives_detectron2_keys_that_transform_proposals_reads():
    proposals = ProposalSet("memory", "glip", boxes={"1": [[0, 0, 50, 40], [10, 10, 20, 20], [60, 0, 100, 50]]},
                            scores={"1": [0.3, 0.9, 0.6]})
    records = _records((50, 100))
    attach_proposals(records, proposals)
    record = records[0]
    assert record["proposal_bbox_mode"] == BoxMode.XYXY_ABS
    assert record["proposal_boxes"].dtype == np.float32 and record["proposal_boxes"].shape == (3, 4)
    assert record["proposal_objectness_logits"].dtype == np.float32
    np.testing.assert_allclose(logit_to_score(record["proposal_objectness_logits"]), [0.9, 0.6, 0.3], atol=1e-6)

    # The mapper: resize 50x100 -> 100x200, keep the best 2.
    transforms = T.TransformList([T.ResizeTransform(50, 100, 100, 200)])
    transform_proposals(record, (100, 200), transforms, proposal_topk=2)
    instances = record["proposals"]
    assert instances.image_size == (100, 200) and len(instances) == 2
    torch.testing.assert_close(instances.proposal_boxes.tensor, torch.tensor([[20., 20, 40, 40], [120, 0, 200, 100]]))
    torch.testing.assert_close(torch.sigmoid(instances.objectness_logits), torch.tensor([0.9, 0.6]))
    assert "proposal_boxes" not in record


def test_attach_counts_missing_and_unknown_images(caplog):
    proposals = ProposalSet("props.json", "glip",
                            boxes={"1": [[0, 0, 5, 5]], "2": [[1, 1, 4, 4]], "99": [[0, 0, 1, 1]]},
                            scores={"1": [0.5], "2": [0.5], "99": [0.5]})
    records = _records((10, 10), (10, 10), (10, 10))
    with caplog.at_level(logging.WARNING):
        report = attach_proposals(records, proposals)
    assert report["images_in_dataset"] == 3 and report["images_with_proposals"] == 2
    assert report["images_without_proposals"] == 1 and report["missing_image_ids"] == [3]
    assert report["file_images_not_in_dataset"] == 1 and report["unknown_image_ids"] == [99]
    assert report["boxes_in_file_for_dataset"] == 2 and report["boxes_kept"] == 2
    assert records[2]["proposal_boxes"].shape == (0, 4) and records[2]["proposal_objectness_logits"].shape == (0,)
    json.dumps(report)  # serialisable
    text = caplog.text
    assert "1 of 3 dataset images have no entry" in text and "[3]" in text
    assert "1 image ids of the file are not in the dataset" in text and "[99]" in text


def test_file_matching_no_image_is_an_error():
    proposals = ProposalSet("other.json", "coco", boxes={"7": [[0, 0, 1, 1]], "8": [], "9": []},
                            scores={"7": [0.5], "8": [], "9": []})
    with pytest.raises(ProposalFileError) as e:
        attach_proposals(_records((10, 10), (10, 10)), proposals)
    message = str(e.value)
    assert "other.json" in message and "matches no image" in message and "3 image ids" in message
    assert "[7, 8, 9]" in message and "[1, 2]" in message


def test_score_threshold_nms_topk_counts():
    boxes = [[0, 0, 10, 11],     # A'  0.8, IoU 0.91 with A: removed by NMS
             [0, 0, 10, 10],     # A   0.9
             [20, 20, 30, 30],   # B   0.7
             [40, 40, 50, 50],   # C   0.6: removed by top-2
             [60, 60, 70, 70]]   # D   0.05: below the threshold
    proposals = ProposalSet("p", "glip", boxes={"1": boxes}, scores={"1": [0.8, 0.9, 0.7, 0.6, 0.05]})
    records = _records((100, 100))
    report = attach_proposals(records, proposals, score_thresh=0.1, nms_thresh=0.5, topk=2)
    assert (report["boxes_below_score_thresh"], report["boxes_removed_by_nms"], report["boxes_removed_by_topk"],
            report["boxes_kept"], report["degenerate_boxes_dropped"]) == (1, 1, 1, 2, 0)
    assert report["boxes_in_file_for_dataset"] == 5
    assert (report["score_thresh"], report["nms_thresh"], report["topk"]) == (0.1, 0.5, 2)
    np.testing.assert_allclose(records[0]["proposal_boxes"], [[0, 0, 10, 10], [20, 20, 30, 30]])
    # Without selection everything is kept, best first.
    records = _records((100, 100))
    assert attach_proposals(records, proposals)["boxes_kept"] == 5
    np.testing.assert_allclose(logit_to_score(records[0]["proposal_objectness_logits"]), [0.9, 0.8, 0.7, 0.6, 0.05],
                               atol=1e-6)


def test_boxes_within_tolerance_are_clipped_and_degenerate_ones_dropped():
    # 100 x 50 (W x H) image: tolerance 1 + 2 px horizontally, 1 + 1 px vertically.
    proposals = ProposalSet("p", "glip", boxes={"1": [[-2.5, -1.5, 102.5, 51.5], [100.5, 10, 102, 20]]},
                            scores={"1": [0.9, 0.8]})
    records = _records((50, 100))
    report = attach_proposals(records, proposals)
    np.testing.assert_allclose(records[0]["proposal_boxes"], [[0, 0, 100, 50]])
    assert report["degenerate_boxes_dropped"] == 1 and report["boxes_kept"] == 1


def test_boxes_far_outside_the_image_are_an_error():
    proposals = ProposalSet("far.json", "glip", boxes={"1": [[0, 0, 10, 10], [0, 0, 104, 10]]},
                            scores={"1": [0.9, 0.8]})
    with pytest.raises(ProposalFileError) as e:
        attach_proposals(_records((50, 100)), proposals)
    message = str(e.value)
    assert "far.json" in message and "image 1, box 1" in message and "[0.0, 0.0, 104.0, 10.0]" in message
    assert "100x50" in message and "ORIGINAL image" in message


# ----------------------------------------------------------------------------- errors


GOOD_BOX = [0, 0, 10, 10]
ERRORS = [
    ("glip without scores", "json", {"7": {"boxes": [GOOD_BOX]}}, ["image 7", "lacks 'scores'", '"scores"']),
    ("glip lengths differ", "json", {"7": {"boxes": [GOOD_BOX, GOOD_BOX], "scores": [0.5]}},
     ["image 7", "2 boxes but 1 scores"]),
    ("glip boxes not (N, 4)", "json", {"7": {"boxes": [[0, 0, 10]], "scores": [0.5]}}, ["image 7", "(N, 4)", "(1, 3)"]),
    ("glip ragged boxes", "json", {"7": {"boxes": [GOOD_BOX, [1, 2]], "scores": [0.5, 0.5]}}, ["image 7", "(N, 4)"]),
    ("XYWH where XYXY is declared", "json", {"7": {"boxes": [GOOD_BOX, [20, 30, 5, 8]], "scores": [0.5, 0.5]}},
     ["image 7, box 1", "[20.0, 30.0, 5.0, 8.0]", "declares XYXY", "XYWH"]),
    ("NaN score", "json", {"7": {"boxes": [GOOD_BOX], "scores": [float("nan")]}},
     ["image 7, box 0", "score is nan", "probability in [0, 1]"]),
    ("infinite coordinate", "json", {"7": {"boxes": [[0, 0, float("inf"), 1]], "scores": [0.5]}},
     ["image 7, box 0", "NaN or infinity"]),
    ("score above 1", "json", {"7": {"boxes": [GOOD_BOX], "scores": [1.5]}},
     ["image 7, box 0", "score 1.5 is outside [0, 1]", "logits"]),
    ("coco negative size", "json", [{"image_id": 7, "bbox": [5, 5, 10, 10], "score": 0.5},
                                    {"image_id": 7, "bbox": [5, 5, -3, 10], "score": 0.5}],
     ["entry 1 (image_id 7)", "negative width or height", "[x, y, w, h]"]),
    ("coco without bbox", "json", [{"image_id": 7, "score": 0.5, "category_id": 1}],
     ["entry 0 (image_id 7)", "lacks 'bbox'", '"bbox": [x, y, w, h]']),
    ("coco score above 1", "json", [{"image_id": 7, "bbox": [5, 5, 10, 10], "score": 2.0}],
     ["entry 0 (image_id 7)", "outside [0, 1]"]),
    ("detectron2 without logits", "pickle", {"ids": [7], "boxes": [np.zeros((0, 4))]},
     ["lacks 'objectness_logits'", "objectness_logits"]),
    ("detectron2 NaN logit", "pickle", {"ids": [7], "boxes": [np.array([GOOD_BOX], float)],
                                        "objectness_logits": [np.array([np.nan])]},
     ["image 7, box 0", "logit is NaN"]),
    ("detectron2 relative box mode", "pickle", {"ids": [7], "boxes": [np.zeros((0, 4))],
                                                "objectness_logits": [np.zeros(0)], "bbox_mode": 2},
     ["bbox_mode 2", "XYXY_ABS"]),
    ("detectron2 lengths differ", "pickle",
     {"ids": [7, 8], "boxes": [np.zeros((0, 4))], "objectness_logits": [np.zeros(0)]},
     ["2 ids, 1 box arrays"]),
    ("pickle of a foreign class", "pickle", {"ids": [7], "boxes": [], "objectness_logits": [], "x": logging.INFO,
                                             "when": __import__("datetime").date(2024, 1, 1)},
     ["refusing to load datetime.date"]),
]


@pytest.mark.parametrize("name, kind, content, fragments", ERRORS, ids=[e[0] for e in ERRORS])
def test_invalid_content_is_a_clear_error(tmp_path, name, kind, content, fragments):
    path = (_write_json if kind == "json" else _write_pickle)(tmp_path / "bad_file", content)
    with pytest.raises(ProposalFileError) as e:
        read_proposal_file(path)
    assert isinstance(e.value, InputError) and isinstance(e.value, ValueError)
    message = str(e.value)
    assert path in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert e.value.__cause__ is None  # no numpy / json trace chained to it


@pytest.mark.parametrize("content, fragment", [(b"x0 y0 x1 y1\n1 2 3 4\n", "neither JSON nor a pickle"),
                                               (b"", "empty"),
                                               (b'{"1": {"boxes": [[0, 0, 1, 1]], ', "not valid JSON"),
                                               (b"  123", "JSON top level is int")])
def test_unreadable_files_are_a_clear_error(tmp_path, content, fragment):
    path = tmp_path / "proposals.txt"
    path.write_bytes(content)
    # detect_format only peeks at the start of a file that starts like JSON
    calls = (read_proposal_file,) if content.startswith(b"{") else (detect_format, read_proposal_file)
    for call in calls:
        with pytest.raises(ProposalFileError) as e:
            call(str(path))
        assert str(path) in str(e.value) and fragment in str(e.value)


def test_json_scalar_top_level_is_an_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('  "proposals"')
    with pytest.raises(ProposalFileError, match="JSON top level is str; expected an object"):
        read_proposal_file(str(path))
