"""Tests for the bundled real-photo sample (regionspot.data.datasets.regionspot_sample)."""

import json
import os
from collections import Counter

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
from detectron2.structures import BoxMode
from PIL import Image

from regionspot.data.datasets.regionspot_sample import (
    SAMPLE_ANNOTATIONS,
    load_sample_image,
    prepare_regionspot_sample,
    register_regionspot_sample,
)

CATS = {c["id"]: c for c in LVIS_CATEGORIES}


@pytest.fixture(scope="module")
def committed():
    with open(SAMPLE_ANNOTATIONS, "r", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("regionspot_sample")
    json_path, image_root = prepare_regionspot_sample(str(root))
    return str(root), json_path, image_root


def test_committed_annotations_meet_minimums(committed):
    images, anns = committed["images"], committed["annotations"]
    assert "categories" not in committed
    assert len(images) >= 8
    assert len(anns) >= 30
    cat_ids = {a["category_id"] for a in anns}
    assert len(cat_ids) >= 15
    freq = Counter(CATS[c]["frequency"] for c in cat_ids)
    assert freq["r"] >= 2 and freq["c"] >= 2 and freq["f"] >= 2, freq
    # every image has at least one box
    assert {img["id"] for img in images} == {a["image_id"] for a in anns}


def test_committed_annotations_are_consistent(committed):
    images = {img["id"]: img for img in committed["images"]}
    assert len(images) == len(committed["images"])
    assert len({img["file_name"] for img in committed["images"]}) == len(images)
    ann_ids = [a["id"] for a in committed["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    positives = {}
    for ann in committed["annotations"]:
        cat = CATS.get(ann["category_id"])
        assert cat is not None, ann
        assert ann["category_name"] == cat["name"], ann
        img = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0, ann
        assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"], ann
        positives.setdefault(ann["image_id"], set()).add(ann["category_id"])
    for img in committed["images"]:
        neg = set(img["neg_category_ids"])
        assert 3 <= len(neg) <= 6, img
        assert all(c in CATS for c in neg | set(img["not_exhaustive_category_ids"])), img
        assert not neg & positives[img["id"]], img
        # not-exhaustive categories are ones the image does contain
        assert not set(img["not_exhaustive_category_ids"]) & neg, img


def test_load_sample_image_shapes(committed):
    for img in committed["images"]:
        array = load_sample_image(img["source"])
        assert array.dtype == np.uint8
        assert array.shape == (img["height"], img["width"], 3), img
    grey = load_sample_image("skimage.data.camera")
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    china = load_sample_image("sklearn.datasets.load_sample_images:china.jpg")
    assert china.shape == (427, 640, 3) and china.dtype == np.uint8


def test_load_sample_image_unknown_source():
    with pytest.raises(ValueError, match="skimage.data.no_such_photo"):
        load_sample_image("skimage.data.no_such_photo")
    with pytest.raises(ValueError, match="imageio:chelsea.png"):
        load_sample_image("imageio:chelsea.png")


def test_prepare_writes_images_and_lvis_json(prepared, committed):
    import lvis

    root, json_path, image_root = prepared
    assert json_path == os.path.join(root, "regionspot_sample_lvis_v1.json")
    assert image_root == os.path.join(root, "images")
    for img in committed["images"]:
        path = os.path.join(image_root, img["file_name"])
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (img["width"], img["height"])
            pixels = np.asarray(im)
        # lossless: the file holds exactly the package's photo
        assert np.array_equal(pixels, load_sample_image(img["source"]))

    api = lvis.LVIS(json_path)
    assert len(api.get_img_ids()) == len(committed["images"])
    assert len(api.get_cat_ids()) == 1203
    assert len(api.get_ann_ids()) == len(committed["annotations"])
    by_id = {a["id"]: a for a in committed["annotations"]}
    for ann in api.load_anns():
        src = by_id[ann["id"]]
        x, y, w, h = src["bbox"]
        assert ann["bbox"] == [x, y, w, h]
        assert ann["category_id"] == src["category_id"] and ann["image_id"] == src["image_id"]
        assert ann["area"] == w * h and ann["iscrowd"] == 0
        assert ann["segmentation"] == [[x, y, x + w, y, x + w, y + h, x, y + h]]
        assert "category_name" not in ann
        # the box polygon rasterises to (about) the box
        assert abs(float(api.ann_to_mask(ann).sum()) - w * h) <= 2 * (w + h) + 1
    counts = Counter(a["category_id"] for a in committed["annotations"])
    for cat in api.load_cats(None):
        assert cat["frequency"] in ("r", "c", "f")
        assert cat["instance_count"] == counts.get(cat["id"], 0)
    for img in api.load_imgs(None):
        assert "neg_category_ids" in img and "not_exhaustive_category_ids" in img


def test_lvis_eval_federated(prepared, committed):
    """LVISEval runs on the written file: perfect boxes score AP 1; a confident box of a
    category listed in neg_category_ids is a false positive that lowers AP."""
    import lvis

    _, json_path, _ = prepared
    gt = lvis.LVIS(json_path)
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
         "score": 0.5}
        for a in committed["annotations"]
    ]
    ev = lvis.LVISEval(gt, perfect, "bbox")
    ev.run()
    assert ev.get_results()["AP"] == pytest.approx(1.0)

    # an image whose negatives include a category that is boxed somewhere in the sample
    positives = {a["category_id"] for a in committed["annotations"]}
    img, cat = next(
        (img, c) for img in committed["images"] for c in img["neg_category_ids"] if c in positives
    )
    fp = {"image_id": img["id"], "category_id": cat, "bbox": [0, 0, 20, 20], "score": 0.9}
    ev = lvis.LVISEval(lvis.LVIS(json_path), perfect + [fp], "bbox")
    ev.run()
    assert ev.get_results()["AP"] < 1.0


def test_prepare_is_repeatable_and_checks_sizes(prepared, committed):
    root, json_path, image_root = prepared
    path = os.path.join(image_root, committed["images"][0]["file_name"])
    mtime = os.stat(path).st_mtime_ns
    assert prepare_regionspot_sample(root) == (json_path, image_root)
    assert os.stat(path).st_mtime_ns == mtime  # right size: kept
    # a wrong-size file is replaced by the real photo
    Image.new("RGB", (7, 5)).save(path)
    prepare_regionspot_sample(root)
    with Image.open(path) as im:
        assert im.size == (committed["images"][0]["width"], committed["images"][0]["height"])
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]


def test_prepare_rejects_size_mismatch(tmp_path, monkeypatch, committed):
    from regionspot.data.datasets import regionspot_sample as mod

    bad = json.loads(json.dumps(committed))
    bad["images"][0]["height"] += 1
    bad_path = tmp_path / "bad.json"
    bad_path.write_text(json.dumps(bad))
    monkeypatch.setattr(mod, "SAMPLE_ANNOTATIONS", str(bad_path))
    with pytest.raises(ValueError, match=committed["images"][0]["file_name"]):
        mod.prepare_regionspot_sample(str(tmp_path / "root"))


@pytest.fixture
def restore_catalog():
    """Put back whatever 'regionspot_sample' registration existed before the test."""
    name = "regionspot_sample"
    had = name in DatasetCatalog.list()
    old_func = DatasetCatalog[name] if had else None
    old_meta = MetadataCatalog.get(name).as_dict() if had else None
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    if had:
        DatasetCatalog.register(name, old_func)
        old_meta.pop("name", None)
        MetadataCatalog.get(name).set(**old_meta)


def test_register_and_load(tmp_path, committed, restore_catalog):
    name = restore_catalog
    root = str(tmp_path / "sample")
    register_regionspot_sample(root)
    register_regionspot_sample(root)  # idempotent
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "lvis"
    assert meta.json_file == os.path.join(root, "regionspot_sample_lvis_v1.json")
    assert meta.image_root == os.path.join(root, "images")
    used = sorted({a["category_id"] for a in committed["annotations"]})
    assert len(meta.thing_classes) == len(used)  # the sample's own vocabulary
    to_contiguous = meta.thing_dataset_id_to_contiguous_id
    assert sorted(to_contiguous) == used and sorted(to_contiguous.values()) == list(range(len(used)))

    dicts = DatasetCatalog.get(name)
    assert len(dicts) == len(committed["images"])
    images = {img["id"]: img for img in committed["images"]}
    anns_by_image = {}
    for ann in committed["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    for d in dicts:
        img = images[d["image_id"]]
        assert d["file_name"] == os.path.join(root, "images", img["file_name"])
        assert os.path.isfile(d["file_name"])
        assert (d["height"], d["width"]) == (img["height"], img["width"])
        assert d["neg_category_ids"] == img["neg_category_ids"]
        assert d["not_exhaustive_category_ids"] == img["not_exhaustive_category_ids"]
        expected = anns_by_image[d["image_id"]]
        assert len(d["annotations"]) == len(expected)
        got = sorted((tuple(a["bbox"]), a["category_id"]) for a in d["annotations"])
        want = sorted((tuple(float(v) for v in a["bbox"]), to_contiguous[a["category_id"]]) for a in expected)
        assert got == want
        assert all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in d["annotations"])
        for ann in expected:
            lvis_cat = CATS[ann["category_id"]]
            assert meta.thing_classes[to_contiguous[ann["category_id"]]] == lvis_cat["synonyms"][0]

    # registering the same name under another root replaces the registration
    root2 = str(tmp_path / "sample2")
    register_regionspot_sample(root2)
    assert MetadataCatalog.get(name).image_root == os.path.join(root2, "images")
    assert DatasetCatalog.get(name)[0]["file_name"].startswith(os.path.join(root2, "images"))


def test_register_refuses_foreign_dataset(tmp_path):
    name = "regionspot_sample_test_foreign"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file="/somewhere/lvis_v1_val.json", image_root="/somewhere")
    try:
        with pytest.raises(ValueError, match="lvis_v1_val.json"):
            register_regionspot_sample(str(tmp_path / "s"), name=name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
