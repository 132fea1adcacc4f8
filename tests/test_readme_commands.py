"""The README's evaluation and demo commands, as written, with each paper config on a CPU-only
machine: small random backbones of the same architecture family are substituted through the
config, the bundled sample stands in for the user's data."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO
from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.config import load_config
from regionspot.data.datasets.regionspot_sample import prepare_regionspot_sample
from regionspot.testing.random_backbones import write_random_clip, write_random_sam

# paper config -> tiny CLIP of its family (patch size and input resolution)
PAPER_CONFIGS = {"regionspot_bb.yaml": "tiny", "regionspot_bl.yaml": "tiny-p14",
                 "regionspot_bl_336.yaml": "tiny-p14-336"}


def readme_commands():
    """Every shell command of the README's code blocks, continuation lines joined."""
    text = open(os.path.join(REPO, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(shlex.split(command))
    return commands


def _find(predicate):
    found = [c for c in readme_commands() if predicate(c)]
    assert found, "the README lost the command this test runs"
    return found[0]


def _replace(argv, flag, *values):
    i = argv.index(flag)
    return argv[:i + 1] + list(values) + argv[i + 1 + len(values):]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Sample data, a boxes file, and per paper config: tiny SAM/CLIP files and a head checkpoint."""
    root = tmp_path_factory.mktemp("readme")
    json_path, image_root = prepare_regionspot_sample(str(root / "sample"))
    sam = write_random_sam(str(root / "sam_tiny.pth"), "tiny")
    variants = {}
    for config, clip_preset in PAPER_CONFIGS.items():
        clip = write_random_clip(str(root / f"clip_{clip_preset}.pt"), clip_preset)
        opts = ["MODEL.DEVICE", "cpu", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip]
        from detectron2.modeling import build_model

        model = build_model(load_config(os.path.join(REPO, "configs", config), opts))
        RegionSpotCheckpointer(model, str(root / config)).save("head")
        variants[config] = dict(clip=clip, weights=str(root / config / "head.pth"))
    boxes = root / "boxes.json"
    boxes.write_text(json.dumps({"astronaut.png": [[0, 0, 200, 250], [300, 10, 500, 480]]}))
    return dict(root=root, json=json_path, images=image_root, sam=sam, variants=variants, boxes=str(boxes))


def _run(argv, root):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DETECTRON2_DATASETS=str(root / "d2"))  # a CPU-only machine
    proc = subprocess.run([sys.executable] + argv[1:], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("config", list(PAPER_CONFIGS))
def test_readme_evaluation_command_with_each_paper_config(setup, config):
    command = _find(lambda c: c[:2] == ["python", "train_net.py"] and "--eval-only" in c and "--register" in c)
    variant, root = setup["variants"][config], setup["root"]
    name = command[command.index("--register") + 1]
    argv = _replace(command, "--config-file", f"configs/{config}")
    argv = _replace(argv, "--register", name, setup["json"], setup["images"])
    argv = _replace(argv, "MODEL.WEIGHTS", variant["weights"])
    out = root / f"eval_{config}"
    _run(argv + ["MODEL.REGIONSPOT.SAM_WEIGHTS", setup["sam"], "MODEL.REGIONSPOT.CLIP_WEIGHTS", variant["clip"],
                 "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(root / "cache"), "OUTPUT_DIR", str(out)], root)
    metrics = json.load(open(out / "inference" / name / "metrics.json"))
    assert {"AP", "APr", "APc", "APf"} <= set(metrics["results"]["bbox"])
    assert metrics["weights"] == variant["weights"]
    assert "softmax over 1203 classes" in metrics["protocol"]["description"]  # the json's categories


@pytest.mark.parametrize("config", list(PAPER_CONFIGS))
def test_readme_demo_command_with_each_paper_config(setup, config):
    command = _find(lambda c: c[:2] == ["python", "demo/demo.py"] and "--boxes" in c)
    variant, root = setup["variants"][config], setup["root"]
    out = root / f"demo_{config}"
    argv = _replace(command, "--config-file", f"configs/{config}")
    argv = _replace(argv, "--input", os.path.join(setup["images"], "astronaut.png"))
    argv = _replace(argv, "--boxes", setup["boxes"])
    argv = _replace(argv, "--output", str(out))
    argv = _replace(argv, "MODEL.WEIGHTS", variant["weights"])
    _run(argv + ["MODEL.REGIONSPOT.SAM_WEIGHTS", setup["sam"], "MODEL.REGIONSPOT.CLIP_WEIGHTS", variant["clip"],
                 "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(root / "cache")], root)
    predictions = json.load(open(out / "astronaut.json"))["predictions"]
    vocabulary = command[command.index("--custom-vocabulary") + 1].split(",")
    assert len(predictions) == 2 and {p["label"] for p in predictions} <= set(vocabulary)
