"""tools/summarize.py: evaluation outputs -> Table-1 layout (text, Markdown, PNG)."""

import io
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, load_tool

DESC = ("proposals: {p}; softmax over 1203 classes; score = proposal score^1 x class probability; "
        "top {topk} (box, class) pairs per image; LVIS evaluator keeps 300 per image")
COMMON = ("softmax over 1203 classes; score = proposal score^1 x class probability; "
          "top 900 (box, class) pairs per image; LVIS evaluator keeps 300 per image")


@pytest.fixture(scope="module")
def tool():
    return load_tool("summarize")


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)  # a NaN as a bare NaN, as metrics.json files were before strict JSON: still read
    return str(path)


def _eval(dataset, proposals, box, segm=None, proposal_file=None, topk=900, weights="weights/regionspot_bl.pth"):
    part = {"gt": "ground-truth boxes", "file": f"file {proposal_file} (top 1000 per image)"}[proposals]
    protocol = {"proposals": proposals, "topk": topk, "description": DESC.format(p=part, topk=topk)}
    if proposal_file:
        protocol["proposal_file"] = "/data/" + proposal_file
    results = {"bbox": box}
    if segm is not None:
        results["segm"] = segm
    return {"dataset": dataset, "weights": weights, "proposals": proposals, "protocol": protocol,
            "proposal_coverage": None, "results": results}


@pytest.fixture
def runs(tmp_path):
    """root/gt: a training folder (JSONWriter log + one eval with masks, a NaN);
    root/glip: two evals without masks (minival and val)."""
    root = tmp_path / "output"
    gt, glip = root / "gt", root / "glip"
    gt.mkdir(parents=True)
    (gt / "metrics.json").write_text('{"iteration": 19, "total_loss": 1.5, "lr": 0.0001}\n'
                                     '{"iteration": 39, "total_loss": 1.2, "lr": 0.0001}\n')
    _write(gt / "inference" / "lvis_v1_val" / "metrics.json",
           _eval("lvis_v1_val", "gt", {"AP": 42.0, "AP50": 60.0, "APr": 50.9, "APc": 50.1, "APf": 46.5},
                 segm={"AP": 37.1, "APr": 40.2, "APc": float("nan"), "APf": 33.3}))
    _write(glip / "inference" / "lvis_v1_val" / "metrics.json",
           _eval("lvis_v1_val", "file", {"AP": 23.7, "APr": 24.9, "APc": 21.6, "APf": 25.5},
                 proposal_file="glip_t_lvis_val.json"))
    _write(glip / "inference" / "lvis_v1_minival" / "metrics.json",
           _eval("lvis_v1_minival", "file", {"AP": 11.1, "APr": 12.2, "APc": 13.3, "APf": 14.4},
                 proposal_file="glip_t_lvis_val.json"))
    return {"root": str(root), "gt": str(gt), "glip": str(glip), "out": str(tmp_path / "summary")}


def _table_rows(text):
    """{label: [cells]} and header cells from the printed plain-text table."""
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    assert set(lines[1]) <= set("-+"), lines[1]
    rows = {}
    for line in lines[2:]:
        if not line.strip():
            break
        cells = [c.strip() for c in line.split("|")]
        rows[cells[0]] = cells[1:]
    return header, rows


def test_rows_keep_run_order_and_derive_labels(tool, runs):
    rows = tool.load_runs([runs["gt"], runs["glip"]])
    # the training log in gt/ is skipped; glip/ rows in sorted path order (minival < val)
    assert [(r.label, r.dataset) for r in rows] == [
        ("GT boxes", "lvis_v1_val"),
        ("file: glip_t_lvis_val.json (lvis_v1_minival)", "lvis_v1_minival"),
        ("file: glip_t_lvis_val.json (lvis_v1_val)", "lvis_v1_val"),
    ]
    assert [r.label for r in tool.load_runs([runs["glip"], runs["gt"]], dataset="lvis_v1_val")] == [
        "file: glip_t_lvis_val.json", "GT boxes"]
    # an output root holding several runs: recursive search, sorted path order (glip < gt)
    assert [r.proposals for r in tool.load_runs([runs["root"]])] == ["file", "file", "gt"]
    labelled = tool.load_runs([runs["gt"], runs["glip"]], labels=["a", "b", "c"])
    assert [r.label for r in labelled] == ["a", "b", "c"]


def test_printed_table_columns_protocol_and_outputs(tool, runs, capsys):
    code = tool.main([runs["gt"], runs["glip"], "--dataset", "lvis_v1_val", "--output-dir", runs["out"],
                      "--note", "random weights: numbers are not accuracy"])
    assert code == 0
    out = capsys.readouterr().out
    header, rows = _table_rows(out)
    assert header == ["Proposals", "Box APr", "APc", "APf", "AP", "Mask APr", "APc", "APf", "AP"]
    assert rows["GT boxes"] == ["50.9", "50.1", "46.5", "42.0", "40.2", "–", "33.3", "37.1"]  # NaN APc
    assert rows["file: glip_t_lvis_val.json"] == ["24.9", "21.6", "25.5", "23.7", "–", "–", "–", "–"]
    assert list(rows) == ["GT boxes", "file: glip_t_lvis_val.json"]
    lines = out.splitlines()
    assert "Dataset: lvis_v1_val" in lines
    assert "Weights (all rows): weights/regionspot_bl.pth" in lines
    protocol = [line for line in lines if line.startswith("Protocol")]
    assert protocol == [f"Protocol (all rows): {COMMON}. Proposals per row: GT boxes = ground-truth boxes; "
                        "file: glip_t_lvis_val.json = file glip_t_lvis_val.json (top 1000 per image)"]
    assert "Note: random weights: numbers are not accuracy" in lines
    md_path, png_path = (os.path.join(runs["out"], "table1.md"), os.path.join(runs["out"], "table1.png"))
    assert md_path in out and png_path in out
    assert sorted(os.listdir(runs["out"])) == ["table1.log", "table1.md", "table1.png"]  # no temp files left

    md = open(md_path).read()
    assert "| Proposals | Box APr | APc | APf | AP | Mask APr | APc | APf | AP |" in md
    assert "| GT boxes | 50.9 | 50.1 | 46.5 | 42.0 | 40.2 | – | 33.3 | 37.1 |" in md
    assert "| file: glip_t_lvis_val.json | 24.9 | 21.6 | 25.5 | 23.7 | – | – | – | – |" in md
    assert protocol[0] in md and "Dataset: lvis_v1_val" in md and "Note: random weights" in md

    from PIL import Image

    with Image.open(png_path) as im:
        im.verify()
    with Image.open(png_path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        two_panel_width = im.size[0]

    # a second run replaces both files (no leftovers), e.g. box-only rows -> one panel, no mask columns
    assert tool.main([runs["glip"], "--dataset", "lvis_v1_val", "--output-dir", runs["out"],
                      "--title", "Second"]) == 0
    out = capsys.readouterr().out
    header, _ = _table_rows(out)
    assert header == ["Proposals", "Box APr", "APc", "APf", "AP"]
    assert sorted(os.listdir(runs["out"])) == ["table1.log", "table1.md", "table1.png"]
    md = open(md_path).read()
    assert md.startswith("# Second\n") and "Mask APr" not in md and "GT boxes" not in md
    assert "Mask AP not evaluated for these runs (no segm results in metrics.json: MODEL.MASK_ON False)" in md
    with Image.open(png_path) as im:
        assert im.size[0] < two_panel_width


def test_protocol_per_row_when_descriptions_differ(tool, tmp_path, capsys):
    a = _write(tmp_path / "a" / "metrics.json", _eval("lvis_v1_val", "gt", {"AP": 1.0}))
    b = _write(tmp_path / "b" / "metrics.json", _eval("lvis_v1_val", "gt", {"AP": 2.0}, topk=300,
                                                      weights="weights/other.pth"))
    assert tool.main([a, b, "--label", "top 900", "top 300", "--output-dir", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = lines.index("Protocol (differs between rows):")
    assert lines[i + 1] == "  top 900: " + DESC.format(p="ground-truth boxes", topk=900)
    assert lines[i + 2] == "  top 300: " + DESC.format(p="ground-truth boxes", topk=300)
    assert "Weights: top 900: weights/regionspot_bl.pth" in lines
    assert "Weights: top 300: weights/other.pth" in lines
    _, rows = _table_rows("\n".join(lines))
    assert rows == {"top 900": ["–", "–", "–", "1.0"], "top 300": ["–", "–", "–", "2.0"]}


def test_tolerates_missing_optional_keys_and_older_outputs(tool, tmp_path, capsys):
    bare = _write(tmp_path / "bare" / "metrics.json",
                  {"results": {"bbox": {"AP": 5.0, "APr": -100.0, "APc": None, "APf": "x"}}})
    old = _write(tmp_path / "old" / "metrics.json",
                 {"dataset": "coco_2017_val", "weights": "w.pth", "results": {"bbox": {"AP": 7.25}},
                  "protocol": "protocol: ground-truth boxes as proposals; each box scored against the "
                              "whole vocabulary (softmax); top 900 (box, class) pairs per image"})
    assert tool.main([bare, old, "--output-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    _, rows = _table_rows(out)
    # LVIS's -1 (here -100 %), null and non-numbers are "–"; one decimal
    assert rows == {"unknown proposals": ["–", "–", "–", "5.0"], "GT boxes": ["–", "–", "–", "7.2"]}
    assert "WARNING: rows evaluate different datasets" in out and "coco_2017_val" in out
    assert f"  unknown proposals: not recorded in {bare}" in out.splitlines()
    assert "Weights: unknown proposals: –" in out.splitlines()


def test_refuses_to_overwrite_an_input(tool, tmp_path, capsys):
    out_dir = tmp_path / "out"
    src = _write(out_dir / "table1.md", _eval("lvis_v1_val", "gt", {"AP": 1.0}))
    before = open(src).read()
    assert tool.main([src, "--output-dir", str(out_dir)]) == 2
    captured = capsys.readouterr()
    assert "refusing to write" in captured.err and "input" in captured.err
    assert captured.out == ""  # nothing printed before refusing
    assert open(src).read() == before and sorted(os.listdir(out_dir)) == ["table1.md"]


@pytest.mark.parametrize("case,expected", [
    ("training_log", ["training log", "expected", "results"]),
    ("empty_folder", ["no evaluation output found"]),
    ("only_training_log_folder", ["no evaluation output found", "1 other metrics.json skipped"]),
    ("malformed", ["malformed JSON"]),
    ("no_ap_keys", ['"bbox" has no AP keys']),
    ("no_tasks", ['no "bbox" or "segm"']),
    ("label_mismatch", ["2 --label value(s) for 3 row(s)"]),
    ("unknown_dataset", ["no evaluation of dataset 'coco'", "lvis_v1_minival, lvis_v1_val"]),
    ("missing", ["no such file or folder"]),
])
def test_errors_are_one_clear_line(tool, runs, tmp_path, capsys, case, expected):
    training_log = os.path.join(runs["gt"], "metrics.json")
    if case == "training_log":
        argv = [training_log]
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        argv = [str(tmp_path / "empty")]
    elif case == "only_training_log_folder":
        (tmp_path / "train").mkdir()
        (tmp_path / "train" / "metrics.json").write_text(open(training_log).read())
        argv = [str(tmp_path / "train")]
    elif case == "malformed":
        path = tmp_path / "bad" / "inference" / "x" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text('{"dataset": "x", "results": {"bbox": {"AP": 1')
        argv = [str(tmp_path / "bad")]
    elif case == "no_ap_keys":
        argv = [_write(tmp_path / "m.json", {"dataset": "x", "results": {"bbox": {"loss": 1.0}}})]
    elif case == "no_tasks":
        argv = [_write(tmp_path / "m.json", {"dataset": "x", "results": {}})]
    elif case == "label_mismatch":
        argv = [runs["gt"], runs["glip"], "--label", "a", "--label", "b"]
    elif case == "unknown_dataset":
        argv = [runs["root"], "--dataset", "coco"]
    else:
        argv = [str(tmp_path / "nope")]
    assert tool.main(argv + ["--output-dir", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("summarize.py: error: ")
    for text in expected:
        assert text in err, err
    if case in ("training_log", "malformed", "no_ap_keys"):
        assert "metrics.json" in err or "m.json" in err  # names the file
    assert not os.path.exists(tmp_path / "o")


def test_script_from_repo_root(runs, tmp_path):
    """Runs as `python tools/summarize.py` from the repo root (one subprocess: imports take seconds)."""
    ok = subprocess.run([sys.executable, "tools/summarize.py", runs["root"], "--dataset", "lvis_v1_val",
                         "--output-dir", str(tmp_path / "o"), "--name", "t"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr
    assert ok.stdout.splitlines()[0].startswith("Proposals") and "GT boxes" in ok.stdout
    assert sorted(os.listdir(tmp_path / "o")) == ["t.log", "t.md", "t.png"]


def _texts(fig):
    """Every text drawn in a matplotlib figure: its own, its panels' and their titles."""
    texts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        texts += [t.get_text() for t in ax.texts] + [ax.get_title()]
    return texts


def test_box_only_runs_with_mask_ap_skipped(tool, tmp_path, capsys):
    """Runs on a dataset without mask annotations (MODEL.MASK_ON True): metrics.json (strict
    JSON, a null APr) has only box AP and records the skipped mask AP; the mask columns say
    "n/a" (not 0.0) and a note says why, in the table, the Markdown and the chart."""
    from regionspot.io import write_json_atomic

    reason = "the dataset has no mask annotations (none of its 62 annotations has a 'segmentation')"
    for name, proposals, box in (("gt", "gt", {"AP": 31.2, "APr": float("nan"), "APc": 28.0, "APf": 35.5}),
                                 ("det", "file", {"AP": 12.0, "APr": 10.0, "APc": 11.0, "APf": 13.0})):
        obj = _eval("box_photos", proposals, box, proposal_file="det.json" if proposals == "file" else None)
        obj["skipped_tasks"] = {"segm": reason}
        write_json_atomic(str(tmp_path / "runs" / name / "inference" / "box_photos" / "metrics.json"), obj)
    assert "NaN" not in open(tmp_path / "runs" / "gt" / "inference" / "box_photos" / "metrics.json").read()
    out_dir = tmp_path / "summary"
    assert tool.main([str(tmp_path / "runs" / "gt"), str(tmp_path / "runs" / "det"), "--output-dir", str(out_dir),
                      "--label", "GT", "det"]) == 0
    out = capsys.readouterr().out
    header, rows = _table_rows(out)
    assert header == ["Proposals", "Box APr", "APc", "APf", "AP", "Mask APr", "APc", "APf", "AP"]
    assert rows == {"GT": ["–", "28.0", "35.5", "31.2", "n/a", "n/a", "n/a", "n/a"],
                    "det": ["10.0", "11.0", "13.0", "12.0", "n/a", "n/a", "n/a", "n/a"]}
    note = f"Mask AP not available (n/a): {reason}; mask AP (segm) skipped, box AP only"
    assert note in out.splitlines() and tool.MISSING_LEGEND in out.splitlines()
    md = open(out_dir / "table1.md").read()
    assert "| GT | – | 28.0 | 35.5 | 31.2 | n/a | n/a | n/a | n/a |" in md and note in md

    loaded = tool.load_runs([str(tmp_path / "runs")])
    assert [r.skipped for r in loaded] == [{"segm": reason}] * 2 and all(r.segm is None for r in loaded)
    texts = _texts(tool.build_figure(loaded, note="random weights"))
    caption = " ".join(" ".join(t.split()) for t in texts)
    assert note in caption and "Note: random weights" in caption
    mask_panel = [ax for ax in tool.build_figure(loaded).axes if ax.get_title() == "Mask AP"]
    assert len(mask_panel) == 1
    panel_texts = [t.get_text() for t in mask_panel[0].texts]
    assert len(panel_texts) == 1 and panel_texts[0].startswith("not available:")  # no "0.0" bar labels
    assert "no mask annotations" in " ".join(panel_texts[0].split())

    # the caption is inside the saved PNG: a longer note makes a taller image
    from PIL import Image

    heights = []
    for extra in (None, "a long note, " * 40):  # wrapped onto four caption lines
        with Image.open(io.BytesIO(tool.render_png(loaded, note=extra))) as im:
            heights.append(im.size[1])
    assert heights[1] > heights[0] + 40


def test_all_zero_panel_is_noted(tool, tmp_path, capsys):
    path = _write(tmp_path / "z" / "metrics.json",
                  _eval("lvis_v1_val", "gt", {"AP": 0.0, "APr": 0.0, "APc": 0.0, "APf": 0.0},
                        segm={"AP": 1.5, "APr": 0.0, "APc": 2.0, "APf": 3.0}))
    assert tool.main([path, "--output-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "Box AP: every value is 0.0 (the bars have no height)" in out
    assert not any(line.startswith("Mask AP") for line in out)
    rows = tool.load_runs([path])
    assert tool.panel_note(rows, "bbox") == "every value is 0.0" and tool.panel_note(rows, "segm") is None
    box_panel = [ax for ax in tool.build_figure(rows).axes if ax.get_title() == "Box AP"][0]
    assert "every value is 0.0" in [t.get_text() for t in box_panel.texts]
