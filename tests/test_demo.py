"""demo/demo.py: draws predictions and writes JSON per image; failures are named, others go on."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from demo import demo


@pytest.fixture
def images(tmp_path):
    rng = np.random.RandomState(0)
    paths = []
    for name, size in (("a.png", (240, 320)), ("b.jpg", (300, 200))):
        path = tmp_path / "in" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray((rng.rand(*size, 3) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(autouse=True)
def _head(head_path):
    global HEAD
    HEAD = head_path


def _run(tmp_path, sam_path, clip_path, inputs, boxes, vocab=("custom", "cat,dog,remote control")):
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps(boxes))
    argv = ["--config-file", "configs/regionspot_sample_cpu.yaml", "--input", *inputs,
            "--boxes", str(boxes_file), "--vocabulary", vocab[0], "--custom-vocabulary", vocab[1],
            "--output", str(tmp_path / "out"),
            "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"), "MODEL.WEIGHTS", HEAD]
    return demo.main(argv)


def _error_line(capsys) -> str:
    """The demo's one error line on stderr (and no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("demo.py: error: "), err
    return err[0]


def test_writes_drawing_and_predictions(tmp_path, images, sam_path, clip_path, monkeypatch):
    monkeypatch.chdir(demo.__file__.rsplit("/demo/", 1)[0])
    boxes = {"a.png": [[10, 10, 100, 120], [150, 40, 300, 230]], str(images[1]): [[0, 0, 200, 300]]}
    assert _run(tmp_path, sam_path, clip_path, [str(tmp_path / "in" / "*")], boxes) == 0
    out = tmp_path / "out"
    pred = json.loads((out / "a.json").read_text())
    assert [p["box_xyxy"] for p in pred["predictions"]] == boxes["a.png"]
    assert {p["label"] for p in pred["predictions"]} <= {"cat", "dog", "remote control"}
    drawn = np.asarray(Image.open(out / "a.jpg"))
    assert drawn.shape == (240, 320, 3)
    original = np.asarray(Image.open(images[0]))
    assert np.abs(drawn.astype(int) - original.astype(int)).mean() > 1  # something was drawn
    assert (out / "b.jpg").exists() and (out / "b.json").exists()


def test_bad_inputs_are_refused_before_any_model_is_loaded(tmp_path, images, sam_path, clip_path, monkeypatch,
                                                          capsys):
    """A missing image, an image without boxes and boxes outside their image: all listed in one
    line, before a model is loaded or the output folder created."""
    monkeypatch.chdir(demo.__file__.rsplit("/demo/", 1)[0])
    boxes = {"a.png": [[10, 10, 100, 120]], "b.jpg": [[0, 0, 500, 300]], "missing.png": [[0, 0, 5, 5]]}
    inputs = [str(images[0]), str(images[1]), str(tmp_path / "missing.png")]
    assert _run(tmp_path, sam_path, clip_path, inputs, boxes) == 2
    line = _error_line(capsys)
    assert "2 of 3 input image(s)" in line and "b.jpg" in line and "outside" in line
    assert "missing.png" in line and "not found" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # no model, no folder
    # a name the --boxes file lacks
    assert _run(tmp_path, sam_path, clip_path, [str(images[0])], {"other.png": [[1, 1, 9, 9]]}) == 2
    assert "no boxes for image" in _error_line(capsys) and not (tmp_path / "out").exists()


def test_an_image_failing_late_is_named_and_the_rest_goes_on(tmp_path, images, sam_path, clip_path, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(demo.__file__.rsplit("/demo/", 1)[0])
    truncated = tmp_path / "in" / "c.jpg"
    data = images[1].read_bytes()
    truncated.write_bytes(data[:len(data) // 2])  # a valid header, half the pixels
    boxes = {"a.png": [[10, 10, 100, 120]], "c.jpg": [[1, 1, 9, 9]]}
    assert _run(tmp_path, sam_path, clip_path, [str(images[0]), str(truncated)], boxes) == 1
    out = capsys.readouterr().out
    assert "c.jpg" in out and "truncated" in out and "1 image(s) failed" in out
    assert (tmp_path / "out" / "a.json").exists() and not (tmp_path / "out" / "c.json").exists()


def test_empty_custom_vocabulary_is_refused(tmp_path, images, sam_path, clip_path, capsys):
    code = _run(tmp_path, sam_path, clip_path, [str(images[0])], {"a.png": [[1, 1, 9, 9]]}, ("custom", " , "))
    assert code == 2 and "custom vocabulary" in _error_line(capsys)


def test_an_empty_head_is_refused_unless_asked_for(tmp_path, images, sam_path, clip_path, monkeypatch, capsys):
    """No silent random head: an empty MODEL.WEIGHTS is refused; --untrained-head allows it and
    the JSON records it; a real head file is logged and recorded."""
    monkeypatch.chdir(demo.__file__.rsplit("/demo/", 1)[0])
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.png": [[10, 10, 100, 120]]}))
    argv = ["--config-file", "configs/regionspot_sample_cpu.yaml", "--input", str(images[0]), "--boxes", str(boxes),
            "--vocabulary", "custom", "--custom-vocabulary", "cat,dog", "--output", str(tmp_path / "out"),
            "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache")]
    assert demo.main(argv) == 2
    assert "MODEL.WEIGHTS is empty" in _error_line(capsys) and not (tmp_path / "out").exists()
    assert demo.main(["--untrained-head"] + argv) == 0
    assert "randomly initialised head" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "a.json").read_text())["weights"] == "untrained"
    assert demo.main(argv + ["MODEL.WEIGHTS", HEAD]) == 0
    assert capsys.readouterr().out.count(f"head: {HEAD}") == 1
    assert json.loads((tmp_path / "out" / "a.json").read_text())["weights"] == HEAD
    log = (tmp_path / "out" / "log.txt").read_text()  # the project's lines, also in the log file
    assert log.count(f"head: {HEAD}") == 1 and f"Loaded the RegionSpot head from {HEAD}" in log


def test_recognise_everything_without_boxes(tmp_path, images, sam_path, clip_path, monkeypatch):
    """--proposals sam_auto: no box file; SAM's automatic masks give the regions."""
    monkeypatch.chdir(demo.__file__.rsplit("/demo/", 1)[0])
    argv = ["--config-file", "configs/regionspot_sample_cpu.yaml", "--input", str(images[0]),
            "--proposals", "sam_auto", "--vocabulary", "custom", "--custom-vocabulary", "cat,dog",
            "--output", str(tmp_path / "out"), "--min-score", "0",
            "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"),
            "MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", "4", "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH", "0.0",
            "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH", "0.0", "MODEL.WEIGHTS", HEAD]
    assert demo.main(argv) == 0
    pred = json.loads((tmp_path / "out" / "a.json").read_text())["predictions"]
    assert pred and all(p["label"] in ("cat", "dog") and 0 <= p["proposal_score"] <= 1 for p in pred)
    assert all(p["score"] <= p["proposal_score"] + 1e-6 for p in pred)  # proposal score x class probability
    # rpn without weights is refused before any image
    argv[argv.index("sam_auto")] = "rpn"
    assert demo.main(argv) == 2


def test_never_writes_over_an_input(tmp_path, images, sam_path, clip_path, monkeypatch, capsys):
    """--output equal to the inputs' folder, or an output that would be an input: refused up front."""
    monkeypatch.chdir(demo.__file__.rsplit("/demo/", 1)[0])
    before = images[1].read_bytes()
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.png": [[1, 1, 50, 50]], "b.jpg": [[1, 1, 50, 50]]}))
    base = ["--config-file", "configs/regionspot_sample_cpu.yaml", "--boxes", str(boxes), "--vocabulary", "custom",
            "--custom-vocabulary", "cat,dog", "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path,
            "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"),
            "MODEL.WEIGHTS", HEAD]
    code = demo.main(["--input", str(images[1]), "--output", str(images[1].parent)] + base)
    assert code == 2 and "is the folder of input images" in _error_line(capsys)
    # the photos folder given with a trailing slash / through a relative path: the same folder
    code = demo.main(["--input", str(images[1]), "--output", os.path.relpath(images[1].parent) + os.sep] + base)
    assert code == 2 and "is the folder of input images" in _error_line(capsys)
    assert images[1].read_bytes() == before and not (tmp_path / "cache").exists()  # nothing computed or written


def test_same_named_inputs_keep_their_outputs_apart(tmp_path, sam_path, clip_path, monkeypatch, capsys):
    monkeypatch.chdir(demo.__file__.rsplit("/demo/", 1)[0])
    rng = np.random.RandomState(0)
    (tmp_path / "in").mkdir()
    for ext in ("jpg", "png"):
        Image.fromarray((rng.rand(100, 120, 3) * 255).astype(np.uint8)).save(tmp_path / "in" / f"photo.{ext}")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"photo.jpg": [[1, 1, 50, 50]], "photo.png": [[10, 10, 90, 60], [0, 0, 20, 20]]}))
    if True:
        code = demo.main(["--config-file", "configs/regionspot_sample_cpu.yaml", "--input", str(tmp_path / "in" / "*"),
                          "--boxes", str(boxes), "--vocabulary", "custom", "--custom-vocabulary", "cat,dog",
                          "--output", str(tmp_path / "out"), "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path,
                          "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
                          "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"), "MODEL.WEIGHTS", HEAD])
    assert code == 0 and "share the name 'photo'" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "out" / "photo_jpg.json").read_text())["predictions"]) == 1
    assert len(json.loads((tmp_path / "out" / "photo_png.json").read_text())["predictions"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["log.txt", "photo_jpg.jpg", "photo_jpg.json",
                                                                     "photo_png.jpg", "photo_png.json"]


def test_boxes_file_errors_name_the_file_and_the_image(tmp_path, images, sam_path, clip_path, monkeypatch, capsys):
    monkeypatch.chdir(demo.__file__.rsplit("/demo/", 1)[0])
    broken = tmp_path / "broken.json"
    broken.write_text('{"a.png": [[1, 2, 3, 4]] "b.jpg": []}')
    assert _run_file(tmp_path, sam_path, clip_path, [str(images[0])], broken) == 2
    line = _error_line(capsys)
    assert "broken.json" in line and "not valid JSON" in line and "line 1" in line
    assert _run(tmp_path, sam_path, clip_path, [str(images[0])], {"a.png": "10, 10, 50, 50"}) == 2
    line = _error_line(capsys)
    assert r"(N, 4)" in line and "'a.png'" in line and "boxes.json" in line


def test_unwritable_output_is_refused_before_any_image(tmp_path, images, sam_path, clip_path, monkeypatch, capsys):
    monkeypatch.chdir(demo.__file__.rsplit("/demo/", 1)[0])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.png": [[1, 1, 50, 50]]}))
    if True:
        code = demo.main(["--config-file", "configs/regionspot_sample_cpu.yaml", "--input", str(images[0]),
                          "--boxes", str(boxes), "--vocabulary", "custom", "--custom-vocabulary", "cat",
                          "--output", str(blocker / "out"), "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path,
                          "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.WEIGHTS", HEAD])
    assert code == 2 and "cannot be written" in _error_line(capsys)


def _run_file(tmp_path, sam_path, clip_path, inputs, boxes_file):
    return demo.main(["--config-file", "configs/regionspot_sample_cpu.yaml", "--input", *inputs,
                      "--boxes", str(boxes_file), "--vocabulary", "custom", "--custom-vocabulary", "cat",
                      "--output", str(tmp_path / "out"), "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path,
                      "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR",
                      str(tmp_path / "cache"), "MODEL.WEIGHTS", HEAD])


def test_points_and_attention_figure(tmp_path, images, sam_path, clip_path):
    """--points: one region per image from SAM's mask of the clicks; --attention: the Fig.-4 figure."""
    argv = ["--config-file", "configs/regionspot_sample_cpu.yaml", "--input", str(images[0]),
            "--points", "100,80", "20,200,0", "--attention", "--vocabulary", "custom", "--custom-vocabulary",
            "cat,dog", "--output", str(tmp_path / "out"),
            "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"), "MODEL.WEIGHTS", HEAD]
    assert demo.main(argv) == 0
    result = json.loads((tmp_path / "out" / "a.json").read_text())
    # these clicks give SAM's mask of a large part of the photo with the seed-0 random SAM: one region
    assert len(result["predictions"]) == 1 and result["filters"]["steps"][0]["stage"].startswith("point prompt")
    figure = np.asarray(Image.open(tmp_path / "out" / "a_attention.png"))
    assert figure.shape[1] == 240 and figure.shape[0] == 4 * (240 + 22)  # the box + 3 layers, one column


def test_bad_point_is_refused(tmp_path, images, sam_path, clip_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--config-file", "configs/regionspot_sample_cpu.yaml", "--input", str(images[0]),
                   "--points", "100", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "X,Y or X,Y,LABEL" in capsys.readouterr().err


def test_mask_prompt_and_missing_regions(tmp_path, images, sam_path, clip_path, capsys):
    """--mask (SAM's mask prompt, alone here); no way to give regions is a one-line error."""
    mask = np.zeros((240, 320), np.uint8)
    mask[40:200, 60:260] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = ["--config-file", "configs/regionspot_sample_cpu.yaml", "--input", str(images[0]),
            "--vocabulary", "custom", "--custom-vocabulary", "cat,dog", "--output", str(tmp_path / "out")]
    opts = ["--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"), "MODEL.WEIGHTS", HEAD]
    assert demo.main(base + ["--mask", str(tmp_path / "mask.png")] + opts) == 0
    result = json.loads((tmp_path / "out" / "a.json").read_text())
    assert result["filters"]["steps"][0]["stage"].startswith("point prompt")
    assert demo.main(base + opts) == 2
    assert "give the regions" in _error_line(capsys)
