"""Tests for regionspot.data.token_cache: the token contract, the shard format, and the reader's checks."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from regionspot.data import token_cache as tc
from regionspot.data.validation import read_image

# (width, height) of the synthetic images; boxes XYWH with (x, y, w, h, iscrowd).
IMAGES = [
    ((64, 48), [(2, 3, 20, 15, 0), (10, 10, 30, 30, 0), (0, 0, 5, 5, 1)]),
    ((40, 64), [(5, 5, 35.5, 20, 0)]),  # overhangs the right edge by 0.5 px: clipped to x1 = 40
    ((50, 33), []),  # no annotation at all
    ((70, 70), [(1, 1, 60, 60, 0), (30, 2, 10, 40, 0), (20, 20, 10, 10, 0), (0, 0, 70, 70, 1)]),
    ((90, 40), [(40, 5, 45, 30, 0), (3, 3, 10, 10, 0)]),
]


# SAM's small CPU kernels on one thread (conftest.one_thread): every token compared bit for bit
# here is computed with that same setting.
pytestmark = pytest.mark.usefixtures("one_thread")


def make_dataset(root, name="synthetic", images=IMAGES, id_offset=100):
    """Write PNGs and a COCO json under ``root``; returns (json_path, image_root, dataset dicts)."""
    from PIL import Image

    from regionspot.data.datasets.user import load_dataset_json

    image_root = os.path.join(str(root), "images")
    os.makedirs(image_root, exist_ok=True)
    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    for i, ((w, h), boxes) in enumerate(images):
        file_name = f"{name}_{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(image_root, file_name))
        coco["images"].append({"id": id_offset + i, "file_name": file_name, "height": h, "width": w})
        for j, (x, y, bw, bh, crowd) in enumerate(boxes):
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": id_offset + i,
                                        "category_id": 1 + j % 2, "bbox": [x, y, bw, bh], "iscrowd": crowd})
    json_path = os.path.join(str(root), f"{name}.json")
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path, image_root, load_dataset_json(json_path, image_root)


def image_tensor(record):
    return torch.from_numpy(np.ascontiguousarray(read_image(record["file_name"]).transpose(2, 0, 1)))


@pytest.fixture(scope="module")
def position(sam_path):
    from regionspot.modeling.position_tokens import SamPositionTokens
    from regionspot.modeling.weights import load_sam

    return SamPositionTokens(load_sam(sam_path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"))[2]


@pytest.fixture(scope="module")
def reference(position, dataset):
    """compute_image_tokens of every image: the one-image definition of the cache."""
    return {r["image_id"]: tc.compute_image_tokens(position, image_tensor(r), tc.annotation_boxes(r))
            for r in dataset}


@pytest.fixture(scope="module")
def identity(sam_path):
    return tc.make_identity(sam_path, "transformer", "float32")


def write_cache(root, name, identity, reference, shard_size=2, dtype="float32", ids=None):
    """A cache written with ShardWriter + write_manifest (as the tool does for one rank)."""
    ident = identity.with_dtype(dtype)
    writer = tc.ShardWriter(str(root), name, ident, rank=0, shard_size=shard_size)
    ids = list(reference) if ids is None else ids
    for i in ids:
        e = reference[i]
        writer.add(tc.ImageTokens(i, e["tokens"], e["tokens_flip"], e["boxes"], e["boxes_flip"]))
    writer.flush()
    tc.write_manifest(str(root), name, ident, writer.records, list(reference))
    return writer.records


# ----------------------------------------------------------------------------- the contract


def test_boxes_are_the_mappers_boxes_and_flip_boxes_detectron2s(dataset):
    """annotation_boxes equals the training mapper's gt_boxes (no resize), flip_boxes its RandomFlip."""
    from detectron2.data import transforms as T

    from regionspot.data.mapper import RegionSpotDatasetMapper

    plain = RegionSpotDatasetMapper(False, augmentations=[], image_format="RGB")
    flipped = RegionSpotDatasetMapper(False, augmentations=[T.RandomFlip(prob=1.0)], image_format="RGB")
    for r in dataset:
        boxes = tc.annotation_boxes(r)
        n = sum(1 for a in r["annotations"] if a["iscrowd"] == 0)
        assert boxes.shape == (n, 4) and boxes.dtype == torch.float32
        assert torch.equal(plain(r)["instances"].gt_boxes.tensor, boxes)
        assert torch.equal(flipped(r)["instances"].gt_boxes.tensor, tc.flip_boxes(boxes, r["width"]))
    assert tc.annotation_boxes(dataset[1])[0].tolist() == [5.0, 5.0, 40.0, 25.0]  # clipped like the mapper


def test_flip_entry_is_the_flipped_image_and_differs_from_the_image(position, dataset, reference):
    r = dataset[0]
    image, entry = image_tensor(r), reference[r["image_id"]]
    w = image.shape[-1]
    assert torch.equal(entry["boxes_flip"][:, [0, 2]], w - entry["boxes"][:, [2, 0]])
    # one extraction call for both orientations vs one each: the same up to float rounding
    torch.testing.assert_close(entry["tokens_flip"], tc.compute_tokens(position, image.flip(-1), entry["boxes_flip"]),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(entry["tokens"], tc.compute_tokens(position, image, entry["boxes"]), rtol=0, atol=1e-5)
    assert entry["tokens"].shape == (2, 256) and entry["tokens"].dtype == torch.float32
    assert not torch.allclose(entry["tokens"], entry["tokens_flip"])
    empty = reference[dataset[2]["image_id"]]
    assert empty["tokens"].shape == (0, 256) and empty["boxes_flip"].shape == (0, 4)


def test_batched_extraction_gives_the_one_image_tokens(position, dataset):
    images = [image_tensor(r) for r in dataset[:3]]
    boxes = [tc.annotation_boxes(r) for r in dataset[:3]]
    with torch.no_grad():
        batched = position.extract_tokens(images + [im.flip(-1) for im in images],
                                          boxes + [tc.flip_boxes(b, im.shape[-1]) for b, im in zip(boxes, images)])
    for k, (image, b) in enumerate(zip(images, boxes)):
        torch.testing.assert_close(batched[k].cpu(), tc.compute_tokens(position, image, b), rtol=0, atol=1e-5)


def test_identity_from_file_equals_identity_from_module(sam_path, position, identity):
    assert tc.make_identity(sam_path, "transformer", "float32", sam=position.sam) == identity
    assert identity.token_dim == position.token_dim == 256
    assert tc.make_identity(sam_path, "mlp").token_dim == 32
    assert tc.CacheIdentity.from_dict(json.loads(identity.to_json())) == identity


# ----------------------------------------------------------------------------- reading


def test_cache_round_trip_equals_the_one_image_function(tmp_path, dataset, reference, identity):
    records = write_cache(tmp_path, "rt", identity, reference, shard_size=2)
    assert [r.file for r in records] == [f"shard-r00000-{k:06d}.safetensors" for k in range(3)]
    manifest = json.load(open(tmp_path / "rt" / "manifest.json"))
    assert manifest["complete"] and manifest["num_images"] == 5 and manifest["num_boxes"] == 8
    cache = tc.SamTokenCache(str(tmp_path), "rt", identity.with_dtype(None), max_open_shards=1)
    assert len(cache) == 5 and cache.complete
    for r in dataset:
        e = reference[r["image_id"]]
        for flip, key in ((False, ""), (True, "_flip")):
            tokens, boxes = cache.lookup_record(r, flip)
            assert torch.equal(tokens, e["tokens" + key]) and torch.equal(boxes, e["boxes" + key])
            assert tokens.dtype == torch.float32
        assert len(cache._handles) <= 1  # the LRU keeps at most max_open_shards open
    assert cache.verify(dataset) == {"shards": 3, "images": 5, "boxes": 8}


def test_bfloat16_cache_returns_float32_within_bf16_rounding(tmp_path, dataset, reference, identity):
    write_cache(tmp_path, "bf", identity, reference, dtype="bfloat16")
    fp32_bytes = sum(r.bytes for r in write_cache(tmp_path, "fp", identity, reference))
    bf16_bytes = sum(os.path.getsize(p) for p in (tmp_path / "bf").glob("shard-*.safetensors"))
    assert bf16_bytes < 0.6 * fp32_bytes
    cache = tc.SamTokenCache(str(tmp_path), "bf", identity.with_dtype("bfloat16"))
    for r in dataset:
        for flip, key in ((False, "tokens"), (True, "tokens_flip")):
            tokens, _ = cache.lookup(r["image_id"], flip)
            exact = reference[r["image_id"]][key]
            assert tokens.dtype == torch.float32
            assert torch.equal(tokens, exact.bfloat16().float())
            assert bool(((tokens - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-30).all())
    with pytest.raises(tc.TokenCacheError, match="dtype bfloat16 != expected float32"):
        tc.SamTokenCache(str(tmp_path), "bf", identity)


def test_reader_pickles_and_reopens_after_fork(tmp_path, dataset, reference, identity):
    write_cache(tmp_path, "pk", identity, reference)
    cache = tc.SamTokenCache(str(tmp_path), "pk", identity)
    cache.lookup(dataset[0]["image_id"])  # opens a shard
    assert cache._handles
    clone = pickle.loads(pickle.dumps(cache))
    assert not clone._handles
    for r in dataset:
        assert torch.equal(clone.lookup(r["image_id"], True)[0], reference[r["image_id"]]["tokens_flip"])

    class Lookups(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            return cache.lookup_record(dataset[i], flip=i % 2 == 1)[0].sum()

    loader = torch.utils.data.DataLoader(Lookups(), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork")
    sums = [float(x) for x in loader]
    expected = [float(reference[r["image_id"]]["tokens_flip" if i % 2 else "tokens"].sum())
                for i, r in enumerate(dataset)]
    assert sums == expected


def test_string_image_ids(tmp_path, reference, identity):
    renamed = {f"img/{i}.jpg": e for i, e in reference.items()}
    write_cache(tmp_path, "str", identity, renamed)
    cache = tc.SamTokenCache(str(tmp_path), "str", identity)
    assert torch.equal(cache.lookup("img/103.jpg")[0], reference[103]["tokens"])
    assert 103 not in cache and "img/103.jpg" in cache


# ----------------------------------------------------------------------------- read errors


def _cache_with(tmp_path, identity, reference, name):
    records = write_cache(tmp_path, name, identity, reference, shard_size=2)
    return records, tmp_path / name


def test_missing_manifest_and_unknown_image(tmp_path, reference, identity):
    with pytest.raises(tc.TokenCacheError, match=r"cache .*nothere.*no manifest.json.*extract_sam_tokens"):
        tc.SamTokenCache(str(tmp_path), "nothere", identity)
    _cache_with(tmp_path, identity, reference, "unk")
    cache = tc.SamTokenCache(str(tmp_path), "unk", identity)
    with pytest.raises(tc.TokenCacheError, match=r"unk: image 999 is not in the cache \(5 images cached\)"):
        cache.lookup(999)


def test_identity_survives_a_copy_or_rename_and_not_a_changed_tensor(tmp_path, sam_path, reference, identity):
    """The cache is keyed by the SAM weights' content: a copy (new path, new mtime, as rsync
    without -t makes) or a rename keeps the cache valid; one changed tensor makes it foreign."""
    import shutil

    write_cache(tmp_path, "moved", identity, reference)
    copy = tmp_path / "node2" / "sam_copy.pth"
    copy.parent.mkdir()
    shutil.copyfile(sam_path, copy)  # no metadata: another mtime
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    assert os.stat(copy).st_mtime_ns != os.stat(sam_path).st_mtime_ns
    copied = tc.make_identity(str(copy), "transformer", "float32")
    assert copied == identity
    tc.SamTokenCache(str(tmp_path), "moved", copied).lookup(100)
    renamed = tmp_path / "node2" / "renamed.pth"
    os.replace(copy, renamed)
    assert tc.make_identity(str(renamed), "transformer", "float32") == identity

    state = torch.load(sam_path, map_location="cpu", weights_only=True)
    name = "mask_decoder.iou_token.weight"
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1.0  # one value of one tensor
    changed = tmp_path / "node2" / "changed.pth"
    torch.save(state, changed)
    other = tc.make_identity(str(changed), "transformer", "float32")
    assert other.sam_weights != identity.sam_weights
    assert other.sam_architecture == identity.sam_architecture
    with pytest.raises(tc.TokenCacheError, match=r"the cache is foreign: .*SAM weights content hash"):
        tc.SamTokenCache(str(tmp_path), "moved", other)


def test_content_hash_is_remembered_beside_the_cache(tmp_path, sam_path, monkeypatch):
    """The weights are hashed once per (path, size, mtime): a sidecar next to the cache keeps it
    for the next process, and a changed file (new mtime) is hashed again."""
    import shutil

    from regionspot import weights_files

    weights = tmp_path / "sam.pth"
    shutil.copyfile(sam_path, weights)
    cache_dir = tmp_path / "cache"
    first = weights_files.weights_content_hash(str(weights), str(cache_dir))
    sidecar = cache_dir / weights_files.CONTENT_HASH_SIDECAR
    assert first in json.loads(sidecar.read_text())["files"].values()

    calls = []
    real_hash = weights_files._hash_tensors
    monkeypatch.setattr(weights_files, "_hash_tensors", lambda path: calls.append(path) or real_hash(path))
    weights_files._memo.clear()  # a new process: only the sidecar remembers
    assert weights_files.weights_content_hash(str(weights), str(cache_dir)) == first
    assert calls == []
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    state["mask_decoder.iou_token.weight"] = state["mask_decoder.iou_token.weight"] + 1
    torch.save(state, str(weights))
    os.utime(weights, ns=(5_000_000_000, 5_000_000_000))
    assert weights_files.weights_content_hash(str(weights), str(cache_dir)) != first
    assert len(calls) == 1


def test_missing_shard(tmp_path, reference, identity):
    records, directory = _cache_with(tmp_path, identity, reference, "miss")
    os.remove(directory / records[1].file)
    cache = tc.SamTokenCache(str(tmp_path), "miss", identity)
    cache.lookup(100)  # other shards still read
    victim = records[1].image_ids[0]
    with pytest.raises(tc.TokenCacheError, match=rf"miss: shard {records[1].file} \(image {victim}\): the shard "
                                                 rf"file is missing"):
        cache.lookup(victim)


def test_foreign_manifest_and_foreign_shard(tmp_path, reference, identity, sam_path):
    records, directory = _cache_with(tmp_path, identity, reference, "foreign")
    other = tc.CacheIdentity("tensors-sha256-v1:" + "0" * 64, identity.sam_architecture, identity.token_source,
                             identity.token_dim, identity.dtype)
    with pytest.raises(tc.TokenCacheError, match=r"foreign: the cache is foreign: .*SAM weights content hash"):
        tc.SamTokenCache(str(tmp_path), "foreign", other)
    with pytest.raises(tc.TokenCacheError, match=r"token source 'transformer' != expected 'mlp'"):
        tc.SamTokenCache(str(tmp_path), "foreign", tc.make_identity(sam_path, "mlp"))
    # One shard rewritten by another SAM (same size: only the content hash differs).
    shard = records[0]
    foreign_dir = tmp_path / "elsewhere"
    w = tc.ShardWriter(str(foreign_dir), "foreign", other, shard_size=100)
    for i in shard.image_ids:
        e = reference[i]
        w.add(tc.ImageTokens(i, e["tokens"], e["tokens_flip"], e["boxes"], e["boxes_flip"]))
    w.flush()
    os.replace(foreign_dir / "foreign" / w.records[0].file, directory / shard.file)
    assert os.path.getsize(directory / shard.file) == shard.bytes
    cache = tc.SamTokenCache(str(tmp_path), "foreign", identity)
    with pytest.raises(tc.TokenCacheError, match=rf"shard {shard.file} is foreign: it was written with SAM "
                                                 rf"weights content hash tensors-sha256-v1:0{{10}}\.\.\. "
                                                 rf".*\(image {shard.image_ids[0]}\)"):
        cache.lookup(shard.image_ids[0])


def test_stale_entry(tmp_path, dataset, reference, identity):
    _cache_with(tmp_path, identity, reference, "stale")
    cache = tc.SamTokenCache(str(tmp_path), "stale", identity)
    record = dict(dataset[3], annotations=[dict(a) for a in dataset[3]["annotations"]])
    cache.lookup_record(record, flip=True)  # unchanged: fine
    record["annotations"][1]["bbox"] = [31, 2, 10, 40]  # moved by one pixel
    for flip in (False, True):
        with pytest.raises(tc.TokenCacheError, match=r"stale: shard shard-r00000-000001.safetensors \(image 103\): "
                                                     r"stale entry"):
            cache.lookup_record(record, flip)
    record["annotations"] = record["annotations"][:2]  # a box removed
    with pytest.raises(tc.TokenCacheError, match=r"stale entry: its 3 cached boxes differ from the dataset's 2"):
        cache.lookup_record(record)


def test_corrupt_shards(tmp_path, reference, identity):
    records, directory = _cache_with(tmp_path, identity, reference, "corrupt")
    truncated, garbled = records[0], records[1]
    path = directory / truncated.file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    path = directory / garbled.file
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header: same size, unparsable
    path.write_bytes(bytes(data))
    cache = tc.SamTokenCache(str(tmp_path), "corrupt", identity)
    with pytest.raises(tc.TokenCacheError, match=rf"corrupt: shard {truncated.file} \(image 100\): corrupt shard: "
                                                 rf"\d+ bytes on disk, the manifest says {truncated.bytes}"):
        cache.lookup(100)
    with pytest.raises(tc.TokenCacheError, match=rf"shard {garbled.file} \(image 102\): corrupt shard \("):
        cache.lookup(102)
    # A flipped bit in the tensor data: only the checksum sees it.
    last = records[2]
    path = directory / last.file
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    checked = tc.SamTokenCache(str(tmp_path), "corrupt", identity, verify_checksums=True)
    with pytest.raises(tc.TokenCacheError, match=rf"shard {last.file} \(image 104\): corrupt shard: sha256"):
        checked.lookup(104)
    # An unreadable manifest.
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(tc.TokenCacheError, match="manifest.json is unreadable"):
        tc.SamTokenCache(str(tmp_path), "corrupt", identity)


# ----------------------------------------------------------------------------- bfloat16 in the logits


def test_bfloat16_tokens_barely_change_regionspot_logits(tiny_model, dataset):
    """Measure what bfloat16-rounded tokens change in the head's output and the logits of the
    tiny random RegionSpot (the figures are in the assertion messages)."""
    model = tiny_model
    images = [image_tensor(r) for r in dataset if r["annotations"]]
    boxes = [tc.annotation_boxes(r) for r in dataset if r["annotations"]]
    with torch.no_grad():
        features = model.encode_images(images)
        tokens = model.localizer.extract_tokens(images, boxes)
        semantic = torch.stack([f.semantic for f in features])
        out32 = model.head.embed_regions(tokens, semantic)
        out16 = model.head.embed_regions([t.bfloat16().float() for t in tokens], semantic)
    from regionspot.modeling.head import region_logits

    text = model.text_embeddings
    lg32 = torch.cat([region_logits(e, text, model.logit_scale) for e in out32])
    lg16 = torch.cat([region_logits(e, text, model.logit_scale) for e in out16])
    e32, e16 = torch.cat(out32), torch.cat(out16)
    token_rel = max(float(((t.bfloat16().float() - t).abs() / t.abs().clamp_min(1e-12)).max()) for t in tokens)
    emb_abs = float((e16 - e32).abs().max())
    emb_rel = emb_abs / float(e32.abs().max())
    logit_abs = float((lg16 - lg32).abs().max())
    logit_rel = logit_abs / float((lg32.max() - lg32.min()))
    flips = int((lg16.argmax(-1) != lg32.argmax(-1)).sum())
    figures = (f"[bf16 tokens] {lg32.shape[0]} regions x {lg32.shape[1]} classes: token max rel err {token_rel:.2e}; "
               f"head output max abs change {emb_abs:.2e} ({emb_rel:.2e} of its max |value|); logits max abs "
               f"change {logit_abs:.2e} ({logit_rel:.2e} of their range); top-1 changed for {flips} regions")
    assert token_rel <= 2.0 ** -8, figures
    assert logit_rel < 1e-2 and flips == 0, figures
