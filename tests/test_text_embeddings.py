"""Tests for regionspot.modeling.text_embeddings (tiny random CLIP, no pretrained weights)."""

import logging
import os

import clip
import pytest
import torch

from regionspot.modeling import text_embeddings as te
from regionspot.modeling.random_backbones import random_clip
from regionspot.modeling.text_embeddings import (
    CLIP_IMAGENET_TEMPLATES,
    PROMPT_TEMPLATES,
    clean_class_name,
    encode_class_names,
    load_or_compute_text_embeddings,
    weights_fingerprint,
)

NAMES = ["cat", "dog", "traffic light", "wall-other-merged", "aerosol_can"]


def _tiny_clip(seed=0):
    return random_clip("tiny", seed)


@pytest.fixture(scope="module")
def model():
    return _tiny_clip()


class _CallCounter:
    """Wraps a model's encode_text and records the batch sizes it was called with."""

    def __init__(self, model):
        self.inner = model.encode_text
        self.batch_sizes = []

    def __call__(self, tokens):
        self.batch_sizes.append(int(tokens.shape[0]))
        return self.inner(tokens)


def _reference(model, names, templates=PROMPT_TEMPLATES):
    """Straightforward computation: all prompts of one class at once, mean, normalize."""
    rows = []
    with torch.no_grad():
        for name in names:
            texts = [t.format(clean_class_name(name)) for t in templates]
            feats = model.encode_text(clip.tokenize(texts))
            mean = feats.mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def _raise(*args, **kwargs):
    raise AssertionError("encode_text must not be called on a cache hit")


# ----------------------------------------------------------------------------- templates


def test_clip_imagenet_templates_are_the_80_notebook_templates():
    assert len(CLIP_IMAGENET_TEMPLATES) == 80
    assert len(set(CLIP_IMAGENET_TEMPLATES)) == 80
    for t in CLIP_IMAGENET_TEMPLATES:
        assert isinstance(t, str) and t.count("{}") == 1 and t.endswith("."), t
        assert t.format("x") != t
    assert CLIP_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert CLIP_IMAGENET_TEMPLATES[1] == "a photo of many {}."
    assert CLIP_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert "{}." not in CLIP_IMAGENET_TEMPLATES
    assert "a photo of a {}." in CLIP_IMAGENET_TEMPLATES


def test_prompt_templates_are_bare_plus_80():
    assert PROMPT_TEMPLATES[0] == "{}."
    assert tuple(PROMPT_TEMPLATES[1:]) == CLIP_IMAGENET_TEMPLATES
    assert len(PROMPT_TEMPLATES) == len(set(PROMPT_TEMPLATES)) == 81
    assert all(t.count("{}") == 1 for t in PROMPT_TEMPLATES)


# ----------------------------------------------------------------------------- clean_class_name


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("wall-other-merged", "wall"),
        ("grass-merged", "grass"),
        ("playingfield", "playingfield"),
        ("sky-other-merged", "sky"),
        ("paper-merged", "paper"),
        ("food-other-merged", "food"),
        ("rug-merged", "rug"),
        ("aerosol_can", "aerosol_can"),  # no underscore replacement
        ("Traffic Light", "Traffic Light"),  # no lower-casing
        ("non-stuffed toy", "non-stuffed toy"),  # only trailing suffixes
        ("cloth-stuff", "cloth"),
    ],
)
def test_clean_class_name(raw, expected):
    assert clean_class_name(raw) == expected


def test_clean_class_name_rejects_non_str():
    with pytest.raises(TypeError):
        clean_class_name(3)


# ----------------------------------------------------------------------------- encode_class_names


def test_encode_shape_dtype_norm_and_reference(model):
    emb = encode_class_names(model, NAMES)
    assert emb.shape == (len(NAMES), 32)
    assert emb.dtype == torch.float32
    assert emb.device.type == "cpu"
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(NAMES)), atol=1e-5)
    ref = _reference(model, NAMES)
    assert torch.allclose(emb, ref, atol=1e-5), (emb - ref).abs().max()
    # rows are distinct classes, not one repeated vector
    assert (emb[0] - emb[1]).abs().max() > 1e-3


def test_encode_uses_mean_of_unnormalized_features(model):
    # Normalizing each prompt feature before averaging gives a different vector
    # for a random model; make sure we match the unnormalized mean, not that.
    texts = [t.format("dog") for t in PROMPT_TEMPLATES]
    with torch.no_grad():
        feats = model.encode_text(clip.tokenize(texts))
    per_prompt_norm = feats / feats.norm(dim=-1, keepdim=True)
    alt = per_prompt_norm.mean(0)
    alt = alt / alt.norm()
    emb = encode_class_names(model, ["dog"])[0]
    ref = feats.mean(0) / feats.mean(0).norm()
    assert torch.allclose(emb, ref, atol=1e-5)
    assert not torch.allclose(alt, ref, atol=1e-5)  # the two recipes are distinguishable here


def test_encode_independent_of_batch_size(model, monkeypatch):
    counter = _CallCounter(model)
    monkeypatch.setattr(model, "encode_text", counter)
    small = encode_class_names(model, NAMES, batch_size=7)
    total = len(NAMES) * len(PROMPT_TEMPLATES)
    assert sum(counter.batch_sizes) == total
    assert max(counter.batch_sizes) == 7
    assert len(counter.batch_sizes) == -(-total // 7)
    counter.batch_sizes.clear()
    big = encode_class_names(model, NAMES, batch_size=1000)
    assert counter.batch_sizes == [total]
    assert torch.allclose(small, big, atol=1e-5)


def test_encode_strips_suffixes_before_prompting(model):
    a = encode_class_names(model, ["wall-other-merged", "dog"])
    b = encode_class_names(model, ["wall", "dog"])
    assert torch.allclose(a, b, atol=1e-6)


def test_encode_custom_templates(model):
    templates = ("a photo of a {}.", "{}.")
    emb = encode_class_names(model, NAMES, templates=templates)
    assert torch.allclose(emb, _reference(model, NAMES, templates), atol=1e-5)
    assert not torch.allclose(emb, encode_class_names(model, NAMES), atol=1e-4)


class _HalfOutput(torch.nn.Module):
    """A text encoder whose features come out in float16 (like CLIP in fp16 on GPU)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def encode_text(self, tokens):
        return self.inner.encode_text(tokens).half()


def test_encode_half_precision_features_accumulate_in_float32(model):
    emb = encode_class_names(_HalfOutput(model), ["cat", "dog"])
    assert emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(emb, encode_class_names(model, ["cat", "dog"]), atol=1e-2)


def test_encode_errors(model):
    with pytest.raises(ValueError, match="vocabulary is empty"):
        encode_class_names(model, [])
    with pytest.raises(ValueError, match="index 1"):
        encode_class_names(model, ["cat", "   ", "dog"])
    with pytest.raises(ValueError, match="index 0"):
        encode_class_names(model, [""])
    with pytest.raises(ValueError, match="index 2"):
        encode_class_names(model, ["cat", "dog", 7])
    with pytest.raises(ValueError, match="index 1"):
        encode_class_names(model, ["cat", "-other"])  # empty after suffix removal
    with pytest.raises(ValueError, match="duplicate") as info:
        encode_class_names(model, ["cat", "dog", "cat"])
    assert "'cat'" in str(info.value) and "index 0" in str(info.value) and "index 2" in str(info.value)
    assert "dog" not in str(info.value)
    # identical for CLIP's tokenizer (lower-cases) -> identical embeddings -> rejected
    with pytest.raises(ValueError, match="duplicate") as info:
        encode_class_names(model, ["Person", "car", "person"])
    assert "'Person'" in str(info.value) and "'person'" in str(info.value)
    with pytest.raises(ValueError, match="batch_size"):
        encode_class_names(model, ["cat"], batch_size=0)
    with pytest.raises(ValueError, match="template"):
        encode_class_names(model, ["cat"], templates=("no placeholder",))
    with pytest.raises(TypeError):
        encode_class_names(model, "cat")


# ----------------------------------------------------------------------------- cache


def _cache_files(d):
    return sorted(f for f in os.listdir(d) if f.startswith("text_") and f.endswith(".pt"))


def test_cache_miss_writes_then_hit_skips_clip(model, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=te.__name__)
    emb = load_or_compute_text_embeddings(model, NAMES, weights_id="w1", cache_dir=str(tmp_path))
    files = _cache_files(tmp_path)
    assert len(files) == 1
    assert sorted(os.listdir(tmp_path)) == files  # no temp files left behind
    assert "miss" in caplog.text and str(len(NAMES)) in caplog.text
    entry = torch.load(tmp_path / files[0], map_location="cpu", weights_only=True)
    assert set(entry) == {"embeddings", "class_names", "templates", "weights_id"}
    assert entry["class_names"] == NAMES
    assert entry["templates"] == list(PROMPT_TEMPLATES)
    assert entry["weights_id"] == "w1"
    assert torch.equal(entry["embeddings"], emb)
    assert torch.allclose(emb, _reference(model, NAMES), atol=1e-5)

    caplog.clear()
    monkeypatch.setattr(model, "encode_text", _raise)
    hit = load_or_compute_text_embeddings(model, NAMES, weights_id="w1", cache_dir=str(tmp_path))
    assert torch.equal(hit, emb)
    assert hit.dtype == torch.float32 and hit.device.type == "cpu"
    assert "hit" in caplog.text
    assert _cache_files(tmp_path) == files


def test_cache_creates_missing_dir(model, tmp_path):
    d = tmp_path / "a" / "b"
    load_or_compute_text_embeddings(model, ["cat"], weights_id="w", cache_dir=str(d))
    assert len(_cache_files(d)) == 1


def test_cache_dir_expands_user(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    load_or_compute_text_embeddings(model, ["cat"], weights_id="w", cache_dir="~/emb_cache")
    assert len(_cache_files(tmp_path / "emb_cache")) == 1


def test_cache_key_depends_on_order_templates_and_weights(model, tmp_path, monkeypatch):
    d = str(tmp_path)
    base = load_or_compute_text_embeddings(model, ["cat", "dog"], weights_id="w1", cache_dir=d)
    assert len(_cache_files(d)) == 1
    swapped = load_or_compute_text_embeddings(model, ["dog", "cat"], weights_id="w1", cache_dir=d)
    assert len(_cache_files(d)) == 2
    assert torch.allclose(swapped, base.flip(0), atol=1e-6)  # rows follow the requested order
    load_or_compute_text_embeddings(model, ["cat", "dog"], weights_id="w2", cache_dir=d)
    assert len(_cache_files(d)) == 3
    load_or_compute_text_embeddings(
        model, ["cat", "dog"], weights_id="w1", cache_dir=d, templates=("a photo of a {}.",)
    )
    assert len(_cache_files(d)) == 4
    load_or_compute_text_embeddings(model, ["cat", "dog", "car"], weights_id="w1", cache_dir=d)
    assert len(_cache_files(d)) == 5
    # each of them is now a hit
    monkeypatch.setattr(model, "encode_text", _raise)
    again = load_or_compute_text_embeddings(model, ["dog", "cat"], weights_id="w1", cache_dir=d)
    assert torch.equal(again, swapped)
    assert len(_cache_files(d)) == 5


def test_cache_key_function_is_sensitive(model):
    k = te._cache_key("w", ["a", "b"], list(PROMPT_TEMPLATES))
    assert k == te._cache_key("w", ["a", "b"], list(PROMPT_TEMPLATES))
    assert k != te._cache_key("w", ["b", "a"], list(PROMPT_TEMPLATES))
    assert k != te._cache_key("v", ["a", "b"], list(PROMPT_TEMPLATES))
    assert k != te._cache_key("w", ["a", "b"], list(PROMPT_TEMPLATES[1:]))
    assert k != te._cache_key("w", ["a,b"], list(PROMPT_TEMPLATES))


def test_corrupt_cache_file_is_recomputed(model, tmp_path, caplog):
    d = str(tmp_path)
    emb = load_or_compute_text_embeddings(model, NAMES, weights_id="w", cache_dir=d)
    (path,) = _cache_files(d)
    with open(os.path.join(d, path), "wb") as f:
        f.write(b"this is not a torch file")
    caplog.set_level(logging.WARNING, logger=te.__name__)
    again = load_or_compute_text_embeddings(model, NAMES, weights_id="w", cache_dir=d)
    assert torch.allclose(again, emb, atol=1e-6)
    assert "recomputing" in caplog.text
    # the corrupt file was replaced by a valid one
    entry = torch.load(os.path.join(d, path), map_location="cpu", weights_only=True)
    assert torch.equal(entry["embeddings"], again)


def test_cache_entry_with_other_names_is_not_trusted(model, tmp_path, caplog):
    d = str(tmp_path)
    emb = load_or_compute_text_embeddings(model, ["cat", "dog"], weights_id="w", cache_dir=d)
    (path,) = _cache_files(d)
    full = os.path.join(d, path)
    entry = torch.load(full, map_location="cpu", weights_only=True)
    entry["class_names"] = ["car", "bus"]
    entry["embeddings"] = torch.zeros_like(entry["embeddings"])
    torch.save(entry, full)
    caplog.set_level(logging.WARNING, logger=te.__name__)
    again = load_or_compute_text_embeddings(model, ["cat", "dog"], weights_id="w", cache_dir=d)
    assert torch.allclose(again, emb, atol=1e-6)
    assert "class names differ" in caplog.text


def test_cache_disabled_always_computes(model, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    counter = _CallCounter(model)
    monkeypatch.setattr(model, "encode_text", counter)
    a = load_or_compute_text_embeddings(model, NAMES, weights_id="w", cache_dir=None)
    n = len(counter.batch_sizes)
    assert n > 0
    b = load_or_compute_text_embeddings(model, NAMES, weights_id="w", cache_dir=None)
    assert len(counter.batch_sizes) == 2 * n
    assert torch.equal(a, b)
    assert os.listdir(tmp_path) == []


def test_cache_errors(model, tmp_path):
    d = str(tmp_path)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        load_or_compute_text_embeddings(model, [], weights_id="w", cache_dir=d)
    with pytest.raises(ValueError, match="index 1"):
        load_or_compute_text_embeddings(model, ["cat", " "], weights_id="w", cache_dir=d)
    with pytest.raises(ValueError, match="duplicate.*'dog'"):
        load_or_compute_text_embeddings(model, ["dog", "cat", "dog"], weights_id="w", cache_dir=d)
    with pytest.raises(ValueError, match="weights_id"):
        load_or_compute_text_embeddings(model, ["cat"], weights_id="", cache_dir=d)
    assert os.listdir(d) == []


# ----------------------------------------------------------------------------- weights_fingerprint


def test_weights_fingerprint(tmp_path):
    p = tmp_path / "clip.pt"
    p.write_bytes(b"0123456789")
    fp = weights_fingerprint(str(p))
    assert isinstance(fp, str) and fp.startswith("file:") and len(fp) == len("file:") + 64
    assert weights_fingerprint(str(p)) == fp  # stable

    link = tmp_path / "link.pt"
    link.symlink_to(p)
    assert weights_fingerprint(str(link)) == fp  # realpath

    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    fp_touched = weights_fingerprint(str(p))
    assert fp_touched != fp

    p.write_bytes(b"0123456789abc")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert weights_fingerprint(str(p)) != fp_touched  # size changed

    q = tmp_path / "other.pt"
    q.write_bytes(b"0123456789abc")
    os.utime(q, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert weights_fingerprint(str(q)) != weights_fingerprint(str(p))  # path matters

    with pytest.raises(FileNotFoundError):
        weights_fingerprint(str(tmp_path / "missing.pt"))
