"""Tests for tools/extract_sam_tokens.py: batching, ranks, kill -9 + resume, bad input (tiny random SAM)."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from regionspot.data import token_cache as tc
from small_disk import small_disks
from test_token_cache import image_tensor, make_dataset

TOOL = os.path.join(REPO, "tools", "extract_sam_tokens.py")
CONFIG = os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml")


# SAM's small CPU kernels on one thread (conftest.one_thread): every token compared bit for bit
# here is computed with that same setting.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tool():
    """The tool's module (``regionspot.tools.extract_sam_tokens``): the processes that
    ``--num-gpus 2`` spawns from this test process unpickle its per-process function by name."""
    return importlib.import_module("regionspot.tools.extract_sam_tokens")


@pytest.fixture(scope="module")
def position(sam_path):
    from regionspot.modeling.fast_attention import set_sam_attention
    from regionspot.modeling.position_tokens import SamPositionTokens
    from regionspot.modeling.weights import load_sam

    sam = load_sam(sam_path)
    set_sam_attention(sam.image_encoder, "sdpa")  # what the tool runs (SAM_ATTENTION's default)
    return SamPositionTokens(sam)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(json, image_root, dataset dicts) of the synthetic dataset, registered as "tok_synth"."""
    from regionspot.data.datasets.user import register_dataset

    json_path, image_root, records = make_dataset(tmp_path_factory.mktemp("tool_data"), "tok_synth")
    register_dataset("tok_synth", json_path, image_root)
    return json_path, image_root, records


@pytest.fixture(scope="module")
def identity(sam_path):
    return tc.make_identity(sam_path, "transformer", "float32")


@pytest.fixture(scope="module")
def reference_cache(tool, position, data, identity, tmp_path_factory):
    """One process, batch size 3 (an image and its flip may land in different encoder batches)."""
    root = str(tmp_path_factory.mktemp("ref_cache"))
    summary = tool.extract_rank(position, data[2], root, "tok_synth", identity, shard_size=2, batch_size=3)
    assert summary["images"] == 5 and summary["boxes"] == 8 and summary["shards"] == 3 and not summary["failures"]
    manifest = tc.finalize_cache(root, "tok_synth", identity, [r["image_id"] for r in data[2]])
    assert manifest["complete"]
    return root


def assert_same_tokens(a, b):
    """Tokens of the same boxes from differently batched extractions: SAM's decoder sees other
    batch shapes, so the last float32 bits may differ (float rounding, never more)."""
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def assert_same_cache(root_a, root_b, name_a, name_b, records, identity):
    a = tc.SamTokenCache(root_a, name_a, identity)
    b = tc.SamTokenCache(root_b, name_b, identity)
    assert a.complete and b.complete and len(a) == len(b) == len(records)
    for r in records:
        for flip in (False, True):
            ta, ba = a.lookup_record(r, flip)
            tb, bb = b.lookup_record(r, flip)
            assert torch.equal(ba, bb), (r["image_id"], flip)
            assert_same_tokens(ta, tb)


def test_cached_tokens_equal_the_one_image_function(reference_cache, position, data, identity):
    cache = tc.SamTokenCache(reference_cache, "tok_synth", identity)
    for r in data[2]:
        expected = tc.compute_image_tokens(position, image_tensor(r), tc.annotation_boxes(r))
        for flip, key in ((False, ""), (True, "_flip")):
            tokens, boxes = cache.lookup_record(r, flip)
            assert torch.equal(boxes, expected["boxes" + key])
            assert_same_tokens(tokens, expected["tokens" + key])


def test_batch_size_does_not_change_the_cache(tool, reference_cache, position, data, identity, tmp_path):
    tool.extract_rank(position, data[2], str(tmp_path), "tok_synth", identity, shard_size=10, batch_size=8,
                      num_workers=1)  # images read by a data-loader process
    tc.finalize_cache(str(tmp_path), "tok_synth", identity, [r["image_id"] for r in data[2]])
    assert_same_cache(reference_cache, str(tmp_path), "tok_synth", "tok_synth", data[2], identity)


def test_two_ranks_write_disjoint_shards_and_the_merge_covers_all(tool, reference_cache, position, data, identity,
                                                                  tmp_path):
    """The per-rank function called directly with rank / world_size (the launcher is tested below)."""
    root = str(tmp_path)
    s0 = tool.extract_rank(position, data[2], root, "tok_synth", identity, rank=0, world_size=2, shard_size=1,
                           batch_size=2)
    directory = tmp_path / "tok_synth"
    assert sorted(os.listdir(directory)) == ["progress-r00000.json"] + [f"shard-r00000-{k:06d}.safetensors"
                                                                        for k in range(3)]
    s1 = tool.extract_rank(position, data[2], root, "tok_synth", identity, rank=1, world_size=2, shard_size=1,
                           batch_size=2)
    assert (s0["images"], s1["images"]) == (3, 2)
    shards = tc.scan_shards(root, "tok_synth", identity)
    by_rank = {rank: {i for s in shards if s.rank == rank for i in s.image_ids} for rank in (0, 1)}
    ids = [r["image_id"] for r in data[2]]
    assert by_rank == {0: set(ids[0::2]), 1: set(ids[1::2])}
    assert all(s.file.startswith(f"shard-r{s.rank:05d}-") for s in shards)
    assert not (tmp_path / "tok_synth" / "manifest.json").exists()  # only the merge writes it with 2 ranks
    manifest = tc.finalize_cache(root, "tok_synth", identity, ids)
    assert manifest["complete"] and manifest["num_images"] == 5 and len(manifest["shards"]) == 5
    assert sorted(i for s in manifest["shards"] for i in s["image_ids"]) == sorted(ids)
    assert not list(directory.glob("progress-*.json"))
    assert_same_cache(reference_cache, root, "tok_synth", "tok_synth", data[2], identity)


def _cli(sam_path, data, out, *extra, dataset="tok_kill", dtype=None):
    json_path, image_root, _ = data
    cmd = [sys.executable, TOOL, "--config-file", CONFIG, "--dataset", dataset, "--output-dir", str(out),
           "--register", dataset, json_path, image_root, "--num-workers", "0", *extra]
    if dtype:
        cmd += ["--dtype", dtype]
    return cmd + ["--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path]


def test_kill_9_then_resume_gives_the_uninterrupted_cache(tool, sam_path, data, reference_cache, identity, tmp_path,
                                                          capsys):
    """kill -9 of a run between shards, then a rerun writes the rest: the cache is complete and
    equal to an uninterrupted run's up to float rounding (the batches differ after the resume)."""
    out = tmp_path / "cache"
    env = dict(os.environ, REGIONSPOT_TEST_SLEEP_PER_IMAGE="0.2", DETECTRON2_DATASETS=str(tmp_path / "datasets"),
               OMP_NUM_THREADS="1")  # the threads of this test process (see one_thread): the same float rounding
    proc = subprocess.Popen(_cli(sam_path, data, out, "--shard-size", "1", "--batch-size", "2"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    directory = out / "tok_kill"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(directory.glob("shard-*.safetensors"))) < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, output
    written = sorted(p.name for p in directory.glob("shard-*.safetensors"))
    assert 2 <= len(written) < 5, (written, output)
    before = json.load(open(directory / "manifest.json"))
    assert not before["complete"] and before["num_images"] >= 1

    json_path, image_root, _ = data
    args = ["--config-file", CONFIG, "--dataset", "tok_kill", "--output-dir", str(out), "--register", "tok_kill",
            json_path, image_root, "--num-workers", "0", "--shard-size", "2",
            "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path]
    assert tool.main(args) == 0
    log = capsys.readouterr().out
    n = len(written)
    assert f"{n} already cached in {n} shards, {5 - n} to extract with 1 process" in log
    assert "images/s" in log and "; complete" in log
    assert set(written) <= {p.name for p in directory.glob("shard-*.safetensors")}  # finished shards kept
    assert not list(directory.glob(".*.tmp"))
    manifest = json.load(open(directory / "manifest.json"))
    assert manifest["complete"] and manifest["num_images"] == 5 and manifest["num_boxes"] == 8
    assert_same_cache(reference_cache, str(out), "tok_synth", "tok_kill", data[2], identity)
    tc.SamTokenCache(str(out), "tok_kill", identity).verify(data[2])


def test_two_processes_through_the_launcher(tool, sam_path, data, reference_cache, identity, tmp_path,
                                                    capsys):
    """``--num-gpus 2`` on a CPU machine: two processes (gloo), disjoint shards, rank 0's manifest.
    Each process runs SAM on half the cores; where that thread count differs from the one-process
    run's, the float rounding differs, so tokens are compared to ~1e-6, not bit for bit."""
    json_path, image_root, records = data
    args = ["--config-file", CONFIG, "--dataset", "tok_synth", "--output-dir", str(tmp_path), "--register",
            "tok_synth", json_path, image_root, "--num-workers", "0", "--shard-size", "2", "--num-gpus", "2",
            "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path]
    assert tool.main(args) == 0
    assert "to extract with 2 process(es)" in capsys.readouterr().out
    directory = tmp_path / "tok_synth"
    report = json.load(open(directory / "last_run.json"))
    assert sorted((s["rank"], s["images"]) for s in report["summaries"]) == [(0, 3), (1, 2)] and report["complete"]
    manifest = json.load(open(directory / "manifest.json"))
    assert manifest["complete"] and not list(directory.glob("progress-*.json"))
    ids = [r["image_id"] for r in records]
    by_rank = {s["rank"]: s["image_ids"] for s in manifest["shards"] if s["file"].endswith("000000.safetensors")}
    assert by_rank == {0: ids[0:4:2], 1: ids[1:4:2]}
    assert sorted(i for s in manifest["shards"] for i in s["image_ids"]) == sorted(ids)
    ref = tc.SamTokenCache(reference_cache, "tok_synth", identity)
    got = tc.SamTokenCache(str(tmp_path), "tok_synth", identity)
    for r in records:
        for flip in (False, True):
            (ta, ba), (tb, bb) = ref.lookup_record(r, flip), got.lookup_record(r, flip)
            assert torch.equal(ba, bb) and torch.allclose(ta, tb, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the command line in-process


def _args(sam_path, data, out, *extra, dataset="tok_synth", sam=None):
    json_path, image_root, _ = data
    return ["--config-file", CONFIG, "--dataset", dataset, "--output-dir", str(out), "--num-workers", "0",
            "--register", "tok_synth", json_path, image_root, *extra,
            "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path if sam is None else sam]


def test_bad_input_is_one_error_line_with_status_2(tool, sam_path, data, tmp_path, capsys):
    assert tool.main(_args(sam_path, data, tmp_path, dataset="no_such_dataset")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("extract_sam_tokens.py: error: dataset 'no_such_dataset' is not registered")
    assert tool.main(_args(sam_path, data, tmp_path, sam="")) == 2
    assert capsys.readouterr().err.strip() == ("extract_sam_tokens.py: error: the config has no SAM weights: "
                                              "set MODEL.REGIONSPOT.SAM_WEIGHTS")
    assert tool.main(_args(sam_path, data, tmp_path, sam=str(tmp_path / "sam_vit_b_01ec64.pth"))) == 2
    assert "error: SAM weights file not found" in capsys.readouterr().err
    assert tool.main(_args(sam_path, data, tmp_path, "--batch-size", "0")) == 2
    assert "error: --batch-size must be positive" in capsys.readouterr().err
    json_path, image_root, _ = data
    no_dir = ["--config-file", CONFIG, "--dataset", "tok_synth", "--register", "tok_synth", json_path, image_root,
              "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path]
    assert tool.main(no_dir) == 2
    assert "error: no output folder: give --output-dir or set MODEL.REGIONSPOT.TOKEN_CACHE_DIR" in \
        capsys.readouterr().err


def test_unreadable_image_is_reported_and_the_run_goes_on(tool, sam_path, position, tmp_path, capsys):
    from PIL import Image

    json_path, image_root, records = make_dataset(tmp_path / "d", "tok_broken", images=[
        ((30, 20), [(1, 1, 10, 10, 0)]), ((20, 30), [(2, 2, 5, 5, 0)]), ((25, 25), [(0, 0, 25, 25, 0)])])
    broken = records[1]["file_name"]
    with open(broken, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    wrong_size = records[2]["file_name"]
    Image.new("RGB", (26, 25)).save(wrong_size)
    args = ["--config-file", CONFIG, "--dataset", "tok_broken", "--output-dir", str(tmp_path / "c"),
            "--num-workers", "0", "--register", "tok_broken", json_path, image_root,
            "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path]
    assert tool.main(args) == 1
    out = capsys.readouterr().out
    assert "summary: 1 images (1 boxes, image + flip)" in out and "2 failed" in out and "images/s" in out
    assert f"  {broken}: cannot read image" in out
    assert f"  {wrong_size}: image {wrong_size!r} is 26x25 (WxH) but its dataset dict says 25x25" in out
    manifest = json.load(open(tmp_path / "c" / "tok_broken" / "manifest.json"))
    assert not manifest["complete"] and manifest["missing_image_ids"] == [101, 102]
    cache = tc.SamTokenCache(str(tmp_path / "c"), "tok_broken", tc.make_identity(sam_path, "transformer"))
    assert_same_tokens(cache.lookup(100)[0], tc.compute_tokens(position, image_tensor(records[0]),
                                                               tc.annotation_boxes(records[0])))
    with pytest.raises(tc.TokenCacheError, match=r"image 101 is not in the cache .*incomplete"):
        cache.lookup(101)


def test_existing_cache_foreign_or_stale_is_refused_then_overwrite_rebuilds(tool, sam_path, tmp_path, capsys):
    json_path, image_root, records = make_dataset(tmp_path / "d", "tok_stale", images=[
        ((30, 20), [(1, 1, 10, 10, 0)]), ((20, 30), [(2, 2, 5, 5, 0), (1, 1, 3, 3, 0)])])
    out = tmp_path / "c"
    args = ["--config-file", CONFIG, "--dataset", "tok_stale", "--output-dir", str(out), "--num-workers", "0",
            "--register", "tok_stale", json_path, image_root, "--shard-size", "1"]
    opts = ["--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path]
    assert tool.main(args + opts) == 0
    assert "2 to extract" in capsys.readouterr().out
    assert tool.main(args + opts) == 0  # nothing left to do
    assert "2 already cached in 2 shards, 0 to extract" in capsys.readouterr().out

    assert tool.main(args + ["--dtype", "bfloat16"] + opts) == 2
    err = capsys.readouterr().err
    assert err.startswith("extract_sam_tokens.py: error: SAM-token cache ") and "is foreign" in err
    assert "dtype float32 != expected bfloat16" in err
    assert tool.main(args + opts + ["MODEL.REGIONSPOT.TOKEN_SOURCE", "mlp"]) == 2
    assert "token source 'transformer' != expected 'mlp'" in capsys.readouterr().err

    data = json.load(open(json_path))
    data["annotations"][1]["bbox"] = [3, 2, 5, 5]
    json.dump(data, open(json_path, "w"))
    from detectron2.data import DatasetCatalog

    DatasetCatalog.get("tok_stale")  # reloads the json (registered lazily)
    assert tool.main(args + opts) == 2
    err = capsys.readouterr().err
    assert "holds image 101 with boxes that differ from the dataset's current annotations (stale cache)" in err
    assert "--overwrite" in err
    assert tool.main(args + ["--overwrite"] + opts) == 0
    assert "removed 4 cache files" in capsys.readouterr().out  # 2 shards, manifest, last_run.json
    cache = tc.SamTokenCache(str(out), "tok_stale", tc.make_identity(sam_path, "transformer"))
    cache.verify(DatasetCatalog.get("tok_stale"))

    # --finalize rewrites the manifest from the shards alone.
    os.remove(out / "tok_stale" / "manifest.json")
    assert tool.main(args + ["--finalize"] + opts) == 0
    assert "manifest.json: 2 of 2 images, 3 boxes, 2 shards; complete" in capsys.readouterr().out


@pytest.fixture
def small_disk(tmp_path):
    yield from small_disks(tmp_path)


def test_disk_full_then_rerun_gives_the_clean_cache(sam_path, data, reference_cache, identity, tmp_path, small_disk):
    """A disk too small for the cache: one error line (folder, bytes needed, bytes free), exit 2,
    finished shards kept and no partial file; with room, a rerun completes the cache, equal to
    an uninterrupted run's (up to float rounding: the batches differ after the resume)."""
    disk = small_disk(16 * 1024)  # a few shards of one image (2.5-7 KB each) fit, not all five
    directory = os.path.join(disk.folder, "tok_full")
    cmd = _cli(sam_path, data, disk.folder, "--shard-size", "1", "--batch-size", "2", dataset="tok_full")
    env = disk.env(DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"extract_sam_tokens.py: error: no space left in {os.path.realpath(directory)} for "), \
        proc.stderr[-2000:]  # a shard, or the manifest / progress file written after each shard
    assert "it needs " in last and "bytes are free" in last
    kept = sorted(f for f in os.listdir(directory) if f.startswith("shard-"))
    assert len(kept) < 5 and not [f for f in os.listdir(directory) if f.endswith(".tmp")]

    disk.resize(1 << 20)
    proc = subprocess.run(cmd, env=disk.env(DETECTRON2_DATASETS=str(tmp_path / "datasets")), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{len(kept)} already cached in {len(kept)} shards" in proc.stdout
    assert set(kept) <= set(os.listdir(directory))  # the finished shards were kept, not rewritten
    assert_same_cache(reference_cache, disk.folder, "tok_synth", "tok_full", data[2], identity)
    tc.SamTokenCache(disk.folder, "tok_full", identity).verify(data[2])


def test_two_processes_under_torchrun(sam_path, data, reference_cache, identity, tmp_path):
    """``torchrun --nproc-per-node 2``: the two processes join one group (before: two one-process
    runs over the whole dataset) and write the same cache as ``--num-gpus 2``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *_cli(sam_path, data, tmp_path, "--shard-size", "2", dataset="tok_torchrun")[1:]]
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("to extract with 2 process(es)") == 1
    directory = tmp_path / "tok_torchrun"
    report = json.load(open(directory / "last_run.json"))
    assert sorted((s["rank"], s["images"]) for s in report["summaries"]) == [(0, 3), (1, 2)] and report["complete"]
    ref = tc.SamTokenCache(reference_cache, "tok_synth", identity)
    got = tc.SamTokenCache(str(tmp_path), "tok_torchrun", identity)
    for r in data[2]:
        for flip in (False, True):
            (ta, ba), (tb, bb) = ref.lookup_record(r, flip), got.lookup_record(r, flip)
            assert torch.equal(ba, bb) and torch.allclose(ta, tb, rtol=1e-4, atol=1e-5)
