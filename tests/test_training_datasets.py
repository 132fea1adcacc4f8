"""The paper's training datasets in Detectron2's catalog (regionspot.data.datasets.builtin): lazy
registrations, dicts and vocabulary from tiny synthetic Objects365, V3Det and converted OpenImages
files, the noisy-negative metadata, and clear errors for missing files."""

import json
import os
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

import regionspot  # noqa: F401  (registrations)
from conftest import REPO
from regionspot.data.datasets import builtin
from regionspot.data.validation import InputError
from regionspot.data.vocabularies import get_vocabulary, vocabulary_by_name

NAMES = ("objects365_v1_train", "objects365_v2_train", "objects365_v2_val", "openimages_v6_train",
         "openimages_v6_val", "v3det_v1_train", "v3det_v1_val")


@pytest.fixture
def register(request):
    """register(key, root, **kw) under a name unique to the test; removed afterwards."""
    names = []

    def _register(key, root, **kw):
        name = f"test_{request.node.name}_{key}_{len(names)}"
        assert builtin.register_training_dataset(key, str(root), name=name, **kw)
        names.append(name)
        return name

    yield _register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def test_names_are_registered_with_default_locations():
    registered = set(DatasetCatalog.list())
    assert set(NAMES) <= registered
    root = os.path.abspath(builtin.datasets_root())
    meta = MetadataCatalog.get("v3det_v1_train")
    assert meta.json_file == os.path.join(root, "V3Det", "annotations", "v3det_2023_v1_train.json")
    assert meta.image_root == os.path.join(root, "V3Det") and meta.evaluator_type == "coco"
    assert MetadataCatalog.get("objects365_v1_train").json_file.endswith(
        os.path.join("objects365_v1", "annotations", "objects365_train.json"))
    assert MetadataCatalog.get("openimages_v6_val").image_root.endswith(os.path.join("openimages_v6", "validation"))


def test_import_reads_no_dataset_file(tmp_path):
    """Importing regionspot opens no file under $DETECTRON2_DATASETS, even when the jsons exist."""
    for key, spec in builtin.TRAINING_DATASETS.items():
        _json(tmp_path / spec.json_file, {"images": [], "annotations": [], "categories": [{"id": 1, "name": key}]})
    code = ("import sys; opened = []\n"
            f"root = {str(tmp_path)!r}\n"
            "sys.addaudithook(lambda ev, args: opened.append(str(args[0])) if ev in ('open', 'os.scandir', "
            "'os.listdir') and args and str(args[0]).startswith(root) else None)\n"
            f"sys.path.insert(0, {os.path.join(REPO, 'projects', 'RegionSpot')!r})\n"
            "import warnings; warnings.simplefilter('ignore')\n"
            "import regionspot\n"
            "from detectron2.data import MetadataCatalog\n"
            "assert MetadataCatalog.get('v3det_v1_train').json_file.startswith(root)\n"
            "assert MetadataCatalog.get('v3det_v1_train').get('thing_classes', None) is None\n"
            "print('OPENED', len(opened), opened[:3])\n")
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OPENED 0 []" in out.stdout


def test_existing_registration_is_kept(tmp_path):
    name = "test_existing_registration_is_kept"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file="/elsewhere.json")
    try:
        assert builtin.register_training_dataset("v3det_v1_train", str(tmp_path), name=name) is False
        assert MetadataCatalog.get(name).json_file == "/elsewhere.json" and DatasetCatalog.get(name) == []
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_missing_files_are_named(tmp_path, register):
    for key in ("objects365_v1_train", "openimages_v6_train", "v3det_v1_val"):
        name = register(key, tmp_path)
        spec = builtin.TRAINING_DATASETS[key]
        with pytest.raises(InputError) as info:
            DatasetCatalog.get(name)
        message = str(info.value)
        assert os.path.join(str(tmp_path), spec.json_file) in message and "datasets/README.md" in message
        assert "not found" in message
    assert "tools/convert_openimages.py" in str(pytest.raises(InputError, DatasetCatalog.get,
                                                              register("openimages_v6_val", tmp_path)).value)
    _json(tmp_path / "V3Det/annotations/v3det_2023_v1_val.json",
          {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]})
    with pytest.raises(InputError, match="image folder not found: .*V3Det"):  # json there, images not
        DatasetCatalog.get(register("v3det_v1_val", tmp_path, image_root="V3Det/missing"))


# ----------------------------------------------------------------------------- Objects365


def _objects365_v1(tmp_path):
    """v1 layout: categories unsorted (as in the official files), bare file names in train/."""
    (tmp_path / "objects365_v1" / "train").mkdir(parents=True)
    for name in ("obj365_train_000000000001.jpg", "obj365_train_000000000002.jpg"):
        Image.new("RGB", (64, 48)).save(tmp_path / "objects365_v1" / "train" / name)
    v1 = get_vocabulary("objects365_v1")
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(v1)][::-1]
    return _json(tmp_path / "objects365_v1/annotations/objects365_train.json", {
        "images": [{"id": 1, "file_name": "obj365_train_000000000001.jpg", "height": 48, "width": 64},
                   {"id": 2, "file_name": "obj365_train_000000000002.jpg", "height": 48, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 40], "iscrowd": 0, "area": 1200},
                        {"id": 2, "image_id": 2, "category_id": 365, "bbox": [0, 0, 64, 48], "iscrowd": 1,
                         "area": 3072}],
        "categories": categories})


def test_objects365_v1(tmp_path, register):
    _objects365_v1(tmp_path)
    name = register("objects365_v1_train", tmp_path)
    assert MetadataCatalog.get(name).get("thing_classes", None) is None  # not read before use
    dicts = DatasetCatalog.get(name)
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == get_vocabulary("objects365_v1")  # json names in id order: the v1 list
    assert meta.thing_dataset_id_to_contiguous_id == {i: i - 1 for i in range(1, 366)}
    assert [d["file_name"] for d in dicts] == [
        os.path.join(str(tmp_path), "objects365_v1", "train", f"obj365_train_00000000000{i}.jpg") for i in (1, 2)]
    assert all(os.path.exists(d["file_name"]) for d in dicts)
    assert dicts[0]["annotations"] == [{"bbox": [1.0, 2.0, 30.0, 40.0], "bbox_mode": BoxMode.XYWH_ABS,
                                        "category_id": 0, "iscrowd": 0}]
    assert dicts[1]["annotations"][0]["category_id"] == 364 and dicts[1]["annotations"][0]["iscrowd"] == 1
    assert vocabulary_by_name(name)[:2] == ["person", "sneakers"]


def test_objects365_v2_file_names_resolve_to_the_unpacked_layout(tmp_path, register, caplog):
    """The v2 json names images/v1/patchN/x.jpg; images unpacked as val/patchN/x.jpg are found."""
    (tmp_path / "objects365_v2" / "val" / "patch0").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "objects365_v2" / "val" / "patch0" / "objects365_v1_00000016.jpg")
    v2 = get_vocabulary("objects365")
    _json(tmp_path / "objects365_v2/annotations/zhiyuan_objv2_val.json", {
        "images": [{"id": 16, "file_name": "images/v1/patch0/objects365_v1_00000016.jpg", "height": 32, "width": 32}],
        "annotations": [{"id": 1, "image_id": 16, "category_id": 4, "bbox": [1, 1, 5, 5], "iscrowd": 0}],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(v2)]})
    name = register("objects365_v2_val", tmp_path)
    (record,) = DatasetCatalog.get(name)
    assert record["file_name"] == os.path.join(str(tmp_path), "objects365_v2", "val", "patch0",
                                               "objects365_v1_00000016.jpg")
    assert MetadataCatalog.get(name).thing_classes[3] == "Other Shoes" and record["annotations"][0]["category_id"] == 3

    # the same json with the images kept as images/v1/patch0/...: the paths are left as given
    nested = tmp_path / "objects365_v2" / "val" / "images" / "v1" / "patch0"
    nested.mkdir(parents=True)
    os.replace(tmp_path / "objects365_v2" / "val" / "patch0" / "objects365_v1_00000016.jpg",
               nested / "objects365_v1_00000016.jpg")
    (record,) = DatasetCatalog.get(name)
    assert record["file_name"] == str(nested / "objects365_v1_00000016.jpg")


def test_objects365_names_that_differ_from_the_builtin_list_are_reported(tmp_path, register, caplog):
    _objects365_v1(tmp_path)
    path = tmp_path / "objects365_v1/annotations/objects365_train.json"
    data = json.loads(path.read_text())
    data["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(get_vocabulary("objects365"))]  # v2 names
    path.write_text(json.dumps(data))
    name = register("objects365_v1_train", tmp_path)
    import logging

    with caplog.at_level(logging.WARNING, logger="regionspot.data.datasets.builtin"):
        DatasetCatalog.get(name)
    assert "differ from the built-in 'objects365_v1' vocabulary" in caplog.text and "'Sneakers'" in caplog.text
    assert MetadataCatalog.get(name).thing_classes == get_vocabulary("objects365")  # the json's names are used


# ----------------------------------------------------------------------------- V3Det


def _v3det(tmp_path, tree=None):
    """5 categories (ids 11..15, not 1-based like the official ones, to check the mapping) under a
    tree with an inner node n0 that is no category: n0 <- 11 <- 12 <- 13, n0 <- 14, 15 not in it."""
    (tmp_path / "V3Det" / "images" / "n0000012").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "V3Det" / "images" / "n0000012" / "a.jpg")
    categories = [{"id": 10 + i, "name": f"class {i}", "name_zh": "", "cat_info": ["x"], "cat_info_gpt": ["y"],
                   "novel": False} for i in range(1, 6)]
    for split in ("train", "val"):
        _json(tmp_path / f"V3Det/annotations/v3det_2023_v1_{split}.json", {
            "images": [{"id": 7, "file_name": "images/n0000012/a.jpg", "height": 30, "width": 40}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 12, "bbox": [2.5, 3, 10, 12], "iscrowd": 0,
                             "area": 120.0}],
            "categories": categories})
    if tree is not None:
        _json(tmp_path / "V3Det/annotations/v3det_2023_v1_category_tree.json", tree)


TREE_IDS = {"11": "n0000011", "12": "n0000012", "13": "n0000013", "14": "n0000014"}


@pytest.mark.parametrize("relation", ["descendant2ancestor", "child2father"])
def test_v3det_with_category_tree(tmp_path, register, relation):
    if relation == "descendant2ancestor":
        tree = {"categoryid2treeid": TREE_IDS, "descendant2ancestor": {
            "n0000011": ["n0"], "n0000012": ["n0000011", "n0"], "n0000013": ["n0000012", "n0000011", "n0"],
            "n0000014": ["n0"]}}
    else:
        tree = {"categoryid2treeid": TREE_IDS, "child2father": {
            "n0000011": ["n0"], "n0000012": ["n0000011"], "n0000013": ["n0000012"], "n0000014": ["n0"]}}
    _v3det(tmp_path, tree)
    name = register("v3det_v1_train", tmp_path)
    (record,) = DatasetCatalog.get(name)
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == [f"class {i}" for i in range(1, 6)]
    assert meta.thing_dataset_id_to_contiguous_id == {11: 0, 12: 1, 13: 2, 14: 3, 15: 4}
    assert meta.category_ancestors == {0: [], 1: [0], 2: [0, 1], 3: [], 4: []}
    assert record["file_name"] == os.path.join(str(tmp_path), "V3Det", "images", "n0000012", "a.jpg")
    assert (record["height"], record["width"], record["image_id"]) == (30, 40, 7)
    assert record["annotations"] == [{"bbox": [2.5, 3.0, 10.0, 12.0], "bbox_mode": BoxMode.XYWH_ABS,
                                      "category_id": 1, "iscrowd": 0}]
    assert vocabulary_by_name(name) == meta.thing_classes


def test_v3det_without_tree_and_with_an_explicit_one(tmp_path, register):
    _v3det(tmp_path)
    name = register("v3det_v1_val", tmp_path)
    assert len(DatasetCatalog.get(name)) == 1
    assert MetadataCatalog.get(name).get("category_ancestors", None) is None  # the official json has no tree
    with pytest.raises(InputError, match="category tree not found: .*my_tree.json"):
        DatasetCatalog.get(register("v3det_v1_val", tmp_path, category_tree="my_tree.json"))
    _json(tmp_path / "my_tree.json",
          {"categoryid2treeid": {"15": "t15", "14": "t14"}, "child2father": {"t15": ["t14"]}})
    name = register("v3det_v1_val", tmp_path, category_tree="my_tree.json")
    DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).category_ancestors == {0: [], 1: [], 2: [], 3: [], 4: [3]}


def test_category_tree_errors():
    with pytest.raises(InputError, match="categoryid2treeid"):
        builtin.category_ancestors_from_tree({"child2father": {}}, {1: 0}, "t.json")
    with pytest.raises(InputError, match="descendant2ancestor"):
        builtin.category_ancestors_from_tree({"categoryid2treeid": {"1": "a"}}, {1: 0}, "t.json")
    with pytest.raises(InputError, match="share the tree node"):
        builtin.category_ancestors_from_tree({"categoryid2treeid": {"1": "a", "2": "a"}, "child2father": {}},
                                             {1: 0, 2: 1}, "t.json")


# ----------------------------------------------------------------------------- OpenImages


def test_openimages_converted_json_carries_image_level_labels(tmp_path, register):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_openimages_t", os.path.join(REPO, "tools",
                                                                                       "convert_openimages.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    root = tmp_path / "openimages_v6"
    (root / "validation").mkdir(parents=True)
    Image.new("RGB", (100, 50)).save(root / "validation" / "0a.jpg")
    Image.new("RGB", (10, 20)).save(root / "validation" / "0b.jpg")
    (tmp_path / "classes.csv").write_text("/m/1,Cat\n/m/2,Dog\n/m/3,Owl\n/m/4,Fox\n")
    (tmp_path / "boxes.csv").write_text(
        "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n"
        "0a,xclick,/m/3,1,0.1,0.5,0.2,1,0,0,1,0,0\n")
    (tmp_path / "labels.csv").write_text("ImageID,Source,LabelName,Confidence\n"
                                         "0a,verification,/m/4,0\n0a,verification,/m/1,1\n0b,verification,/m/2,0\n")
    assert tool.main(["--boxes", str(tmp_path / "boxes.csv"), "--classes", str(tmp_path / "classes.csv"),
                      "--image-labels", str(tmp_path / "labels.csv"), "--images", str(root / "validation"),
                      "--output", str(root / "annotations" / "openimages_v6_val.json")]) == 0
    name = register("openimages_v6_val", tmp_path)
    a, b = DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).thing_classes == ["Cat", "Dog", "Owl", "Fox"]
    assert a["file_name"] == str(root / "validation" / "0a.jpg") and (a["height"], a["width"]) == (50, 100)
    assert a["annotations"] == [{"bbox": [10.0, 10.0, 40.0, 40.0], "bbox_mode": BoxMode.XYWH_ABS,
                                 "category_id": 2, "iscrowd": 1}]
    assert a["image_level_labels"] == [0, 2, 3]  # Cat (positive), Owl (its box), Fox (negative)
    assert b["image_level_labels"] == [1] and b["annotations"] == []  # Dog verified absent


def test_image_level_label_ids_without_labels():
    record = {"annotations": [{"category_id": 4}, {"category_id": 1}, {"category_id": 4}]}
    assert builtin.image_level_label_ids(record, {10: 0}) == [1, 4]
    record["image_level_labels"] = {"positive": [10, 99], "negative": []}  # 99: not in the vocabulary
    assert builtin.image_level_label_ids(record, {10: 0}) == [0, 1, 4]
