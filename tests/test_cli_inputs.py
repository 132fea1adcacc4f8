"""The command-line inputs the demo and the region-embedding export share (regionspot.cli):
``--input`` expansion and the ``--boxes`` file, with errors that name the file and the image."""

import json
import os

import pytest

from regionspot.cli import boxes_for, expand_inputs, read_boxes_file
from regionspot.data.validation import InputError


def test_input_patterns_expand_in_the_order_given_and_unmatched_ones_are_kept(tmp_path):
    for name in ("b.png", "a.png", "c.jpg"):
        (tmp_path / name).write_bytes(b"")
    missing = str(tmp_path / "missing.png")
    paths = expand_inputs([str(tmp_path / "c.jpg"), str(tmp_path / "*.png"), missing])
    assert paths == [str(tmp_path / "c.jpg"), str(tmp_path / "a.png"), str(tmp_path / "b.png"), missing]


def test_input_patterns_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.png").write_bytes(b"")
    assert expand_inputs(["~/*.png"]) == [str(tmp_path / "x.png")]


def test_boxes_file_is_read_and_looked_up_by_path_or_file_name(tmp_path):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"a.png": [[0, 0, 5, 5]], os.path.join("d", "b.png"): [[1, 1, 4, 4]]}))
    table = read_boxes_file(str(path))
    assert boxes_for(table, "/photos/a.png", str(path)) == ("a.png", [[0, 0, 5, 5]])  # by file name
    assert boxes_for(table, os.path.join("d", ".", "b.png"), str(path)) == (os.path.join("d", "b.png"),
                                                                             [[1, 1, 4, 4]])  # normalised
    with pytest.raises(InputError, match=r"no boxes for image 'c.png' in .*boxes.json"):
        boxes_for(table, "c.png", str(path))


@pytest.mark.parametrize("content, message", [
    (None, "--boxes file not found"),
    ("{not json", "is not valid JSON: .*line 1"),
    ("[[0, 0, 5, 5]]", "must hold a JSON object .* got a list"),
])
def test_bad_boxes_files_are_named(tmp_path, content, message):
    path = tmp_path / "boxes.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_boxes_file(str(path))
