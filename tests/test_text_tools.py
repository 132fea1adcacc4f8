"""Tests for tools/dump_text_embeddings.py and ``tools/benchmark.py text`` (tiny random CLIP)."""

import json
import os

import pytest
import torch

from conftest import load_tool
from regionspot.modeling import text_embeddings as te
from regionspot.modeling.weights import load_clip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml")
BASE_CONFIG = os.path.join(REPO, "configs", "Base-RegionSpot.yaml")
NAMES = ["cat", "dog", "traffic light", "wall-other-merged"]


def _load_tool(name):
    return load_tool(name)


@pytest.fixture(scope="module")
def dump():
    return _load_tool("dump_text_embeddings")


@pytest.fixture(scope="module")
def bench():
    return _load_tool("benchmarks.text")


def _raise(*args, **kwargs):
    raise AssertionError("the CLIP text tower must not run on a cache hit")


def _dump_args(clip_path, cache_dir, *extra, opts=()):
    return ["--config-file", CONFIG, "--vocabulary", "custom", "--custom-vocabulary", ",".join(NAMES), *extra,
            "--opts", "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(cache_dir),
            *opts]


# ----------------------------------------------------------------------------- dump_text_embeddings


def test_dump_fills_the_cache_the_model_reads_and_writes_output(dump, clip_path, tiny_model, tmp_path,
                                                                monkeypatch, capsys):
    cache, out = tmp_path / "cache", tmp_path / "emb" / "names.pt"
    assert dump.main(_dump_args(clip_path, cache, "--output", str(out))) == 0
    stdout = capsys.readouterr().out
    assert "4 classes x 81 templates = 324 prompts" in stdout and f"wrote {out}" in stdout
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("text_") and files[0].endswith(".pt")
    assert sorted(os.listdir(out.parent)) == ["names.pt", "names.pt.log"]  # no temporary file left

    entry = torch.load(out, map_location="cpu", weights_only=True)
    assert set(entry) == {"class_names", "templates", "weights_id", "embeddings"}
    assert entry["class_names"] == NAMES and entry["templates"] == list(te.PROMPT_TEMPLATES)
    assert entry["weights_id"] == te.weights_fingerprint(clip_path)
    emb = entry["embeddings"]
    assert emb.shape == (4, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    clip_model = load_clip(clip_path)
    assert torch.allclose(emb, te.encode_class_names(clip_model, NAMES, fast=False), atol=1e-5)

    # a second call hits the cache without running CLIP ...
    monkeypatch.setattr(clip_model, "encode_text", _raise)
    monkeypatch.setattr(clip_model.transformer, "forward", _raise)
    hit = te.load_or_compute_text_embeddings(clip_model, NAMES, weights_id=te.weights_fingerprint(clip_path),
                                             cache_dir=str(cache))
    assert torch.equal(hit, emb)
    # ... and so does the model built from a config with these weights (same cache key)
    monkeypatch.setattr(tiny_model.text_classifier, "cache_dir", str(cache))
    monkeypatch.setattr(tiny_model.semantic_encoder.clip, "encode_text", _raise)
    monkeypatch.setattr(tiny_model.semantic_encoder.clip.transformer, "forward", _raise)
    assert torch.equal(tiny_model.encode_vocabulary(NAMES).cpu(), emb)

    # running the tool again reuses the entry (CLIP loaded, not run: the file is unchanged)
    mtime = os.stat(cache / files[0]).st_mtime_ns
    assert dump.main(_dump_args(clip_path, cache)) == 0
    assert sorted(os.listdir(cache)) == sorted(files + [dump.CACHE_LOG])  # the run's log file is new
    assert os.stat(cache / files[0]).st_mtime_ns == mtime
    assert "(exists)" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["config", "base_config", "clip"])
def test_dump_refuses_to_overwrite_an_input(dump, clip_path, tmp_path, capsys, which):
    target = {"config": CONFIG, "base_config": BASE_CONFIG, "clip": clip_path}[which]
    with open(target, "rb") as f:
        before = f.read()
    cache = tmp_path / "cache"
    assert dump.main(_dump_args(clip_path, cache, "--output", target)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("dump_text_embeddings.py: error: refusing to write") and "input file" in err[0]
    with open(target, "rb") as f:
        assert f.read() == before
    assert not cache.exists()  # refused before computing anything


def test_dump_errors(dump, clip_path, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["--config-file", CONFIG, "--vocabulary", "custom", "--custom-vocabulary", "cat,Cat",
            "--opts", "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(cache)]
    assert dump.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dump_text_embeddings.py: error:") and "duplicate" in err[0]

    missing = str(tmp_path / "missing.pt")
    assert dump.main(_dump_args(missing, cache)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dump_text_embeddings.py: error: CLIP weights file not found")

    assert dump.main(_dump_args(clip_path, cache, opts=("MODEL.REGIONSPOT.NO_SUCH_KEY", "1"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("dump_text_embeddings.py: error: unknown config key MODEL.REGIONSPOT.NO_SUCH_KEY")

    args = _dump_args(clip_path, "")  # cache disabled and no --output: nothing to write
    assert dump.main(args) == 2
    assert "nothing would be written" in capsys.readouterr().err
    assert not list(cache.glob("*.pt"))  # (the log file of the runs above holds their tracebacks)

    assert dump.main(["--config-file", CONFIG, "--vocabulary", "imagenet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocabulary 'imagenet' is neither" in err[0] and "--register" in err[0]


def test_dump_batch_size_reaches_the_text_tower(dump, clip_path, tmp_path, monkeypatch):
    """--batch-size is the number of prompts per text-tower call (the classifier's embed option),
    and the embeddings are those of the config's TEXT_BATCH_SIZE up to float rounding."""
    from regionspot.modeling import text_classifier

    seen = []
    original = text_classifier.load_or_compute_text_embeddings

    def record(*args, **kwargs):
        seen.append(kwargs["batch_size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(text_classifier, "load_or_compute_text_embeddings", record)
    small, default = tmp_path / "small.pt", tmp_path / "default.pt"
    assert dump.main(_dump_args(clip_path, "", "--batch-size", "5", "--output", str(small))) == 0
    assert dump.main(_dump_args(clip_path, "", "--output", str(default))) == 0
    assert seen == [5, 256]  # 256: TEXT_BATCH_SIZE of the config
    a, b = (torch.load(f, map_location="cpu", weights_only=True)["embeddings"] for f in (small, default))
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of a missing GPU")
def test_dump_runs_on_the_cpu_when_model_device_is_missing(dump, clip_path, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert dump.main(_dump_args(clip_path, cache, opts=("MODEL.DEVICE", "cuda"))) == 0
    out = capsys.readouterr().out
    assert "note:" in out and "CPU" in out and "on cpu" in out
    assert len(list(cache.glob("*.pt"))) == 1


# ----------------------------------------------------------------------------- benchmark.py text


def test_benchmark_quick_writes_a_consistent_json(bench, tmp_path, capsys):
    out = tmp_path / "bench" / "text.json"
    assert load_tool("benchmark").main(["text", "--quick", "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(os.listdir(out.parent)) == ["text.json", "text.json.log"]
    with open(out) as f:
        res = json.load(f)
    assert res["vocabulary"] == "lvis" and res["classes"] == 1203 and res["templates"] == 81
    env = res["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["cpu"] and len(env["load_average_before"]) == 3 and len(env["load_average_after"]) == 3
    assert list(res["towers"]) == ["tiny"]

    tiny = res["towers"]["tiny"]
    m, a = tiny["measured"], tiny["all_classes"]
    assert tiny["text_width"] == 64 and tiny["text_layers"] == 2 and tiny["embed_dim"] == 32
    assert m["classes"] == bench.QUICK_CLASSES and m["prompts"] == bench.QUICK_CLASSES * 81
    plain, fast = m["plain"], m["fast"]
    for path in (plain, fast):
        assert path["seconds"] > 0
        assert path["prompts_per_s"] == pytest.approx(m["prompts"] / path["seconds"])
    assert m["speedup"] == pytest.approx(plain["seconds"] / fast["seconds"])
    # the speed-up itself is a measurement (written to the file), not asserted: on a loaded machine
    # a short run can take longer on the fast path; the work it saves is what is checked below
    assert 0 <= m["max_abs_diff"] < 1e-5 and m["min_cosine_plain_fast"] > 1 - 1e-5
    assert m["mean_tokens_per_prompt"]["before"] == plain["mean_tokens_per_prompt"] == 77
    after = m["mean_tokens_per_prompt"]["after_truncation"]
    assert after == fast["mean_tokens_per_prompt"] == fast["mean_prompt_tokens_to_end_of_text"]
    assert 3 < after < 20
    assert plain["batches"] == -(-m["prompts"] // m["batch_size"]) <= fast["batches"]

    assert a["classes"] == 1203 and a["prompts"] == 1203 * 81
    ratio = a["prompts"] / m["prompts"]
    assert a["plain_seconds"] == pytest.approx(plain["seconds"] * ratio)
    assert a["fast_seconds"] == pytest.approx(fast["seconds"] * ratio)
    assert a["plain"].startswith("estimated") and a["fast"].startswith("estimated")
    assert a["speedup"] == pytest.approx(a["plain_seconds"] / a["fast_seconds"])


def test_dump_a_registered_datasets_vocabulary(tmp_path, clip_path):
    """--register NAME JSON IMAGE_ROOT, then --vocabulary NAME: the json's categories are encoded."""
    import json as json_module

    tool = load_tool("dump_text_embeddings")
    (tmp_path / "images").mkdir()
    data = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "teapot"}, {"id": 3, "name": "kettle"}]}
    (tmp_path / "mine.json").write_text(json_module.dumps(data))
    out = tmp_path / "emb.pt"
    code = tool.main(["--config-file", os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"),
                      "--vocabulary", "dump_tool_mine", "--register", "dump_tool_mine", str(tmp_path / "mine.json"),
                      str(tmp_path / "images"), "--output", str(out),
                      "--opts", "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", ""])
    assert code == 0
    assert torch.load(out, weights_only=True)["class_names"] == ["kettle", "teapot"]  # category-id order
