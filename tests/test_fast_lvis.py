"""TEST.EVALUATOR_BACKEND faster_coco_eval gives the LVIS API's numbers (AP, AP50, AP75, APs/m/l,
APr/c/f) on the sample and on a synthetic LVIS-format set, through the evaluator too; the cap,
the config key, the errors and the benchmark tool."""

import copy
import json
import logging
import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation.lvis_evaluation import _evaluate_predictions_on_lvis
from detectron2.structures import Boxes, Instances
from lvis import LVIS, LVISResults

from conftest import load_tool
from regionspot.data.datasets.regionspot_sample import prepare_regionspot_sample, sample_vocabulary_metadata
from regionspot.evaluation import RegionSpotCOCOEvaluator, RegionSpotLVISEvaluator
from regionspot.evaluation.fast_lvis import (
    LVIS_METRICS,
    LVISFormatError,
    evaluate_predictions_on_lvis_fast,
    limit_dets_per_image,
)

TOL = 1e-4  # percent points


@pytest.fixture(scope="module")
def tool():
    return load_tool("benchmarks.evaluator")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    json_path, _ = prepare_regionspot_sample(str(tmp_path_factory.mktemp("sample")))
    with open(json_path) as f:
        return json_path, json.load(f)


def _both(json_path, results, iou_type, max_dets=300):
    """(reference, fast) metrics, each on its own LVIS object and copy of the results."""
    ref = _evaluate_predictions_on_lvis(LVIS(json_path), copy.deepcopy(results), iou_type, max_dets_per_image=max_dets)
    fast = evaluate_predictions_on_lvis_fast(LVIS(json_path), copy.deepcopy(results), iou_type,
                                             max_dets_per_image=max_dets)
    return ref, fast


def _assert_same(ref, fast):
    assert list(fast) == list(LVIS_METRICS) == list(ref)
    for k in LVIS_METRICS:
        assert abs(ref[k] - fast[k]) <= TOL, (k, ref[k], fast[k])


def _rle(mask):
    import pycocotools.mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def _sample_results(data, seed=0, per_image=40):
    """Jittered ground truth (mostly the right category, some with a cut-out mask) plus random
    boxes of labelled and unlabelled categories; scores rounded (ties); box and mask each."""
    rng = np.random.RandomState(seed)
    cat_ids = [c["id"] for c in data["categories"]]
    results = []
    for img in data["images"]:
        W, H = img["width"], img["height"]
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        labelled = sorted({a["category_id"] for a in anns} | set(img["neg_category_ids"]))
        for k in range(per_image):
            if k < 2 * len(anns):
                a = anns[k % len(anns)]
                x, y, w, h = a["bbox"]
                x, y = x + rng.normal(0, 0.1) * w, y + rng.normal(0, 0.1) * h
                w, h = w * np.exp(rng.normal(0, 0.1)), h * np.exp(rng.normal(0, 0.1))
                cat = a["category_id"] if rng.rand() < 0.8 else int(rng.choice(labelled))
                score = rng.beta(5, 2)
            else:
                w, h = rng.uniform(5, W / 2), rng.uniform(5, H / 2)
                x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
                cat = int(rng.choice(labelled)) if rng.rand() < 0.6 else int(rng.choice(cat_ids))
                score = rng.beta(2, 5)
            x0, y0 = int(max(0, np.floor(x))), int(max(0, np.floor(y)))
            x1, y1 = int(min(W, np.ceil(x + w))), int(min(H, np.ceil(y + h)))
            mask = np.zeros((H, W), dtype=bool)
            mask[y0:y1, x0:x1] = True
            if rng.rand() < 0.5:  # cut a corner out
                mask[y0:(y0 + y1) // 2, x0:(x0 + x1) // 2] = False
            results.append({"image_id": img["id"], "category_id": cat, "bbox": [float(x), float(y), float(w), float(h)],
                            "score": round(float(score), 2), "segmentation": _rle(mask)})
    return results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_sample_same_as_lvis_api(sample, iou_type):
    json_path, data = sample
    results = _sample_results(data)
    ref, fast = _both(json_path, results, iou_type)
    _assert_same(ref, fast)
    before = copy.deepcopy(results)
    lvis_gt = LVIS(json_path)
    gt_before = copy.deepcopy(lvis_gt.dataset)
    evaluate_predictions_on_lvis_fast(lvis_gt, results, iou_type)
    assert results == before and lvis_gt.dataset == gt_before  # the inputs are left as they were
    assert all(ref[k] > 0 for k in ("AP", "APr", "APc", "APf"))  # all three groups have ground truth
    # a cap below the number of results per image, with ties at the cut
    ref, fast = _both(json_path, results, iou_type, max_dets=25)
    _assert_same(ref, fast)


def test_fast_after_reference_on_the_same_objects(sample):
    """The LVIS API adds keys to the results and converts the ground-truth polygons to RLE in
    place; the fast backend gives the same numbers on those modified objects."""
    json_path, data = sample
    results = _sample_results(data, seed=1)
    lvis_gt = LVIS(json_path)
    for iou_type in ("bbox", "segm"):
        ref = _evaluate_predictions_on_lvis(lvis_gt, results, iou_type, max_dets_per_image=300)
        _assert_same(ref, evaluate_predictions_on_lvis_fast(lvis_gt, results, iou_type, max_dets_per_image=300))


@pytest.fixture(scope="module")
def synthetic(tool, tmp_path_factory):
    """80 images, equally likely r/c/f categories, 30 % of the images with 384 results (over
    the cap), scores with 2 decimals (ties), 1 % zero-width boxes, results interleaved."""
    gt, results = tool.make_synthetic_lvis(80, 320, seed=3, masks=True, over_cap_fraction=0.3, score_decimals=2,
                                           degenerate_fraction=0.01, shuffle_results=True,
                                           frequency_weights={"r": 1.0, "c": 1.0, "f": 1.0})
    path = tmp_path_factory.mktemp("synthetic") / "gt.json"
    with open(path, "w") as f:
        json.dump(gt, f)
    return str(path), gt, results


def test_synthetic_set_exercises_the_rules(synthetic):
    _, gt, results = synthetic
    freq = {c["id"]: c["frequency"] for c in gt["categories"]}
    assert {freq[a["category_id"]] for a in gt["annotations"]} == {"r", "c", "f"}
    assert sum(len(i["neg_category_ids"]) for i in gt["images"]) > 0
    assert sum(len(i["not_exhaustive_category_ids"]) for i in gt["images"]) > 0
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r["score"])
    over = [sorted(s, reverse=True) for s in by_image.values() if len(s) > 300]
    assert over and any(s[299] == s[300] for s in over)  # a tie right at the cap
    assert any(r["bbox"][2] == 0 for r in results)
    ids = [r["image_id"] for r in results[:50]]
    assert len(set(ids)) > 10  # interleaved images


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_synthetic_same_as_lvis_api(synthetic, iou_type):
    path, _, results = synthetic
    ref, fast = _both(path, results, iou_type)
    _assert_same(ref, fast)
    assert all(ref[k] > 0 for k in LVIS_METRICS)


def test_limit_dets_per_image_is_lvis_results_rule(sample):
    json_path, _ = sample
    rng = np.random.RandomState(0)
    image_ids = rng.choice([1, 2, 3, 7], size=900)
    scores = rng.randint(0, 20, size=900) / 10.0  # many ties
    anns = [{"image_id": int(i), "score": float(s), "k": k, "bbox": [0.0, 0.0, 1.0, 1.0], "category_id": 1}
            for k, (i, s) in enumerate(zip(image_ids, scores))]
    for cap in (300, 100, 5, -1):
        want = [a["k"] for a in LVISResults(LVIS(json_path), copy.deepcopy(anns), max_dets=cap).dataset["annotations"]]
        assert limit_dets_per_image(image_ids, scores, cap).tolist() == want


def test_no_results_and_bad_inputs(sample):
    json_path, data = sample
    nan = evaluate_predictions_on_lvis_fast(LVIS(json_path), [], "bbox")
    assert list(nan) == list(LVIS_METRICS) and all(math.isnan(v) for v in nan.values())
    with pytest.raises(ValueError, match="not in the dataset"):
        evaluate_predictions_on_lvis_fast(data, [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5],
                                                  "score": 0.5}], "bbox")
    coco_like = copy.deepcopy(data)
    for c in coco_like["categories"]:
        del c["frequency"]
    with pytest.raises(LVISFormatError, match="frequency"):
        evaluate_predictions_on_lvis_fast(coco_like, _sample_results(data)[:5], "bbox")


# ---- the evaluator ----------------------------------------------------------------------

DATASET = "regionspot_sample_fast_lvis"


@pytest.fixture(scope="module")
def registered(sample, tmp_path_factory):
    json_path, data = sample
    DatasetCatalog.register(DATASET, lambda: [])
    MetadataCatalog.get(DATASET).set(json_file=json_path, evaluator_type="lvis", **sample_vocabulary_metadata())
    coco_path = tmp_path_factory.mktemp("coco") / "coco.json"
    coco = copy.deepcopy(data)
    for c in coco["categories"]:
        c.pop("frequency")
    for i in coco["images"]:
        i.pop("neg_category_ids")
        i.pop("not_exhaustive_category_ids")
    with open(coco_path, "w") as f:
        json.dump(coco, f)
    DatasetCatalog.register(DATASET + "_coco", lambda: [])
    MetadataCatalog.get(DATASET + "_coco").set(json_file=str(coco_path), evaluator_type="lvis",
                                               **sample_vocabulary_metadata())
    yield DATASET
    for name in (DATASET, DATASET + "_coco"):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _model_outputs(data, seed=0):
    """(inputs, outputs) for the evaluator's process(): per image ~45 detections over the
    sample's own vocabulary (contiguous ids), boxes and masks."""
    to_contiguous = sample_vocabulary_metadata()["thing_dataset_id_to_contiguous_id"]
    rng = np.random.RandomState(seed)
    by_image = {}
    for r in _sample_results(data, seed=seed, per_image=45):
        if r["category_id"] in to_contiguous or rng.rand() < 0.2:
            by_image.setdefault(r["image_id"], []).append(r)
    inputs, outputs = [], []
    for img in data["images"]:
        rs = by_image.get(img["id"], [])
        H, W = img["height"], img["width"]
        inst = Instances((H, W))
        xywh = torch.tensor([r["bbox"] for r in rs], dtype=torch.float32).reshape(-1, 4)
        inst.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
        inst.scores = torch.tensor([r["score"] for r in rs], dtype=torch.float32)
        inst.pred_classes = torch.tensor([to_contiguous.get(r["category_id"], int(rng.randint(len(to_contiguous))))
                                          for r in rs], dtype=torch.int64)
        masks = torch.zeros((len(rs), H, W), dtype=torch.bool)
        for k, r in enumerate(rs):
            import pycocotools.mask as mask_util

            masks[k] = torch.from_numpy(mask_util.decode(r["segmentation"]).astype(bool))
        inst.pred_masks = masks
        inputs.append({"image_id": img["id"], "height": H, "width": W})
        outputs.append({"instances": inst})
    return inputs, outputs


@pytest.mark.parametrize("max_dets", [300, 20])
def test_evaluator_backends_give_the_same_results(sample, registered, max_dets, caplog):
    _, data = sample
    inputs, outputs = _model_outputs(data)
    got = {}
    for backend in ("lvis", "faster_coco_eval"):
        evaluator = RegionSpotLVISEvaluator(registered, ("bbox", "segm"), distributed=False,
                                            max_dets_per_image=max_dets, backend=backend)
        evaluator.reset()
        evaluator.process(inputs, outputs)
        with caplog.at_level(logging.INFO):
            got[backend] = evaluator.evaluate()
        assert f"backend (TEST.EVALUATOR_BACKEND): {backend}" in caplog.text
    ref, fast = got["lvis"], got["faster_coco_eval"]
    assert list(ref) == list(fast) == ["bbox", "segm"]
    for task in ref:
        _assert_same(ref[task], fast[task])
        assert ref[task]["AP"] > 0
    assert "Evaluation results for segm (backend: faster_coco_eval)" in caplog.text


def test_backend_errors(registered):
    with pytest.raises(ValueError, match="TEST.EVALUATOR_BACKEND must be one of"):
        RegionSpotLVISEvaluator(registered, ("bbox",), distributed=False, backend="pycocotools")
    with pytest.raises(LVISFormatError, match="not LVIS-format.*frequency"):
        RegionSpotLVISEvaluator(registered + "_coco", ("bbox",), distributed=False, backend="faster_coco_eval")
    RegionSpotLVISEvaluator(registered + "_coco", ("bbox",), distributed=False)  # the LVIS API path accepts it
    with pytest.raises(LVISFormatError, match="needs an LVIS-format dataset"):
        RegionSpotCOCOEvaluator(registered + "_coco", ("bbox",), distributed=False, backend="faster_coco_eval")


def test_config_key(registered):
    from detectron2.config import get_cfg

    from regionspot.config import ConfigError, add_regionspot_config, check_config
    from regionspot.engine.trainer import RegionSpotTrainer

    cfg = get_cfg()
    add_regionspot_config(cfg)
    assert cfg.TEST.EVALUATOR_BACKEND == "lvis"
    check_config(cfg)
    cfg.TEST.EVALUATOR_BACKEND = "faster_coco_eval"
    check_config(cfg)
    cfg.MODEL.MASK_ON = True
    evaluator = RegionSpotTrainer.build_evaluator(cfg, registered, output_folder=None)
    assert isinstance(evaluator, RegionSpotLVISEvaluator) and evaluator.backend == "faster_coco_eval"
    assert evaluator._tasks == ("bbox", "segm") and evaluator._max_dets_per_image == 300
    cfg.TEST.EVALUATOR_BACKEND = "fast"
    with pytest.raises(ConfigError, match="TEST.EVALUATOR_BACKEND must be one of .*'fast'"):
        check_config(cfg)


# ---- the benchmark tool -----------------------------------------------------------------

def test_benchmark_quick_writes_a_consistent_json(tmp_path):
    """Through tools/benchmark.py eval, as the README runs it."""
    benchmark = load_tool("benchmark")
    path = tmp_path / "eval.json"
    assert benchmark.main(["eval", "--quick", "--images", "150", "--segm-images", "40",
                           "--output", str(path)]) == 0
    with open(path) as f:
        report = json.load(f)
    assert report["schema"] == "regionspot-eval-benchmark/1" and report["agree"] is True
    assert report["settings"]["images"] == 150 and report["settings"]["segm_images"] == 40
    assert list(report["tasks"]) == ["bbox", "segm"]
    for _task, t in report["tasks"].items():
        assert t["set"]["categories"] == 1203 and t["set"]["images_over_300_results"] >= 0
        fast, ref = t["faster_coco_eval"], t["lvis"]
        assert fast["seconds"] > 0 and ref["seconds"] > 0
        assert t["speedup"] == pytest.approx(ref["seconds"] / fast["seconds"])
        assert set(fast["metrics"]) == set(ref["metrics"]) == set(LVIS_METRICS)
        assert t["max_abs_diff"] == pytest.approx(max(abs(fast["metrics"][k] - ref["metrics"][k])
                                                      for k in LVIS_METRICS))
        assert t["max_abs_diff"] <= TOL
    assert report["max_abs_diff"] == max(t["max_abs_diff"] for t in report["tasks"].values())
