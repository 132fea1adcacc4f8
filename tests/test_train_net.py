"""train_net.py: training the head, --resume, and --eval-only on an LVIS-format dataset
(with an image that has no boxes)."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import train_net
from regionspot.data.datasets.regionspot_sample import (
    _load_sample_dicts,
    prepare_regionspot_sample,
    sample_vocabulary_metadata,
)

DATASET = "regionspot_sample_with_empty_image"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The sample plus one image without boxes, registered under its own name."""
    root = str(tmp_path_factory.mktemp("sample"))
    json_path, image_root = prepare_regionspot_sample(root)
    data = json.load(open(json_path))
    Image.fromarray(np.full((200, 300, 3), 127, np.uint8)).save(os.path.join(image_root, "blank.png"))
    data["images"].append({"id": 999, "file_name": "blank.png", "height": 200, "width": 300,
                           "neg_category_ids": [793], "not_exhaustive_category_ids": [],
                           "coco_url": "file://" + os.path.join(image_root, "blank.png")})
    json_with_empty = os.path.join(root, "with_empty.json")
    json.dump(data, open(json_with_empty, "w"))

    def load():
        dicts = _load_sample_dicts(root)
        return dicts + [{"file_name": os.path.join(image_root, "blank.png"), "height": 200, "width": 300,
                         "image_id": 999, "annotations": []}]

    DatasetCatalog.register(DATASET, load)
    MetadataCatalog.get(DATASET).set(json_file=json_with_empty, image_root=image_root, evaluator_type="lvis",
                                     **sample_vocabulary_metadata())
    yield DATASET
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def _args(out, sam_path, clip_path, *extra, eval_only=False, resume=False):
    argv = ["--config-file", "configs/regionspot_sample_cpu.yaml"]
    argv += ["--eval-only", "--untrained-head"] if eval_only else []
    argv += ["--resume"] if resume else []
    argv += ["MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
             "MODEL.REGIONSPOT.TEXT_CACHE_DIR", os.path.join(out, "cache"), "OUTPUT_DIR", out,
             "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", f"('{DATASET}',)",
             "SOLVER.IMS_PER_BATCH", "2", *extra]
    return train_net.get_parser().parse_args(argv)


@pytest.fixture(autouse=True)
def repo_cwd(monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.abspath(train_net.__file__)))


def _iterations(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line)["iteration"] for line in f if "total_loss" in line]


def test_train_then_resume(tmp_path, dataset, sam_path, clip_path):
    out = str(tmp_path / "run")
    extra = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "1"]
    train_net.main(_args(out, sam_path, clip_path, *extra))
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_final.pth"
    first = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert first["iteration"] == 3
    assert all(k.startswith("head.") for k in first["model"])  # frozen SAM/CLIP are not saved
    # --resume continues from the last checkpoint up to the new MAX_ITER
    extra[1] = "7"
    train_net.main(_args(out, sam_path, clip_path, *extra, resume=True))
    second = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert second["iteration"] == 6
    assert any(not torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert "LRScheduler" in second["trainer"]["hooks"]  # optimizer/scheduler state travel with it


def test_eval_only_with_ground_truth_boxes(tmp_path, dataset, sam_path, clip_path):
    out = str(tmp_path / "eval")
    results = train_net.main(_args(out, sam_path, clip_path, "MODEL.MASK_ON", "True", eval_only=True))
    metrics = results[DATASET]
    assert set(metrics) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert {"AP", "APr", "APc", "APf"} <= set(metrics[task])
    written = json.load(open(os.path.join(out, "inference", DATASET, "metrics.json")))
    assert written["results"]["bbox"]["AP"] == pytest.approx(metrics["bbox"]["AP"])
    assert "ground-truth boxes" in written["protocol"]["description"] and written["proposals"] == "gt"
    detections = json.load(open(os.path.join(out, "inference", DATASET, "lvis_instances_results.json")))
    assert {d["image_id"] for d in detections} == set(range(1, 9))  # every image but the blank one
    sample_ids = set(sample_vocabulary_metadata()["thing_dataset_id_to_contiguous_id"])
    assert {d["category_id"] for d in detections} <= sample_ids  # contiguous ids mapped back to LVIS ids


def test_two_process_training_on_cpu(tmp_path, sam_path, clip_path):
    """`--num-gpus 2` runs Detectron2's DDP launcher with gloo on a CPU machine."""
    import subprocess
    import sys

    out = str(tmp_path / "ddp")
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    cmd = [sys.executable, "train_net.py", "--config-file", "configs/regionspot_sample_cpu.yaml", "--num-gpus", "2",
           "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
           "MODEL.REGIONSPOT.TEXT_CACHE_DIR", os.path.join(out, "cache"), "OUTPUT_DIR", out,
           "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4", "DATASETS.TEST", "()"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the project's lines: once on the console (rank 0), in each rank's log file
    assert proc.stdout.count("trainable head parameters") == 1
    for log in ("log.txt", "log.txt.rank1"):
        assert open(os.path.join(out, log)).read().count("trainable head parameters") == 1
    assert ("world size: 2" in (proc.stdout + proc.stderr).lower()
            or os.path.exists(os.path.join(out, "model_final.pth")))
    assert torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["iteration"] == 2
