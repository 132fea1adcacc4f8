"""The ONNX route: ``regionspot-export onnx`` (regionspot/onnx_export.py) and
``OnnxRegionSpotPredictor`` (regionspot/deploy.py) against the PyTorch predictor.

Random models in the official formats, one export per pair (module-scoped): SAM + OpenAI CLIP
with a ViT-B/16-like (BB) and a ViT-L/14-like (BL, patch 14) tower, SAM-HQ + OpenAI CLIP, and
SAM 2.1 + OpenCLIP. On
bundled photos (square and not), at 1, 7 and 100 boxes and 1, 8 and 1203 classes: tokens and
logits within 1e-4, the same top-1 labels, masks with IoU >= 0.999. The deployed predictor also
runs in a process where importing torch fails.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

PHOTOS = ("skimage.data.astronaut", "skimage.data.chelsea", "sklearn.datasets.load_sample_images:china.jpg")
VOCABULARY_8 = ["cat", "dog", "person", "car", "tree", "building", "rocket", "flower"]
TOL = 1e-4


def _photo(source):
    from regionspot.data.datasets.regionspot_sample import load_sample_image

    return np.ascontiguousarray(load_sample_image(source))


def _boxes(shape, n, seed):
    h, w = shape[:2]
    rng = np.random.default_rng(seed)
    x0, y0 = rng.uniform(0, w - 8, n), rng.uniform(0, h - 8, n)
    x1, y1 = x0 + rng.uniform(4, w, n), y0 + rng.uniform(4, h, n)
    return np.stack([x0, y0, np.minimum(x1, w), np.minimum(y1, h)], axis=1).astype(np.float32)


def _export_cli(cfg_opts, output):
    """tools/export_onnx.py onnx in a subprocess, as a person runs it; returns its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "projects", "RegionSpot"), REPO]))
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_onnx.py"), "onnx", "--config-file",
                          os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"), "--output", str(output),
                          "--opts", *cfg_opts], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _opts(cfg_overrides):
    return [str(x) for kv in cfg_overrides.items() for x in kv]


@pytest.fixture(scope="module")
def exports(sam_path, clip_path, head_path, tmp_path_factory):
    """Pair name -> (PyTorch predictor, ONNX predictor, export folder), each exported once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _export_pair(name, sam_path, clip_path, head_path, tmp_path_factory)
        return cache[name]
    return get


@pytest.fixture(scope="module", params=["sam_openai_bb", "sam_openai_bl", "samhq_openai", "sam2_openclip"])
def pair(request, exports):
    return exports(request.param)


@pytest.fixture(scope="module")
def sample_pair(exports):
    """The sample's pair (SAM + OpenAI CLIP BB, a head checkpoint), exported by the CLI."""
    return exports("sam_openai_bb")


def _export_pair(name, sam_path, clip_path, head_path, tmp_path_factory):
    """(PyTorch predictor, ONNX predictor, export folder) of one pair."""
    from regionspot.config import load_config
    from regionspot.deploy import OnnxRegionSpotPredictor
    from regionspot.onnx_export import export_onnx
    from regionspot.predictor import RegionSpotPredictor
    from regionspot.testing.random_backbones import (
        SAM2_TINY_CONFIG,
        write_random_clip,
        write_random_open_clip,
        write_random_sam2,
        write_random_sam_hq,
    )

    tmp = tmp_path_factory.mktemp(name)
    output = tmp / "onnx"
    if name == "sam_openai_bb":  # the sample's config and a head checkpoint, through the CLI
        overrides = {"MODEL.REGIONSPOT.SAM_WEIGHTS": sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS": clip_path,
                     "MODEL.REGIONSPOT.TEXT_CACHE_DIR": str(tmp / "cache"), "MODEL.REGIONSPOT.VOCABULARY": "custom",
                     "MODEL.REGIONSPOT.CUSTOM_VOCABULARY": "cat,dog,car,person", "MODEL.WEIGHTS": head_path}
        stdout = _export_cli(_opts(overrides), output)
        assert f"wrote {output}" in stdout
        cfg = load_config(os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"), _opts(overrides))
        predictor = RegionSpotPredictor.from_config(cfg)
    else:
        if name == "sam_openai_bl":
            cfg = make_cfg(sam_path, write_random_clip(str(tmp / "clip_p14.pt"), "tiny-p14", seed=2), tmp / "cache")
        elif name == "samhq_openai":
            cfg = make_cfg(write_random_sam_hq(str(tmp / "sam_hq.pth"), seed=2), clip_path, tmp / "cache",
                           **{"MODEL.REGIONSPOT.LOCALIZER": "sam_hq"})
        else:
            cfg = make_cfg(write_random_sam2(str(tmp / "sam2.pt"), seed=3),
                           write_random_open_clip(str(tmp / "open_clip"), seed=1), tmp / "cache",
                           **{"MODEL.REGIONSPOT.LOCALIZER": "sam2", "MODEL.REGIONSPOT.SAM2_CONFIG": SAM2_TINY_CONFIG,
                              "MODEL.REGIONSPOT.VL_MODEL": "open_clip"})
        torch.manual_seed(0)
        predictor = RegionSpotPredictor.from_config(cfg, allow_untrained_head=True)
        export_onnx(predictor, str(output))
    return predictor, OnnxRegionSpotPredictor(str(output)), output


def test_exported_predictions_equal_the_pytorch_predictors(pair):
    """Tokens and logits within 1e-4, the same top-1 labels, masks IoU >= 0.999, boxes equal,
    on three photos (two not square), 1 / 7 / 100 boxes, 1 / 8 / 1203 classes."""
    from regionspot.data.validation import check_boxes

    ours, theirs, folder = pair[1], pair[0], pair[2]
    scale = ours.manifest["logit_scale"]
    lvis_like = [f"class {i}" for i in range(1203)]
    rng = np.random.default_rng(0)
    random_text = rng.standard_normal((1203, ours.manifest["semantic_encoder"]["embed_dim"])).astype(np.float32)
    random_text /= np.linalg.norm(random_text, axis=1, keepdims=True)
    theirs.set_vocabulary(lvis_like, torch.from_numpy(random_text))
    ours.set_vocabulary(lvis_like, random_text)
    vocabularies = [["person"], VOCABULARY_8, lvis_like]
    for p, source in enumerate(PHOTOS):
        image = _photo(source)
        theirs.set_image(image)
        ours.set_image(image)
        for n in (1, 7, 100):
            boxes = _boxes(image.shape, n, seed=10 * p + n)
            regions = [theirs._box_regions(check_boxes(boxes, image.shape[:2]))]
            reference = theirs.model.prompt_boxes(theirs._features, regions, with_masks=False)[0].tokens.numpy()
            np.testing.assert_allclose(ours.position_tokens(boxes), reference, atol=TOL, rtol=0,
                                       err_msg=f"tokens, {source}, {n} boxes")
            np.testing.assert_allclose(ours.embed(boxes), theirs.embed(boxes).numpy(), atol=TOL, rtol=0,
                                       err_msg=f"embed, {source}, {n} boxes")
            for vocabulary in vocabularies:
                a, b = theirs.predict(boxes, vocabulary=vocabulary), ours.predict(boxes, vocabulary=vocabulary)
                what = f"{source}, {n} boxes, {len(vocabulary)} classes ({folder.parent.name})"
                text_a = theirs.text_embeddings_for(vocabulary).numpy()
                text_b = ours.text_embeddings_for(vocabulary)
                np.testing.assert_allclose(scale * b.embeddings @ text_b.T, scale * a.embeddings.numpy() @ text_a.T,
                                           atol=TOL, rtol=0, err_msg=f"logits, {what}")
                # the same top-1 label for every box, except where the reference's two best classes lie
                # within the tolerance (a tie at float rounding, which another CPU may break either way):
                # there the deployed label must be one of the tied ones
                probs = a.probabilities.numpy()
                best = probs.max(axis=1)
                for i, (got, expected) in enumerate(zip(b.labels, a.labels)):
                    if got != expected:
                        tied = {vocabulary[j] for j in np.flatnonzero(probs[i] >= best[i] - 2 * TOL)}
                        assert len(tied) > 1 and got in tied, (what, i, got, expected)
                np.testing.assert_allclose(b.probabilities, a.probabilities.numpy(), atol=TOL, rtol=0, err_msg=what)
                np.testing.assert_allclose(b.boxes, a.boxes.numpy(), atol=1e-3, rtol=0, err_msg=what)
                masks_a, masks_b = a.masks.numpy(), b.masks
                assert masks_b.shape == masks_a.shape == (n, *image.shape[:2])
                inter = (masks_a & masks_b).sum(axis=(1, 2))
                union = (masks_a | masks_b).sum(axis=(1, 2))
                iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
                assert iou.min() >= 0.999, f"mask IoU {iou.min():.5f}, {what}"


def test_the_manifest_says_what_was_exported(pair, head_path):
    """manifest.json: the pair, the parts' sizes and pixel means, the protocol, the head's hash,
    the versions; every file passes onnx.checker at opset 18 or newer; no partial folder left."""
    import hashlib

    import onnx

    theirs, folder = pair[0], pair[2]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["pair"] == theirs.model.pair
    assert manifest["localizer"]["input_size"] == theirs.model.localizer.input_size
    assert manifest["localizer"]["token_dim"] == theirs.model.localizer.token_dim
    assert manifest["semantic_encoder"]["pixel_mean"] == pytest.approx(
        theirs.model.semantic_encoder.pixel_mean.flatten().tolist())
    assert manifest["protocol"]["class_score"] == theirs.protocol.class_score
    assert manifest["image_resize"] == {"min_size": 448, "max_size": 853}
    assert {"torch", "onnx"} <= set(manifest["versions"])
    if theirs.weights:
        assert manifest["head"]["sha256"] == hashlib.sha256(open(head_path, "rb").read()).hexdigest()
    else:
        assert manifest["head"]["sha256"] == "untrained"
    for name in manifest["files"].values():
        model = onnx.load(str(folder / name))
        onnx.checker.check_model(model)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert [p.name for p in folder.parent.iterdir() if "partial" in p.name] == []
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_the_deployed_predictor_runs_where_torch_cannot_be_imported(sample_pair, tmp_path):
    """A subprocess whose import of torch, detectron2, clip and open_clip fails loads the folder,
    encodes a new vocabulary with the exported text tower and tokenizer, and gives the PyTorch
    predictor's labels and probabilities."""
    theirs, folder = sample_pair[0], sample_pair[2]
    image = _photo(PHOTOS[1])
    boxes = _boxes(image.shape, 7, seed=3)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "boxes.npy", boxes)
    script = f"""
import importlib.abc, json, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "detectron2", "clip", "open_clip", "torchvision"):
            raise ImportError("importing " + name + " is blocked in this test")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from regionspot.deploy import OnnxRegionSpotPredictor
predictor = OnnxRegionSpotPredictor({str(folder)!r})
predictor.set_image(np.load({str(tmp_path / 'image.npy')!r}))
out = predictor.predict(np.load({str(tmp_path / 'boxes.npy')!r}), vocabulary={VOCABULARY_8!r})
assert not any(m.split(".")[0] in ("torch", "detectron2") for m in sys.modules), "torch was imported"
print(json.dumps({{"labels": out.labels, "probabilities": out.probabilities.tolist(),
                  "masks": int(out.masks.sum()), "json": out.to_json(top_k=2)}}))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "projects", "RegionSpot"), REPO]))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    theirs.set_image(image)
    reference = theirs.predict(boxes, vocabulary=VOCABULARY_8)
    assert result["labels"] == reference.labels
    np.testing.assert_allclose(result["probabilities"], reference.probabilities.numpy(), atol=TOL, rtol=0)
    assert result["masks"] > 0 and len(result["json"]) == 7 and len(result["json"][0]["top_classes"]) == 2


def test_the_exported_tokenizer_gives_clips_token_ids(tmp_path):
    """tokenizer.json + deploy's cleaning == clip.tokenize and OpenCLIP's tokenizer, on LVIS names in
    templates and on strings with case, HTML entities, unicode, digits, punctuation, long texts."""
    import clip
    import open_clip
    from clip.simple_tokenizer import SimpleTokenizer

    from regionspot.data.vocabularies import get_vocabulary
    from regionspot.deploy import ClipTokenizer
    from regionspot.onnx_export import bpe_tables, write_tokenizer

    texts = [f"a photo of a {name}." for name in get_vocabulary("lvis")[::3]]
    texts += ["Tennis  Racket", "caf\u00e9 cr\u00e8me", "R2-D2's  \u201chat\u201d", "&amp; rock &lt;n&gt; roll",
              "5 o'clock shadow", "\u00fcber-cool \u65e5\u672c", "x" * 300, " ".join(["word"] * 100), "I'll   go",
              "ALL CAPS", "emoji \U0001f600 face", "tab\tand\nnewline"]
    for name, tokenizer, reference in [
            ("clip", SimpleTokenizer(), lambda t: clip.tokenize(t, truncate=True)),
            ("open_clip", open_clip.get_tokenizer("ViT-B-16"), open_clip.get_tokenizer("ViT-B-16"))]:
        tables = bpe_tables(tokenizer)
        write_tokenizer(tables, str(tmp_path / f"{name}.json"))
        ours = ClipTokenizer(str(tmp_path / f"{name}.json"), tables["sot"], tables["eot"], 77)(texts)
        expected = reference(texts).numpy()
        mismatched = [texts[i] for i in np.nonzero((ours != expected).any(axis=1))[0]]
        assert not mismatched, f"{name}: {len(mismatched)} texts tokenized differently, e.g. {mismatched[:3]}"


def test_what_cannot_be_exported_is_refused_in_one_line(sample_pair, tmp_path, monkeypatch):
    """An existing output folder, a localizer family without an export and a part the exporters
    fail on are refused in one line naming the part; no folder, not even a partial one, is left."""
    from regionspot.modeling.localizer import Localizer
    from regionspot.onnx_export import ExportRefused, _HeadExport, export_onnx

    theirs, folder = sample_pair[0], sample_pair[2]
    with pytest.raises(ExportRefused, match="exists"):
        export_onnx(theirs, str(folder))
    localizer = type(theirs.model.localizer)
    monkeypatch.setattr(localizer, "onnx_modules", Localizer.onnx_modules)
    with pytest.raises(ExportRefused, match=r"^cannot export the localizer: the localizer 'sam' .* has no ONNX export"):
        export_onnx(theirs, str(tmp_path / "a"))
    monkeypatch.undo()

    def broken(self, tokens, semantic, text_embeddings):
        raise RuntimeError("a part no exporter can trace")
    monkeypatch.setattr(_HeadExport, "forward", broken)
    with pytest.raises(ExportRefused) as refused:
        export_onnx(theirs, str(tmp_path / "b"))
    assert str(refused.value).startswith("cannot export the head: ") and "\n" not in str(refused.value)
    assert "a part no exporter can trace" in str(refused.value) and "\x1b" not in str(refused.value)
    assert sorted(os.listdir(tmp_path)) == []


def test_bad_input_to_the_deployed_predictor(sample_pair):
    from regionspot.deploy import InputError

    ours, folder = sample_pair[1], sample_pair[2]
    ours.reset_image()
    with pytest.raises(RuntimeError, match="set_image"):
        ours.predict([[0, 0, 5, 5]])
    with pytest.raises(InputError, match="uint8"):
        ours.set_image(np.zeros((10, 10, 3), np.float32))
    ours.set_image(_photo(PHOTOS[1]))
    with pytest.raises(InputError, match="box 1 .* outside"):
        ours.predict([[0, 0, 5, 5], [0, 0, 5000, 5]], vocabulary=["cat"])
    with pytest.raises(InputError, match="zero area"):
        ours.predict([[5, 5, 5, 9]], vocabulary=["cat"])
    with pytest.raises(ValueError, match="providers"):
        type(ours)(str(folder), providers=["NoSuchExecutionProvider"])
    assert ours.predict(np.zeros((0, 4)), vocabulary=["cat"]).labels == []


def test_the_demo_recognises_boxes_with_the_onnxruntime_backend(sample_pair, tmp_path):
    """demo/demo.py --backend onnxruntime --onnx-dir: the PyTorch predictor's labels in its JSON,
    the drawing written; --proposals (not exported) is refused in one line."""
    from PIL import Image

    theirs, folder = sample_pair[0], sample_pair[2]
    image = _photo(PHOTOS[2])
    Image.fromarray(image).save(tmp_path / "china.png")
    boxes = _boxes(image.shape, 5, seed=7)
    (tmp_path / "boxes.json").write_text(json.dumps({"china.png": boxes.tolist()}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "projects", "RegionSpot"), REPO]))
    base = [sys.executable, os.path.join(REPO, "demo", "demo.py"), "--backend", "onnxruntime", "--onnx-dir",
            str(folder), "--input", str(tmp_path / "china.png"), "--vocabulary", "custom", "--custom-vocabulary",
            ",".join(VOCABULARY_8), "--output", str(tmp_path / "out")]
    run = subprocess.run(base + ["--boxes", str(tmp_path / "boxes.json")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    written = json.loads((tmp_path / "out" / "china.json").read_text())
    assert (tmp_path / "out" / "china.jpg").stat().st_size > 0
    theirs.set_image(image)
    reference = theirs.predict(boxes, vocabulary=VOCABULARY_8)
    assert [row["label"] for row in written["predictions"]] == reference.labels
    assert written["weights"]["sha256"] == json.loads((folder / "manifest.json").read_text())["head"]["sha256"]
    refused = subprocess.run(base + ["--proposals", "sam_auto"], capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode == 2
    assert "--backend onnxruntime needs --onnx-dir FOLDER" in refused.stderr.strip().splitlines()[-1]


def test_the_readmes_deploy_section_runs_as_written(sam_path, clip_path, head_path, tmp_path, monkeypatch):
    """README "Deploy": its export command (from a folder laid out as run_sample.sh leaves the
    repository: the sample config's random SAM and CLIP, a head at the path it names), then its
    Python lines, which give labels of the vocabulary for the boxes."""
    import re
    import shlex

    from regionspot.config import load_config

    text = open(os.path.join(REPO, "README.md")).read()
    section = text[text.index("## Deploy\n"):]
    section = section[:section.index("\n## ", 1)]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ").strip()
    code = re.search(r"```\n(from regionspot.deploy .*?)```", section, re.S).group(1)
    os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
    cfg = load_config(os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"))
    for configured, written in ((cfg.MODEL.REGIONSPOT.SAM_WEIGHTS, sam_path),
                                (cfg.MODEL.REGIONSPOT.CLIP_WEIGHTS, clip_path),
                                ("output/sample/train/model_final.pth", head_path)):
        os.makedirs(tmp_path / os.path.dirname(configured), exist_ok=True)
        os.symlink(written, tmp_path / configured)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "tools/export_onnx.py"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "projects", "RegionSpot"), REPO]))
    run = subprocess.run([sys.executable, os.path.join(REPO, argv[1]), *argv[2:]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    monkeypatch.chdir(tmp_path)
    image = _photo(PHOTOS[0])
    namespace = {"image_rgb": image, "boxes_xyxy": _boxes(image.shape, 3, seed=1)}
    exec(compile(code, "README.md Deploy", "exec"), namespace)
    regions = namespace["regions"]
    assert len(regions.labels) == 3 and set(regions.labels) <= {"cat", "dog", "sofa"}
    assert regions.masks.shape == (3, *image.shape[:2])


def test_the_onnx_benchmark_times_every_path_and_records_the_export(tmp_path):
    """tools/benchmark.py onnx on the sample's sizes, 3 boxes, 1 repeat: the three CPU paths with
    their times and deviations, the export's time per part, in its JSON and its table."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "projects", "RegionSpot"), REPO]))
    output = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "onnx", "--variant", "small",
                          "--boxes", "3", "--repeats", "1", "--threads", "1", "--weights-dir", str(tmp_path / "w"),
                          "--output", str(output)], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(output.read_text())
    assert set(report["paths"]) == {"pytorch float32", "pytorch bfloat16", "onnxruntime CPU"}
    assert report["paths"]["onnxruntime CPU"]["max_probability_difference"] < TOL
    assert report["paths"]["onnxruntime CPU"]["top1_agreement"] == 1.0
    assert all(f["set_image_ms"] > 0 and f["predict_ms"] > 0 for f in report["paths"].values())
    assert set(report["export_parts_s"]) == {"localizer_image_encoder", "localizer_prompt", "semantic_encoder",
                                             "head", "text_encoder"} and report["export_s"] > 0
    assert "onnxruntime CPU" in run.stdout and "predict 3 boxes ms" in run.stdout


def test_the_web_app_recognises_boxes_with_the_onnxruntime_backend(sample_pair):
    """RegionSpotApp.from_args with --backend onnxruntime: each browser session gets its own
    predictor on the shared sessions; boxes clicked on a bundled photo get the PyTorch predictor's
    labels; the modes the export lacks are refused in one line."""
    import argparse

    from regionspot.data.validation import InputError
    from regionspot.webapp import BOXES, BUNDLED, EVERYTHING, RegionSpotApp

    theirs, folder = sample_pair[0], sample_pair[2]
    app = RegionSpotApp.from_args(argparse.Namespace(backend="onnxruntime", onnx_dir=str(folder),
                                                     max_pixels=40_000_000, max_sessions=4))
    name = next(iter(BUNDLED))
    app.set_image("a", bundled=name)
    app.set_image("b", bundled=list(BUNDLED)[1])
    assert app.session("a").predictor.sessions is app.session("b").predictor.sessions
    app.click("a", BOXES, 10, 20)
    app.click("a", BOXES, 200, 180)
    status, regions = app.recognise("a", "cat, dog, person", BOXES)
    assert regions == 1, status
    theirs.set_image(app.session("a").image)
    assert app.session("a").predictions.labels == theirs.predict([[10, 20, 200, 180]], ["cat", "dog", "person"]).labels
    assert len(app.table("a")) == 1 and app.attention_image("a", "0: x", "last") is None
    with pytest.raises(InputError, match="not available with --backend onnxruntime"):
        app.recognise("a", "cat", EVERYTHING)
    with pytest.raises(InputError, match="no boxes yet"):
        app.recognise("b", "cat", BOXES)


def test_the_cli_refuses_an_existing_folder_in_one_line(sample_pair, sam_path, clip_path, tmp_path):
    """tools/export_onnx.py onnx --output an existing export: exit status 2, one error line naming
    the folder, the folder untouched."""
    folder = sample_pair[2]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "projects", "RegionSpot"), REPO]))
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_onnx.py"), "onnx", "--config-file",
                          os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"), "--output", str(folder),
                          "--untrained-head", "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path,
                          "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR",
                          str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("regionspot-export: error: ") and f"{folder} exists" in last
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before
