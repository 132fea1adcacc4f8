"""Tests for regionspot.data.vocabularies (lvis/coco need Detectron2's built-in metadata)."""

import json

import pytest
import torch

from regionspot.data import vocabularies as vocab_mod
from regionspot.data.vocabularies import BUILTIN_VOCABULARIES, get_vocabulary
from regionspot.modeling.text_embeddings import encode_class_names
from regionspot.testing.random_backbones import random_clip


@pytest.fixture(scope="module")
def tiny_clip():
    return random_clip("tiny", 0)


def test_builtin_names():
    assert BUILTIN_VOCABULARIES == ("lvis", "coco", "objects365", "objects365_v1")


def test_lvis():
    names = get_vocabulary("lvis")
    assert len(names) == 1203
    assert len(set(names)) == 1203
    assert names[0] == "aerosol_can"
    assert names[-1] == "zucchini"
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES

    # contiguous order == category-id order; Detectron2 names each class by its first synonym
    by_id = sorted(LVIS_CATEGORIES, key=lambda c: c["id"])
    assert names == [c["synonyms"][0] for c in by_id]
    assert names[161] == "horned_cow"  # id 162, LVIS "name" is "bull"


def test_coco():
    names = get_vocabulary("coco")
    assert len(names) == 80
    assert names[:3] == ["person", "bicycle", "car"]
    assert names[-1] == "toothbrush"
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    assert names == [c["name"] for c in COCO_CATEGORIES if c["isthing"] == 1]


def test_objects365():
    names = get_vocabulary("objects365")
    assert len(names) == 365
    assert len(set(names)) == 365
    assert len({" ".join(n.lower().split()) for n in names}) == 365  # distinct for CLIP too
    assert all(isinstance(n, str) and n.strip() for n in names)
    # spot checks against the Objects365 v2 category table (id = index + 1)
    assert names[0] == "Person"
    assert names[3] == "Other Shoes"  # id 4 (v2 only; v1 has no "Other Shoes")
    assert names[37] == "Moniter/TV"  # id 38, official spelling
    assert names[99] == "Sheep"  # id 100
    assert names[-1] == "Table Tennis "  # id 365, official trailing space
    with open(vocab_mod._OBJECTS365_FILE, encoding="utf-8") as f:
        data = json.load(f)
    assert data["classes"] == names
    assert "mmdetection" in data["source"] and "Detic" in data["source"]


def test_objects365_v1():
    """v1 names (objects365_train.json, the released model's training vocabulary), id order 1..365."""
    names = get_vocabulary("objects365_v1")
    assert len(names) == 365 and len(set(names)) == 365
    assert len({" ".join(n.lower().split()) for n in names}) == 365  # distinct for CLIP too
    assert names[:4] == ["person", "sneakers", "chair", "hat"]  # ids 1..4 (v2: Person, Sneakers, Chair, Other Shoes)
    assert names[23] == "tv"  # id 24
    assert names[158] == "tissue "  # id 159, official trailing space
    assert names[163] == "cutting/chopping board"  # id 164
    assert names[-1] == "flashlight"  # id 365
    assert names != [n.lower() for n in get_vocabulary("objects365")]  # not the v2 list
    with open(vocab_mod._OBJECTS365_V1_FILE, encoding="utf-8") as f:
        data = json.load(f)
    assert data["classes"] == names and data["version"] == "v1" and data["num_classes"] == 365
    assert "RegionSpot" in data["source"] and "mmdetection" in data["source"]
    assert get_vocabulary(" Objects365_V1 ") == names
    assert get_vocabulary("objects365")[0] == "Person"  # "objects365" stays v2


def test_returns_fresh_lists():
    a = get_vocabulary("objects365")
    a[0] = "mutated"
    assert get_vocabulary("objects365")[0] == "Person"
    b = get_vocabulary("coco")
    b.clear()
    assert len(get_vocabulary("coco")) == 80


def test_name_is_case_insensitive():
    assert get_vocabulary(" COCO ") == get_vocabulary("coco")


@pytest.mark.parametrize("name", BUILTIN_VOCABULARIES)
def test_builtin_vocabularies_are_valid_for_text_encoding(tiny_clip, name):
    # one template keeps this fast; validates names (non-blank, no CLIP-level duplicates)
    names = get_vocabulary(name)
    emb = encode_class_names(tiny_clip, names, templates=("{}.",), batch_size=512)
    assert emb.shape == (len(names), 32)


def test_custom_string():
    assert get_vocabulary("custom", "a, b ,c") == ["a", "b", "c"]
    assert get_vocabulary("custom", "traffic light,  fire hydrant") == ["traffic light", "fire hydrant"]
    assert get_vocabulary("custom", "cat") == ["cat"]


def test_custom_sequence():
    assert get_vocabulary("custom", ["a", " b ", "c"]) == ["a", "b", "c"]
    assert get_vocabulary("custom", ("x y",)) == ["x y"]


@pytest.mark.parametrize("custom", [None, "", "   ", [], ()])
def test_custom_empty(custom):
    with pytest.raises(ValueError, match="custom vocabulary is empty"):
        get_vocabulary("custom", custom)


def test_custom_bad_items():
    with pytest.raises(ValueError, match="index 1"):
        get_vocabulary("custom", "a,,b")
    with pytest.raises(ValueError, match="index 2"):
        get_vocabulary("custom", "a,b,")
    with pytest.raises(ValueError, match="index 1"):
        get_vocabulary("custom", ["a", "  "])
    with pytest.raises(ValueError, match="index 0"):
        get_vocabulary("custom", [3])
    with pytest.raises(ValueError, match="duplicate.*'a'"):
        get_vocabulary("custom", "a, b, a")


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown vocabulary") as info:
        get_vocabulary("imagenet")
    for valid in ("lvis", "coco", "objects365", "custom"):
        assert valid in str(info.value)


def test_custom_with_builtin_is_rejected():
    with pytest.raises(ValueError, match="custom"):
        get_vocabulary("coco", "a,b")


@pytest.mark.parametrize("raw,released,natural", [
    ("aerosol_can", "aerosol_can", "aerosol can"),
    ("bow_(weapon)", "bow_(weapon)", "bow (weapon)"),
    ("Cabinet/shelf", "Cabinet/shelf", "Cabinet or shelf"),
    ("Glasses / sunglasses", "Glasses / sunglasses", "Glasses or sunglasses"),
    ("wall-other-merged", "wall", "wall"),
    ("tissue ", "tissue ", "tissue"),
])
def test_class_name_styles(raw, released, natural):
    from regionspot.data.vocabularies import clean_class_name

    assert clean_class_name(raw) == released and clean_class_name(raw, "released") == released
    assert clean_class_name(raw, "natural") == natural


def test_the_model_and_the_dump_tool_encode_the_styled_names(tiny_cfg, monkeypatch):
    """CLASS_NAME_STYLE natural: the text encoder sees "aerosol can", the vocabulary keeps "aerosol_can"."""
    from conftest import build_tiny_model

    model = build_tiny_model(tiny_cfg)
    model.text_classifier.class_name_style = "natural"
    seen = []
    import regionspot.modeling.text_classifier as text_classifier

    original = text_classifier.load_or_compute_text_embeddings
    monkeypatch.setattr(text_classifier, "load_or_compute_text_embeddings",
                        lambda clip_model, names, **kw: seen.append(list(names)) or original(clip_model, names, **kw))
    model.set_vocabulary(["aerosol_can", "bow_(weapon)"])
    assert seen == [["aerosol can", "bow (weapon)"]] and model.class_names == ["aerosol_can", "bow_(weapon)"]


def test_aliases_follow_the_class_name_style(tiny_model):
    """Names that read the same to CLIP under CLASS_NAME_STYLE are never each other's negatives:
    with "natural", LVIS's "aerosol_can" and a dataset's "aerosol can" are one text."""
    from regionspot.modeling.text_classifier import TextClassifier

    names = ["aerosol_can", "aerosol can", "Dog", "dog ", "cat"]
    clip_model = tiny_model.semantic_encoder.clip
    natural = TextClassifier(clip_model, "id", class_name_style="natural")
    released = TextClassifier(clip_model, "id", class_name_style="released")
    assert natural.aliases(names) == {0: [1], 1: [0], 2: [3], 3: [2]}
    assert released.aliases(names) == {2: [3], 3: [2]}  # CLIP reads the underscore
    vocabulary = natural.vocabulary(names, torch.zeros(5, natural.embed_dim), allow_duplicates=True)
    assert vocabulary.aliases == natural.aliases(names)
