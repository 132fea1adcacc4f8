"""Tests for regionspot.modeling.text_embeddings (tiny random CLIP, no pretrained weights)."""

import copy
import logging
import os

import clip
import pytest
import torch

from regionspot.data.vocabularies import check_vocabulary
from regionspot.modeling import text_embeddings as te
from regionspot.modeling.text_embeddings import (
    CLIP_IMAGENET_TEMPLATES,
    PROMPT_TEMPLATES,
    clean_class_name,
    encode_class_names,
    load_or_compute_text_embeddings,
    weights_fingerprint,
)
from regionspot.testing.random_backbones import random_clip

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
            feats = model.encode_text(clip.tokenize(texts, truncate=True))
            mean = feats.mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def _raise(*args, **kwargs):
    raise AssertionError("encode_text must not be called on a cache hit")


def _forbid_clip(monkeypatch, model):
    """Make any use of the text tower fail: encode_text (plain path) and the transformer (both paths)."""
    monkeypatch.setattr(model, "encode_text", _raise)
    monkeypatch.setattr(model.transformer, "forward", _raise)


class _TowerCalls:
    """Records (batch, sequence length, dtype) of every call of the model's text transformer
    (both paths run it; CLIP's blocks take (L, B, W))."""

    def __init__(self, model):
        self.calls = []
        self._handle = model.transformer.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        x = inputs[0]
        self.calls.append((int(x.shape[1]), int(x.shape[0]), x.dtype))

    @property
    def batch_sizes(self):
        return [b for b, _, _ in self.calls]

    @property
    def lengths(self):
        return [n for _, n, _ in self.calls]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


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
    # the plain (reference) path: class-major batches through encode_text
    counter = _CallCounter(model)
    monkeypatch.setattr(model, "encode_text", counter)
    small = encode_class_names(model, NAMES, batch_size=7, fast=False)
    total = len(NAMES) * len(PROMPT_TEMPLATES)
    assert sum(counter.batch_sizes) == total
    assert max(counter.batch_sizes) == 7
    assert len(counter.batch_sizes) == -(-total // 7)
    counter.batch_sizes.clear()
    big = encode_class_names(model, NAMES, batch_size=1000, fast=False)
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
    # A user's vocabulary with names that read the same to CLIP is refused (check_vocabulary) ...
    with pytest.raises(ValueError, match="duplicate") as info:
        check_vocabulary(["cat", "dog", "cat"])
    assert "'cat'" in str(info.value) and "index 0" in str(info.value) and "index 2" in str(info.value)
    assert "dog" not in str(info.value)
    with pytest.raises(ValueError, match="duplicate") as info:  # CLIP's tokenizer lower-cases
        check_vocabulary(["Person", "car", "person"])
    assert "'Person'" in str(info.value) and "'person'" in str(info.value)
    # ... while the encoder encodes a dataset's own twins (V3Det: "Timer", "timer") identically
    twins = encode_class_names(model, ["Person", "car", "person"])
    assert torch.equal(twins[0], twins[2]) and not torch.equal(twins[0], twins[1])
    with pytest.raises(ValueError, match="batch_size"):
        encode_class_names(model, ["cat"], batch_size=0)
    with pytest.raises(ValueError, match="template"):
        encode_class_names(model, ["cat"], templates=("no placeholder",))
    with pytest.raises(TypeError):
        encode_class_names(model, "cat")


# ----------------------------------------------------------------------------- cache


@pytest.mark.parametrize("fast", [True, False])
def test_twins_are_encoded_once_and_copied(model, fast, caplog):
    """Names that CLIP reads as one text ("Person"/"person": the tokenizer lower-cases) are encoded
    once and the twin gets a copy of the row (equal by construction, not by two encodings at other
    batch rows rounding alike); the other names' rows are the names encoded alone."""
    names = ["Person", "car", "person", "dog", "PERSON", "Car"]
    with caplog.at_level("INFO", logger=te.__name__):
        out, stats = te._encode_with_stats(model, names, fast=fast)
    assert stats["classes"] == 6 and stats["distinct_classes"] == 3
    assert stats["prompts"] == 3 * len(PROMPT_TEMPLATES)  # only the distinct texts ran
    assert torch.equal(out[0], out[2]) and torch.equal(out[0], out[4]) and torch.equal(out[1], out[5])
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[3])
    alone = te._encode_with_stats(model, ["Person", "car", "dog"], fast=fast)[0]
    torch.testing.assert_close(out[[0, 1, 3]], alone, rtol=0, atol=1e-6)
    assert any("3 of the 6 names read the same to CLIP" in r.getMessage() for r in caplog.records)


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
    _forbid_clip(monkeypatch, model)
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
    _forbid_clip(monkeypatch, model)
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
    with _TowerCalls(model) as counter:
        a = load_or_compute_text_embeddings(model, NAMES, weights_id="w", cache_dir=None)
        n = len(counter.calls)
        assert n > 0
        b = load_or_compute_text_embeddings(model, NAMES, weights_id="w", cache_dir=None)
        assert len(counter.calls) == 2 * n
    assert torch.equal(a, b)
    assert os.listdir(tmp_path) == []


def test_cache_errors(model, tmp_path):
    d = str(tmp_path)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        load_or_compute_text_embeddings(model, [], weights_id="w", cache_dir=d)
    with pytest.raises(ValueError, match="index 1"):
        load_or_compute_text_embeddings(model, ["cat", " "], weights_id="w", cache_dir=d)
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


# ----------------------------------------------------------------------------- fast path

# Short and long names, punctuation next to the template's ".", and a name longer than CLIP's
# 77-token context (tokenized with truncate=True: its end-of-text token sits at position 76).
VARIED = [
    "aerosol_can", "bow_(weapon)", "a", "traffic light", "wall-other-merged", "Rolls-Royce",
    "peanut_butter_and_jelly_sandwich", "pita_(bread)", "handle", "x-ray machine", "u.s. flag",
    " ".join(["very"] * 90) + " long name",
]


def _max_diff(a, b):
    return float((a - b).abs().max())


def test_fast_equals_plain_on_all_81_templates_tiny(model):
    plain, plain_stats = te._encode_with_stats(model, VARIED, fast=False)
    fast, fast_stats = te._encode_with_stats(model, VARIED, fast=True)
    assert plain_stats["path"] == "plain" and fast_stats["path"] == "fast"
    assert fast.shape == plain.shape == (len(VARIED), 32) and fast.dtype == torch.float32
    assert _max_diff(fast, plain) < 1e-5
    assert torch.allclose(fast, _reference(model, VARIED), atol=1e-5)
    # the default path is the fast one
    assert _max_diff(encode_class_names(model, VARIED), fast) == 0.0
    # really truncated: ~10 of 77 positions per prompt (77 for the over-long name), no padding
    assert plain_stats["mean_tokens_run"] == 77
    assert fast_stats["mean_prompt_tokens"] < 26
    assert fast_stats["mean_tokens_run"] == fast_stats["mean_prompt_tokens"]


def test_fast_equals_plain_on_all_81_templates_vit_b16_text_tower():
    big = random_clip("ViT-B/16", seed=1)
    names = ["bow_(weapon)", "traffic light"]
    with _TowerCalls(big) as calls:
        fast = encode_class_names(big, names, fast=True)
    assert max(calls.lengths) < 20  # truncated sequences went through the real blocks
    plain = encode_class_names(big, names, fast=False)
    assert fast.shape == (2, 512)
    assert _max_diff(fast, plain) < 1e-5
    assert (fast[0] - fast[1]).abs().max() > 1e-3


def _prompt_lengths(names):
    texts = [t.format(clean_class_name(n)) for n in names for t in PROMPT_TEMPLATES]
    return (clip.tokenize(texts, truncate=True).argmax(-1) + 1).tolist()


def test_fast_batches_are_sorted_by_length_and_independent_of_batch_size(model):
    total = len(VARIED) * len(PROMPT_TEMPLATES)
    lengths = _prompt_lengths(VARIED)
    histogram = {n: lengths.count(n) for n in sorted(set(lengths))}
    with _TowerCalls(model) as calls:
        small = encode_class_names(model, VARIED, batch_size=7, fast=True)
    assert sum(calls.batch_sizes) == total and max(calls.batch_sizes) == 7
    assert calls.lengths == sorted(calls.lengths)  # short prompts first
    assert calls.lengths[0] == min(lengths) < 10 and calls.lengths[-1] == 77  # over-long name last
    # one batch holds prompts of one length: per length, ceil(count / 7) batches, no padding
    assert len(calls.calls) == sum(-(-c // 7) for c in histogram.values())
    assert {n: sum(b for b, m, _ in calls.calls if m == n) for n in histogram} == histogram
    with _TowerCalls(model) as calls:
        one = encode_class_names(model, VARIED, batch_size=1, fast=True)
        assert calls.batch_sizes == [1] * total
        calls.calls.clear()
        big = encode_class_names(model, VARIED, batch_size=5000, fast=True)
    assert calls.batch_sizes == list(histogram.values()) and calls.lengths == list(histogram)
    assert _max_diff(small, big) < 1e-5 and _max_diff(one, big) < 1e-5
    assert _max_diff(big, encode_class_names(model, VARIED, fast=False)) < 1e-5


def _masks(model):
    return [block.attn_mask for block in model.transformer.resblocks]


def test_attn_masks_restored_after_encoding(model):
    before = _masks(model)
    assert all(m.shape == (77, 77) for m in before)
    with _TowerCalls(model) as calls:
        encode_class_names(model, NAMES, fast=True)
    assert max(calls.lengths) < 77  # the blocks did run with shorter (sliced) masks
    after = _masks(model)
    assert all(a is b for a, b in zip(after, before))
    causal = torch.full((77, 77), float("-inf")).triu_(1)
    assert all(torch.equal(m, causal) for m in after)
    # the plain encode_text still works on full sequences afterwards
    assert model.encode_text(clip.tokenize(["a photo of a cat."])).shape == (1, 32)


def test_attn_masks_restored_after_an_exception(model, monkeypatch):
    before = _masks(model)
    seen = []

    def failing_ln_final(x):
        seen.append([block.attn_mask.shape for block in model.transformer.resblocks])
        raise RuntimeError("boom inside the text tower")

    monkeypatch.setattr(model.ln_final, "forward", failing_ln_final)
    with pytest.raises(RuntimeError, match="boom"):
        encode_class_names(model, NAMES, fast=True)
    assert seen and all(shape[0] < 77 for shape in seen[0])  # it failed while the masks were sliced
    assert all(a is b for a, b in zip(_masks(model), before))


class _NoTower(torch.nn.Module):
    """Only encode_text (like the _HalfOutput wrapper): the fast path cannot run on it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def encode_text(self, tokens):
        return self.inner.encode_text(tokens)


def test_fast_path_needs_a_causal_clip_text_tower(model):
    assert te.fast_path_problem(model) is None
    wrapped = _NoTower(model)
    assert "token_embedding" in te.fast_path_problem(wrapped)
    with pytest.raises(ValueError, match="fast=True"):
        encode_class_names(wrapped, ["cat"], fast=True)
    auto, stats = te._encode_with_stats(wrapped, ["cat", "dog"])  # default: plain path
    assert stats["path"] == "plain" and "token_embedding" in stats["reason"]
    assert _max_diff(auto, encode_class_names(model, ["cat", "dog"])) < 1e-5

    # a bidirectional (all-zero) mask: cutting the padding would change the result -> not fast
    bidirectional = copy.deepcopy(model)
    for block in bidirectional.transformer.resblocks:
        block.attn_mask = torch.zeros(77, 77)
    assert "not causal" in te.fast_path_problem(bidirectional)
    with pytest.raises(ValueError, match="not causal"):
        encode_class_names(bidirectional, ["cat"], fast=True)
    emb, stats = te._encode_with_stats(bidirectional, ["cat", "dog"])
    assert stats["path"] == "plain"
    assert torch.allclose(emb, _reference(bidirectional, ["cat", "dog"]), atol=1e-5)
    with pytest.raises(TypeError, match="fast"):
        encode_class_names(model, ["cat"], fast="yes")


def test_fast_path_runs_in_the_model_dtype(model):
    from clip.model import convert_weights

    half = copy.deepcopy(model)
    convert_weights(half)  # CLIP's own fp16 conversion (what clip.load does on GPU)
    with _TowerCalls(half) as calls:
        fast = encode_class_names(half, ["cat", "traffic light"], fast=True)
    assert {dtype for _, _, dtype in calls.calls} == {torch.float16}
    assert fast.dtype == torch.float32
    plain = encode_class_names(half, ["cat", "traffic light"], fast=False)
    assert _max_diff(fast, plain) < 1e-3  # float16 rounding
    assert _max_diff(fast, encode_class_names(model, ["cat", "traffic light"])) < 1e-2


def test_ambient_autocast_is_ignored(model):
    reference = encode_class_names(model, ["cat", "dog"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _TowerCalls(model) as calls:
            fast = encode_class_names(model, ["cat", "dog"], fast=True)
            plain = encode_class_names(model, ["cat", "dog"], fast=False)
    assert {dtype for _, _, dtype in calls.calls} == {torch.float32}
    assert _max_diff(fast, reference) < 1e-6 and _max_diff(plain, reference) < 1e-5


# ----------------------------------------------------------------------------- progress and logs


def test_progress_bar_and_log_lines(model, capsys, caplog):
    caplog.set_level(logging.INFO, logger=te.__name__)
    encode_class_names(model, NAMES, progress=True)
    err = capsys.readouterr().err
    assert "CLIP text embeddings" in err and "405/405" in err and "prompt/s" in err
    start, end = [r.getMessage() for r in caplog.records if r.name == te.__name__][-2:]
    assert "5 classes x 81 templates = 405 prompts" in start
    assert "cpu" in start and "float32" in start and "fast path" in start
    assert "405 prompts" in end and "prompts/s" in end and " s:" in end

    caplog.clear()
    encode_class_names(model, NAMES, fast=False, progress=False)
    assert capsys.readouterr().err == ""
    assert "plain encode_text path" in caplog.text
    # default: the bar only shows on a terminal (pytest's captured stderr is not one)
    encode_class_names(model, NAMES)
    assert capsys.readouterr().err == ""
