"""tools/convert_openimages.py on tiny synthetic OpenImages CSV files and images: exact pixel
boxes, categories, image-level labels, IsGroupOf, and one clear error for each kind of bad input."""

import json
import os
import sys

import pytest
from PIL import Image

from conftest import load_tool

tool = load_tool("convert_openimages")  # worker processes find image_size by its module's name

BOX_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,"
              "IsDepiction,IsInside,XClick1X,XClick2X,XClick3X,XClick4X,XClick1Y,XClick2Y,XClick3Y,XClick4Y")
CLICKS = ",-1,-1,-1,-1,-1,-1,-1,-1"


def _box(image, mid, x0, x1, y0, y1, group=0):
    return f"{image},xclick,{mid},1,{x0},{x1},{y0},{y1},0,0,{group},0,0" + CLICKS


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture
def split(tmp_path):
    """Three classes (no header, as the official boxable file), four images in a flat folder and a
    train_0-style sub-folder (one turned by EXIF orientation 6), boxes and image-level labels."""
    images = tmp_path / "images"
    (images / "train_0").mkdir(parents=True)
    Image.new("RGB", (640, 480)).save(images / "0aaa.jpg")
    Image.new("RGB", (200, 100)).save(images / "train_0" / "0bbb.jpg")
    Image.new("RGB", (300, 300)).save(images / "0ccc.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned by 90 degrees: 50 wide, 80 high
    Image.new("RGB", (80, 50)).save(images / "0ddd.jpg", exif=exif)
    classes = _write(tmp_path / "class-descriptions-boxable.csv",
                     ["/m/0cat,Cat", "/m/0dog,Dog", '/m/0tab,"Kitchen & dining room table, wooden"'])
    boxes = _write(tmp_path / "boxes.csv", [
        BOX_HEADER,
        _box("0bbb", "/m/0dog", 0, 1, 0, 1, group=1),
        _box("0aaa", "/m/0cat", 0.25, 0.5, 0.1, 0.6),
        _box("0aaa", "/m/0dog", 0.3, 0.3, 0.1, 0.6),  # zero width: skipped
        _box("0ddd", "/m/0tab", 0.1, 0.5, 0.25, 0.75),
    ])
    labels = _write(tmp_path / "labels.csv", [
        "ImageID,Source,LabelName,Confidence",
        "0aaa,verification,/m/0cat,1",
        "0aaa,verification,/m/0tab,0",
        "0aaa,verification,/m/0notboxable,1",  # class outside the 3 boxable ones: skipped
        "0ccc,verification,/m/0dog,0",  # image without boxes, in the folder: kept
        "0eee,verification,/m/0dog,1",  # image neither in the box file nor in the folder: skipped
        "0bbb,crowdsource-verification,/m/0dog,1",
    ])
    return {"boxes": boxes, "classes": classes, "labels": labels, "images": str(images),
            "out": str(tmp_path / "out" / "openimages_v6_val.json"), "tmp": tmp_path}


def _argv(s, *extra):
    return ["--boxes", s["boxes"], "--classes", s["classes"], "--image-labels", s["labels"], "--images", s["images"],
            "--output", s["out"], *extra]


def test_converts_boxes_labels_and_classes_exactly(split, capsys):
    assert tool.main(_argv(split)) == 0
    data = json.load(open(split["out"]))
    assert data["categories"] == [{"id": 1, "name": "Cat", "mid": "/m/0cat"},
                                  {"id": 2, "name": "Dog", "mid": "/m/0dog"},
                                  {"id": 3, "name": "Kitchen & dining room table, wooden", "mid": "/m/0tab"}]
    images = {img["file_name"]: img for img in data["images"]}
    assert [img["file_name"] for img in data["images"]] == ["0aaa.jpg", os.path.join("train_0", "0bbb.jpg"),
                                                             "0ccc.jpg", "0ddd.jpg"]  # ids in ImageID order
    assert [img["id"] for img in data["images"]] == [1, 2, 3, 4]
    assert (images["0aaa.jpg"]["width"], images["0aaa.jpg"]["height"]) == (640, 480)
    assert (images["0ddd.jpg"]["width"], images["0ddd.jpg"]["height"]) == (50, 80)  # EXIF-turned
    assert images["0aaa.jpg"]["image_level_labels"] == {"positive": [1], "negative": [3]}
    assert images["0ccc.jpg"]["image_level_labels"] == {"positive": [], "negative": [2]}
    assert images[os.path.join("train_0", "0bbb.jpg")]["image_level_labels"] == {"positive": [2], "negative": []}
    anns = data["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3]
    by_image = {a["image_id"]: a for a in anns}
    cat = by_image[1]  # 0aaa: 640x480, XMin .25 XMax .5 YMin .1 YMax .6
    assert cat["category_id"] == 1 and cat["bbox"] == [160.0, 48.0, 160.0, 240.0] and cat["area"] == 38400.0
    assert cat["iscrowd"] == 0
    dog = by_image[2]
    assert dog["bbox"] == [0.0, 0.0, 200.0, 100.0] and dog["iscrowd"] == 1  # IsGroupOf
    table = by_image[4]  # 0ddd displayed 50x80
    assert table["category_id"] == 3 and table["bbox"] == [5.0, 20.0, 20.0, 40.0]
    assert 3 not in by_image  # 0ccc has no boxes
    out = capsys.readouterr().out
    for line in ("images: 4 (with boxes: 3, without boxes: 1)", "boxes: 3 (IsGroupOf: 1)",
                 "classes: 3 (with boxes: 3)", "image-level labels: 2 positive, 2 negative",
                 "boxes: zero width or height: 1", "image labels: class not boxable: 1",
                 "image labels: image neither in the box file nor in --images: 1",
                 "images turned by their EXIF orientation (width and height swapped): 1"):
        assert line in out, line


def test_class_file_with_header_and_sizes_table(split):
    _write(split["tmp"] / "class-descriptions-boxable.csv",
           ["LabelName,DisplayName", "/m/0cat,Cat", "/m/0dog,Dog", "/m/0tab,Table"])
    sizes = _write(split["tmp"] / "sizes.csv", ["ImageID,Width,Height", "0aaa,1000,500", "0zzz,1,1"])
    assert tool.main(_argv(split, "--image-sizes", sizes)) == 0
    data = json.load(open(split["out"]))
    assert [c["name"] for c in data["categories"]] == ["Cat", "Dog", "Table"]
    first = data["images"][0]
    assert (first["file_name"], first["width"], first["height"]) == ("0aaa.jpg", 1000, 500)  # not read from disk
    assert data["annotations"][1]["bbox"] == [250.0, 50.0, 250.0, 250.0]


def test_without_image_labels(split):
    argv = _argv(split)
    i = argv.index("--image-labels")
    del argv[i:i + 2]
    assert tool.main(argv) == 0
    data = json.load(open(split["out"]))
    assert len(data["images"]) == 3 and all(img["image_level_labels"] == {"positive": [], "negative": []}
                                            for img in data["images"])


def test_streamed_json_across_write_chunks(split, monkeypatch):
    """Images and boxes written in several chunks (as for the full train split) form valid json."""
    rows = [BOX_HEADER] + [_box(key, "/m/0dog", 0.1 * (i % 5), 0.6, 0.2, 0.9, group=i % 2)
                           for key in ("0aaa", "0bbb", "0ccc", "0ddd") for i in range(7)]
    _write(split["tmp"] / "boxes.csv", rows)
    expected = None
    writer = sys.modules[tool.write_json.__module__]  # the module whose chunk sizes write_json reads
    for image_chunk, box_chunk in ((4096, 16384), (1, 1), (2, 3), (3, 28), (4, 5)):
        monkeypatch.setattr(writer, "IMAGE_CHUNK", image_chunk)
        monkeypatch.setattr(writer, "BOX_CHUNK", box_chunk)
        assert tool.main(_argv(split, "--overwrite")) == 0
        data = json.load(open(split["out"]))
        assert len(data["images"]) == 4 and [a["id"] for a in data["annotations"]] == list(range(1, 29))
        expected = expected or data
        assert data == expected


def test_image_sizes_in_worker_processes(split):
    path = os.path.join(split["images"], "0ddd.jpg")
    results = tool.read_image_sizes([path] * 300 + [os.path.join(split["images"], "nope.jpg")], workers=2)
    assert results[:300] == [(50, 80, 1, None)] * 300 and results[300][3] == "missing"


def _error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convert_openimages.py: error: "), err
    return err[0]


def _leftovers(split):
    folder = os.path.dirname(split["out"])
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.mark.parametrize("case, expected", [
    ("missing boxes", r"input file not found: .*nope\.csv"),
    ("box columns", r"boxes\.csv: expected the columns ImageID, LabelName, XMin, XMax, YMin, YMax, IsGroupOf .*"
                    r"found ImageID, Label, XMin, XMax, YMin, YMax"),
    ("label columns", r"labels\.csv: expected the columns ImageID, LabelName, Confidence .*found ImageID, Label"),
    ("class columns", r"class-descriptions-boxable\.csv, row 2: expected the 2 columns LabelName, DisplayName"),
    ("outside", r"boxes\.csv, row 3: box coordinates outside \[0, 1\]: XMin 0.2, XMax 1.5"),
    ("negative", r"boxes\.csv, row 2: box coordinates outside \[0, 1\]: XMin -0.1"),
    ("x1 < x0", r"boxes\.csv, row 3: XMax < XMin or YMax < YMin: XMin 0.6, XMax 0.4"),
    ("not a number", r"boxes\.csv, row 2: XMin, XMax, YMin, YMax must be numbers"),
    ("unknown label", r"boxes\.csv, row 3: unknown LabelName '/m/0owl'"),
    ("image missing", r"1 images of .*boxes\.csv are not in .*images \(e\.g\. 0fff\); pass --skip-missing-images"),
    ("unreadable image", r"1 images cannot be read .*0bbb\.jpg"),
])
def test_errors(split, capsys, case, expected):
    import re

    argv = _argv(split)
    if case == "missing boxes":
        argv[1] = str(split["tmp"] / "nope.csv")
    elif case == "box columns":
        _write(split["tmp"] / "boxes.csv", ["ImageID,Label,XMin,XMax,YMin,YMax", "0aaa,/m/0cat,0,1,0,1"])
    elif case == "label columns":
        _write(split["tmp"] / "labels.csv", ["ImageID,Label,Confidence", "0aaa,/m/0cat,1"])
    elif case == "class columns":
        _write(split["tmp"] / "class-descriptions-boxable.csv", ["/m/0cat,Cat", "/m/0dog,Dog,extra"])
    else:
        rows = {"outside": [_box("0aaa", "/m/0cat", 0.2, 1.5, 0, 1)],
                "negative": [],
                "x1 < x0": [_box("0aaa", "/m/0cat", 0.6, 0.4, 0, 1)],
                "not a number": [],
                "unknown label": [_box("0aaa", "/m/0owl", 0, 1, 0, 1)],
                "image missing": [_box("0fff", "/m/0cat", 0, 1, 0, 1)],
                "unreadable image": []}[case]
        first = {"negative": _box("0aaa", "/m/0cat", -0.1, 0.5, 0, 1),
                 "not a number": _box("0aaa", "/m/0cat", "abc", 0.5, 0, 1)}.get(
                     case, _box("0aaa", "/m/0cat", 0, 1, 0, 1))
        _write(split["tmp"] / "boxes.csv", [BOX_HEADER, first, *rows, _box("0bbb", "/m/0dog", 0, 1, 0, 1)])
        if case == "unreadable image":
            (split["tmp"] / "images" / "train_0" / "0bbb.jpg").write_bytes(b"not a jpeg")
    assert tool.main(argv) == 2
    assert re.search(expected, _error(capsys)), case
    log = os.path.basename(split["out"]) + ".log"  # the run's log, with the traceback, once the output is checked
    assert _leftovers(split) == ([] if case == "missing boxes" else [log])  # nothing else written, no temporary file


def test_missing_images_can_be_left_out(split, capsys):
    _write(split["tmp"] / "boxes.csv", [BOX_HEADER, _box("0aaa", "/m/0cat", 0, 1, 0, 1),
                                        _box("0fff", "/m/0cat", 0, 1, 0, 1)])
    assert tool.main(_argv(split, "--skip-missing-images")) == 0
    data = json.load(open(split["out"]))
    assert [img["file_name"] for img in data["images"]] == ["0aaa.jpg", os.path.join("train_0", "0bbb.jpg"), "0ccc.jpg"]
    assert len(data["annotations"]) == 1
    out = capsys.readouterr().out
    assert "images left out: not in --images: 1" in out and "boxes left out with their images: 1" in out


def test_refuses_to_overwrite_inputs_and_outputs(split, capsys):
    argv = _argv(split)
    argv[argv.index("--output") + 1] = split["labels"]
    before = open(split["labels"]).read()
    assert tool.main(argv) == 2
    assert "refusing to write" in _error(capsys) and open(split["labels"]).read() == before
    assert tool.main(_argv(split)) == 0
    capsys.readouterr()
    assert tool.main(_argv(split)) == 2
    assert "exists; pass --overwrite" in _error(capsys)
    assert tool.main(_argv(split, "--overwrite")) == 0


def test_output_is_atomic(split, monkeypatch):
    assert tool.main(_argv(split)) == 0
    good = open(split["out"]).read()

    def broken(f, *args, **kwargs):
        f.write('{"images": [')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tool, "write_json", broken)
    assert tool.main(_argv(split, "--overwrite")) == 2
    assert open(split["out"]).read() == good  # the previous file is untouched
    name = os.path.basename(split["out"])
    assert _leftovers(split) == [name, name + ".log"]  # and no temporary file is left
    log = open(split["out"] + ".log").read()
    assert "Traceback" in log
    # the disk-full line of regionspot.io: the folder, what was written, what is free
    assert f"no space left in {os.path.dirname(os.path.abspath(split['out']))} for {name}" in log
    assert "more than the 12 bytes written" in log and "bytes are free" in log
