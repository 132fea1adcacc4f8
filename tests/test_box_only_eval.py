"""Datasets without instance masks (box annotations only): with MODEL.MASK_ON True the
evaluation computes box AP, skips mask AP with one log line, and writes metrics.json (COCO- and
LVIS-format files, both LVIS evaluator backends); a dataset where only some annotations have
masks is still evaluated for masks."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from conftest import REPO
from regionspot.data.datasets.regionspot_sample import prepare_regionspot_sample
from regionspot.evaluation import RegionSpotCOCOEvaluator, RegionSpotLVISEvaluator
from regionspot.evaluation.mask_annotations import has_mask, mask_annotation_counts

SKIP_LINE = "has no mask annotations"
NUM_IMAGES = 3  # a few photos: each subprocess evaluation stays ~10-20 s on the CPU


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(LVIS-format json of the sample's first images, with masks, as a dict; image folder)."""
    json_path, image_root = prepare_regionspot_sample(str(tmp_path_factory.mktemp("photos")))
    with open(json_path) as f:
        data = json.load(f)
    data["images"] = sorted(data["images"], key=lambda i: i["id"])[:NUM_IMAGES]
    kept = {i["id"] for i in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    assert data["annotations"] and all(has_mask(a) for a in data["annotations"])
    return data, image_root


def box_only(data: dict, fmt: str, drop_area: bool = False) -> dict:
    """``data`` as a box dataset: no ``segmentation`` key in any annotation; "coco": also no
    LVIS fields (category frequencies, per-image category lists)."""
    out = json.loads(json.dumps(data))
    for ann in out["annotations"]:
        ann.pop("segmentation")
        if drop_area:
            ann.pop("area")
    if fmt == "coco":
        for cat in out["categories"]:
            cat.pop("frequency", None)
        for img in out["images"]:
            img.pop("neg_category_ids", None)
            img.pop("not_exhaustive_category_ids", None)
    return out


def _run_eval(tmp_path, sam_path, clip_path, head, name, data, image_root, *opts):
    json_path = tmp_path / f"{name}.json"
    json_path.write_text(json.dumps(data))
    out = tmp_path / "out"
    argv = [sys.executable, "train_net.py", "--config-file", "configs/regionspot_sample_cpu.yaml", "--eval-only",
            "--register", name, str(json_path), image_root, "MODEL.MASK_ON", "True", "MODEL.WEIGHTS", head,
            "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"), "OUTPUT_DIR", str(out),
            "DATASETS.TEST", f"('{name}',)", *opts]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc, out / "inference" / name


@pytest.mark.parametrize("fmt,backend", [("coco", "lvis"), ("lvis", "lvis"), ("lvis", "faster_coco_eval")])
def test_train_net_eval_on_a_box_only_dataset(tmp_path, sample, sam_path, clip_path, head_path, fmt, backend):
    data, image_root = sample
    name = f"box_only_{fmt}_{backend}"
    proc, folder = _run_eval(tmp_path, sam_path, clip_path, head_path, name,
                             box_only(data, fmt, drop_area=fmt == "coco"), image_root,
                             "TEST.EVALUATOR_BACKEND", backend)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert "Traceback" not in console and "KeyError" not in console, console[-3000:]
    skip_lines = [line for line in console.splitlines() if SKIP_LINE in line]
    assert len(skip_lines) == 1, skip_lines
    assert name in skip_lines[0] and "mask AP (segm) skipped, box AP only" in skip_lines[0]
    with open(folder / "metrics.json") as f:
        metrics = json.loads(f.read(), parse_constant=_refuse)  # strict JSON
    assert metrics["dataset"] == name and list(metrics["results"]) == ["bbox"]
    box = metrics["results"]["bbox"]
    assert isinstance(box["AP"], float) and 0 <= box["AP"] <= 100
    expected = {"AP", "AP50", "AP75"} | ({"APr", "APc", "APf"} if fmt == "lvis" else set())
    assert expected <= set(box)
    assert set(metrics["skipped_tasks"]) == {"segm"} and "no mask annotations" in metrics["skipped_tasks"]["segm"]
    results_file = "coco_instances_results.json" if fmt == "coco" else "lvis_instances_results.json"
    assert (folder / results_file).is_file()


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


# ---- the evaluator itself (in-process, fast) --------------------------------------------

@pytest.fixture
def register(tmp_path, forget_new_datasets):
    def register(name, data, evaluator_type):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        ids = sorted(c["id"] for c in data["categories"])
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(json_file=str(path), evaluator_type=evaluator_type,
                                      thing_classes=[str(i) for i in ids],
                                      thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(ids)})
        return name
    return register


def _outputs(data):
    """(inputs, outputs): every ground-truth box detected with its category, score 0.9, and a
    mask that is its box."""
    to_contiguous = {c: i for i, c in enumerate(sorted(c["id"] for c in data["categories"]))}
    inputs, outputs = [], []
    for img in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        H, W = img["height"], img["width"]
        inst = Instances((H, W))
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        inst.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
        inst.scores = torch.full((len(anns),), 0.9)
        inst.pred_classes = torch.tensor([to_contiguous[a["category_id"]] for a in anns], dtype=torch.int64)
        masks = torch.zeros((len(anns), H, W), dtype=torch.bool)
        for k, (x, y, w, h) in enumerate(xywh.round().long().tolist()):
            masks[k, y:y + h, x:x + w] = True
        inst.pred_masks = masks
        inputs.append({"image_id": img["id"], "height": H, "width": W})
        outputs.append({"instances": inst})
    return inputs, outputs


@pytest.mark.parametrize("fmt,backend", [("coco", "lvis"), ("lvis", "lvis"), ("lvis", "faster_coco_eval")])
def test_evaluator_skips_mask_ap_only_without_masks(sample, register, fmt, backend, caplog):
    data, _ = sample
    cls = RegionSpotCOCOEvaluator if fmt == "coco" else RegionSpotLVISEvaluator
    none = box_only(data, fmt)
    some = box_only(data, fmt)
    for ann, original in list(zip(some["annotations"], data["annotations"]))[::2]:
        ann["segmentation"] = original["segmentation"]
    assert mask_annotation_counts(none["annotations"])[0] == 0
    assert 0 < mask_annotation_counts(some["annotations"])[0] < len(some["annotations"])
    got = {}
    for kind, gt in (("none", none), ("some", some)):
        name = register(f"masks_{kind}_{fmt}_{backend}", gt, fmt)
        for tasks in (("bbox", "segm"), None):  # None: the tasks of the predictions (boxes and masks)
            evaluator = cls(name, tasks, distributed=False, backend=backend)
            evaluator.reset()
            evaluator.process(*_outputs(data))
            caplog.clear()
            with caplog.at_level(logging.INFO):
                got[kind, tasks] = evaluator.evaluate()
            skipped = [r for r in caplog.records if SKIP_LINE in r.getMessage()]
            if kind == "none":
                assert len(skipped) == 1 and name in skipped[0].getMessage()
                assert list(evaluator.skipped_tasks) == ["segm"]
            else:
                assert not skipped and evaluator.skipped_tasks == {}
    for tasks in (("bbox", "segm"), None):
        assert list(got["none", tasks]) == ["bbox"]
        assert list(got["some", tasks]) == ["bbox", "segm"]
        assert got["none", tasks]["bbox"]["AP"] == pytest.approx(100.0)  # every box found
        # the annotations without a mask take their box as their mask: the box-shaped masks match
        assert got["some", tasks]["segm"]["AP"] > 90
    # only mask AP asked for, on a dataset without masks: refused before any inference
    with pytest.raises(ValueError, match=r"no mask annotations.*evaluate 'bbox'"):
        cls(register(f"segm_only_{fmt}_{backend}", none, fmt), ("segm",), distributed=False, backend=backend)


def test_mask_annotation_counts():
    anns = [{"segmentation": [[0, 0, 1, 0, 1, 1]]}, {"segmentation": {"size": [2, 2], "counts": "04"}},
            {"segmentation": []}, {"segmentation": [[]]}, {"segmentation": None}, {}, {"segmentation": {}}]
    assert [has_mask(a) for a in anns] == [True, True, False, False, False, False, False]
    assert mask_annotation_counts(anns) == (2, 7)
    assert mask_annotation_counts([]) == (0, 0)
