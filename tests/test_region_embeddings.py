"""regionspot-export-region-embeddings: an export (safetensors + index JSON) run as a subprocess,
scored later against a new vocabulary exactly as the model scores live; text and region search."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO
from regionspot import RegionSpotPredictor
from regionspot.config import load_config

BOXES = {"a.png": [[10, 10, 150, 120], [100, 40, 300, 230]], "b.jpg": [[0, 0, 190, 290]]}
VOCABULARY = ["umbrella", "kite", "bicycle", "teapot"]


@pytest.fixture(scope="module")
def export(tmp_path_factory, sam_path, clip_path, head_path):
    folder = tmp_path_factory.mktemp("export")
    rng = np.random.RandomState(0)
    for name, size in (("a.png", (240, 320)), ("b.jpg", (300, 200))):
        (folder / "in").mkdir(exist_ok=True)
        Image.fromarray((rng.rand(*size, 3) * 255).astype(np.uint8)).save(folder / "in" / name)
    (folder / "boxes.json").write_text(json.dumps(BOXES))
    opts = ["MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(folder / "cache"), "MODEL.WEIGHTS", head_path]
    base = [sys.executable, os.path.join(REPO, "tools", "export_region_embeddings.py"), "--config-file",
            os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml")]
    run = subprocess.run(base + ["--input", str(folder / "in" / "*"), "--boxes", str(folder / "boxes.json"),
                                 "--output", str(folder / "out"), "--opts"] + opts,
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    return {"folder": folder, "opts": opts, "base": base, "stdout": run.stdout}


def test_export_writes_normalised_embeddings_and_an_index(export):
    out = export["folder"] / "out"
    assert "3 regions of 2 images" in export["stdout"]
    tensors = load_file(str(out / "region_embeddings.safetensors"))
    index = json.loads((out / "region_embeddings.json").read_text())
    assert tensors["embeddings"].dtype == torch.float32 and tensors["embeddings"].shape == (3, index["embed_dim"])
    torch.testing.assert_close(tensors["embeddings"].norm(dim=1), torch.ones(3))
    assert tensors["image_index"].tolist() == [0, 0, 1]
    assert [os.path.basename(im["file_name"]) for im in index["images"]] == ["a.png", "b.jpg"]
    assert [r["box_xyxy"] for r in index["regions"]] == BOXES["a.png"] + BOXES["b.jpg"]
    assert index["pair"]["localizer"] == "sam" and index["class_score"] == "softmax"


def test_stored_embeddings_score_a_new_vocabulary_like_the_live_model(export, tiny_cfg, head_path):
    """Scoring the stored embeddings against a vocabulary never seen at export time equals running
    the model with that vocabulary (to float rounding: the export ran in another process, whose
    matrix products may sum in another order; in one process they are bit-equal, test_predictor.py)."""
    out = export["folder"] / "out"
    stored = load_file(str(out / "region_embeddings.safetensors"))["embeddings"]
    cfg = load_config(os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"), export["opts"])
    predictor = RegionSpotPredictor.from_config(cfg)
    live, embeddings = [], []
    for name in ("a.png", "b.jpg"):
        predictor.set_image(np.asarray(Image.open(export["folder"] / "in" / name).convert("RGB")))
        out = predictor.predict(BOXES[name], VOCABULARY)
        live.append(out.probabilities)
        embeddings.append(out.embeddings)
    live = torch.cat(live)
    torch.testing.assert_close(stored, torch.cat(embeddings), rtol=0, atol=1e-6)
    later = predictor.score_embeddings(stored, VOCABULARY)
    torch.testing.assert_close(later, live, rtol=1e-5, atol=1e-6)
    assert torch.equal(later.argmax(1), live.argmax(1))


def _listed(stdout: str, pattern: str):
    """(region index, printed value) of each result line, in the printed order."""
    return [(int(m.group(2)), float(m.group(1))) for m in
            (re.match(pattern, line) for line in stdout.splitlines()) if m]


def _brute_force_top(scores: torch.Tensor, top: int, exclude=None):
    """(region, score) of the ``top`` best scores, best first, ``exclude`` left out."""
    ranked = [(int(i), float(scores[i])) for i in scores.argsort(descending=True) if int(i) != exclude]
    return ranked[:top]


def _assert_same_ranking(listed, expected):
    """The listed regions are the brute-force ones, best first, with their values to the 4 printed
    decimals (a near-tie may swap two neighbours whose values agree to that precision)."""
    assert len(listed) == len(expected) > 0, (listed, expected)
    assert sorted(r for r, _ in listed) == sorted(r for r, _ in expected), (listed, expected)
    values = dict(expected)
    for region, printed in listed:
        assert abs(printed - values[region]) <= 6e-5, (region, printed, values[region])
    assert [v for _, v in listed] == sorted((v for _, v in listed), reverse=True)


COSINE_LINE = r"^  cosine ([+-]\d\.\d{4})  region (\d+)"


def test_search_by_text_by_region_and_with_a_vocabulary(export):
    """Each search's ranking and cosines are a brute-force computation on the exported file: all
    cosines between unit rows, the text embedded by the config's VL model, the vocabulary scored
    as the model scores (score_embeddings)."""
    from regionspot.modeling.backbones import build_vl_model
    from regionspot.predictor import score_embeddings

    out = str(export["folder"] / "out")
    stored = load_file(os.path.join(out, "region_embeddings.safetensors"))["embeddings"].double()
    index = json.loads((export["folder"] / "out" / "region_embeddings.json").read_text())
    _, text_classifier, _ = build_vl_model(load_config(os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"),
                                                       export["opts"]))

    def search(*args):
        run = subprocess.run(export["base"] + ["--search", out, *args, "--opts"] + export["opts"],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        return run.returncode, run.stdout, run.stderr

    code, stdout, _ = search("--text", "a red umbrella", "--top", "2")
    assert code == 0 and "nearest to the text 'a red umbrella':" in stdout
    text = text_classifier.embed(["a red umbrella"], "cpu")[0].double()
    _assert_same_ranking(_listed(stdout, COSINE_LINE), _brute_force_top(stored @ text, 2))

    code, stdout, _ = search("--region", "0")
    assert code == 0 and "nearest to region 0:" in stdout
    _assert_same_ranking(_listed(stdout, COSINE_LINE), _brute_force_top(stored @ stored[0], 5, exclude=0))

    code, stdout, _ = search("--classify", ",".join(VOCABULARY))
    assert code == 0 and "4 classes, the 3 most confident regions:" in stdout
    probabilities = score_embeddings(stored.float(), text_classifier.embed(VOCABULARY, "cpu"), index["logit_scale"],
                                     index["class_score"]).double()
    best, classes = probabilities.max(dim=1)
    listed = [(int(m.group(3)), m.group(1), float(m.group(2))) for m in
              (re.match(r"^  (\w+) (\d\.\d{4})  region (\d+)", line) for line in stdout.splitlines()) if m]
    assert sorted(r for r, _, _ in listed) == [0, 1, 2], stdout  # every region, labelled
    for region, name, value in listed:
        assert name == VOCABULARY[int(classes[region])] and abs(value - float(best[region])) <= 6e-5, (region, name)
    assert [v for _, _, v in listed] == sorted((v for _, _, v in listed), reverse=True)

    code, _, stderr = search("--region", "7")
    assert code == 2 and "regions 0..2" in stderr


def test_text_search_checks_the_vision_language_model_only(export, tmp_path):
    """Text lives in the VL model's space: an export whose localizer is named otherwise (e.g.
    SAM 2.1's "sam2:<config>") is searched, one of another VL model is refused."""
    import json
    import shutil

    from regionspot.tools.export_region_embeddings import INDEX

    out = tmp_path / "copy"
    shutil.copytree(export["folder"] / "out", out)
    index_path = out / INDEX
    index = json.loads(index_path.read_text())
    vl_model = index["pair"]["vl_model"]

    def search_with(pair):
        index["pair"] = pair
        index_path.write_text(json.dumps(index))
        return subprocess.run(export["base"] + ["--search", str(out), "--text", "a cat", "--opts"] + export["opts"],
                              capture_output=True, text=True, timeout=300, cwd=REPO)

    assert search_with({"localizer": "sam2:sam2.1_hiera_s", "vl_model": vl_model}).returncode == 0
    refused = search_with({"localizer": "sam", "vl_model": "open_clip:ViT-B-16"})
    assert refused.returncode == 2 and "vision-language model 'open_clip:ViT-B-16'" in refused.stderr


def test_under_torchrun_with_several_processes_the_export_is_refused_in_one_line(export, tmp_path):
    """Two processes of the export would write the same files: refused before anything is read."""
    env = dict(os.environ, TORCHELASTIC_RUN_ID="x", LOCAL_RANK="0", RANK="0", WORLD_SIZE="2", GROUP_RANK="0",
               LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    run = subprocess.run(export["base"] + ["--input", str(export["folder"] / "in" / "*"), "--output",
                                           str(tmp_path / "out"), "--opts"] + export["opts"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert run.returncode == 2 and "WORLD_SIZE=2" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
