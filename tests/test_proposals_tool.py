"""tools/proposals.py: inspect (statistics, coverage, recall) and convert, on the bundled sample."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from conftest import REPO, load_tool
from regionspot.data.datasets.regionspot_sample import _load_sample_dicts, prepare_regionspot_sample
from regionspot.data.proposal_files import read_proposal_file

TOOL = os.path.join(REPO, "tools", "proposals.py")
DATASET = "regionspot_sample_proposals_tool_test"


@pytest.fixture(scope="module")
def tool():
    return load_tool("proposals")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(json_path, gt): the sample's LVIS JSON and its content, registered as DATASET."""
    root = str(tmp_path_factory.mktemp("sample"))
    json_path, _ = prepare_regionspot_sample(root)
    DatasetCatalog.register(DATASET, lambda: _load_sample_dicts(root))
    with open(json_path) as f:
        yield json_path, json.load(f)
    DatasetCatalog.remove(DATASET)


@pytest.fixture(scope="module")
def gt_file(sample, tmp_path_factory):
    """A COCO results file whose boxes are the sample's ground-truth boxes, score 1."""
    _, gt = sample
    results = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 1.0, "category_id": a["category_id"]}
               for a in gt["annotations"]]
    path = tmp_path_factory.mktemp("proposals") / "gt_boxes.json"
    path.write_text(json.dumps(results))
    return str(path)


@pytest.fixture(scope="module")
def random_file(sample, tmp_path_factory):
    """A GLIP-layout file with 5 random boxes per sample image."""
    _, gt = sample
    rng = np.random.default_rng(0)
    content = {}
    for img in gt["images"]:
        xy = rng.uniform(0, 0.5, (5, 2)) * [img["width"], img["height"]]
        wh = rng.uniform(0.05, 0.5, (5, 2)) * [img["width"], img["height"]]
        content[str(img["id"])] = {"boxes": np.concatenate([xy, xy + wh], 1).tolist(),
                                   "scores": rng.uniform(0, 1, 5).tolist()}
    path = tmp_path_factory.mktemp("proposals") / "random.json"
    path.write_text(json.dumps(content))
    return str(path)


def _inspect(tool, tmp_path, *argv):
    output = str(tmp_path / "report.json")
    assert tool.main(["inspect", *argv, "--output", output]) == 0
    with open(output) as f:
        return json.load(f)


def test_inspect_ground_truth_boxes_recall_everything(tool, sample, gt_file, tmp_path, capsys):
    json_path, gt = sample
    report = _inspect(tool, tmp_path, gt_file, "--gt", json_path)
    assert report["format"] == "coco" and report["images"] == 8 and report["boxes"] == len(gt["annotations"])
    assert report["scores"] == {"min": 1.0, "mean": 1.0, "max": 1.0}
    per_image = np.bincount([a["image_id"] for a in gt["annotations"]])[1:]
    assert report["boxes_per_image"] == {"min": int(per_image.min()), "median": float(np.median(per_image)),
                                         "mean": float(per_image.mean()), "max": int(per_image.max())}
    coverage = report["coverage"]
    assert coverage["images_in_dataset"] == 8 and coverage["images_without_proposals"] == 0
    assert coverage["boxes_kept"] == len(gt["annotations"])
    assert report["gt_boxes"] == len(gt["annotations"]) and report["recall"] == {"0.5": 1.0, "0.75": 1.0}
    out = capsys.readouterr().out
    assert "format: coco" in out and "IoU 0.5: 1" in out and "boxes per image: min" in out


def test_inspect_random_boxes_with_registered_dataset(tool, sample, random_file, tmp_path):
    report = _inspect(tool, tmp_path, random_file, "--dataset", DATASET, "--topk", "3")
    assert report["format"] == "glip" and report["dataset"] == DATASET
    coverage = report["coverage"]
    assert coverage["boxes_kept"] == 3 * 8 and coverage["boxes_removed_by_topk"] == 2 * 8
    recall = report["recall"]
    assert recall["0.75"] <= recall["0.5"] < 1.0


def test_inspect_missing_images_lower_recall(tool, sample, gt_file, tmp_path, capsys):
    """Ground-truth boxes of images the file lacks count as missed; the gap is reported."""
    json_path, gt = sample
    results = [r for r in json.load(open(gt_file)) if r["image_id"] != 1]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(results))
    report = _inspect(tool, tmp_path, str(partial), "--gt", json_path)
    on_image_1 = sum(a["image_id"] == 1 for a in gt["annotations"])
    assert report["coverage"]["missing_image_ids"] == [1]
    assert report["recall"]["0.5"] == pytest.approx(1 - on_image_1 / len(gt["annotations"]))
    assert "without: 1" in capsys.readouterr().out


def test_convert_round_trip_through_every_format(tool, gt_file, tmp_path, capsys):
    original = read_proposal_file(gt_file)
    path = gt_file
    for fmt in ("glip", "detectron2", "coco", "glip"):
        out = str(tmp_path / f"{len(os.listdir(tmp_path))}_{fmt}")
        assert tool.main(["convert", path, "--to", fmt, "--output", out]) == 0
        converted = read_proposal_file(out)
        assert converted.format == fmt and converted.image_ids() == original.image_ids()
        for key in original.image_ids():
            np.testing.assert_allclose(converted.boxes[key], original.boxes[key], atol=1e-3)
            np.testing.assert_allclose(converted.scores[key], original.scores[key], atol=1e-6)
        path = out
    assert "wrote 62 boxes of 8 images" in capsys.readouterr().out


def test_convert_refuses_to_overwrite(tool, gt_file, tmp_path, capsys):
    before = open(gt_file, "rb").read()
    link = tmp_path / "link.json"
    os.symlink(gt_file, link)
    for out in (gt_file, str(link)):  # the input itself, by any name, even with --overwrite
        assert tool.main(["convert", gt_file, "--to", "glip", "--output", out, "--overwrite"]) == 2
        assert "it is the input file" in capsys.readouterr().err
    assert open(gt_file, "rb").read() == before
    existing = tmp_path / "existing.json"
    existing.write_text("keep")
    assert tool.main(["convert", gt_file, "--to", "glip", "--output", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_text() == "keep"
    assert tool.main(["convert", gt_file, "--to", "glip", "--output", str(existing), "--overwrite"]) == 0
    assert read_proposal_file(str(existing)).format == "glip"


@pytest.mark.parametrize("argv, fragment", [
    (["inspect", "{bad}"], "neither JSON nor a pickle"),
    (["inspect", "{missing}"], "No such file"),
    (["inspect", "{gt}", "--dataset", "no_such_dataset"], "'no_such_dataset' is not registered"),
    (["inspect", "{gt}", "--gt", "{bad}"], "not a valid JSON file"),
    (["inspect", "{gt}", "--format", "glip"], "expected the 'glip' format"),
])
def test_bad_input_is_one_error_line(tool, gt_file, tmp_path, capsys, argv, fragment):
    bad = tmp_path / "bad.txt"
    bad.write_text("not proposals")
    names = {"bad": str(bad), "missing": str(tmp_path / "missing.json"), "gt": gt_file}
    assert tool.main([a.format(**names) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proposals.py: error: ") and fragment in lines[0]
    assert captured.out == ""


def test_runs_as_a_script(sample, gt_file, tmp_path):
    json_path, _ = sample
    done = subprocess.run([sys.executable, TOOL, "inspect", gt_file, "--gt", json_path, "--nms-thresh", "0.5"],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "class-agnostic recall of 62 ground-truth boxes" in done.stdout
    bad = subprocess.run([sys.executable, TOOL, "inspect", str(tmp_path / "none.pkl")],
                         capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("proposals.py: error: ")
