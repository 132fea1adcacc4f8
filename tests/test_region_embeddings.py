"""regionspot-export-region-embeddings: an export (safetensors + index JSON) run as a subprocess,
scored later against a new vocabulary exactly as the model scores live; text and region search."""

import json
import os
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


def test_search_by_text_by_region_and_with_a_vocabulary(export):
    out = str(export["folder"] / "out")

    def search(*args):
        run = subprocess.run(export["base"] + ["--search", out, *args, "--opts"] + export["opts"],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        return run.returncode, run.stdout, run.stderr

    code, stdout, _ = search("--text", "a red umbrella", "--top", "2")
    assert code == 0 and "nearest to the text 'a red umbrella'" in stdout and stdout.count("cosine") == 2
    code, stdout, _ = search("--region", "0")
    assert code == 0 and stdout.count("cosine") == 2 and "region 0:" in stdout.splitlines()[0]
    code, stdout, _ = search("--classify", ",".join(VOCABULARY))
    assert code == 0 and "4 classes" in stdout and stdout.count("region ") == 3
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
