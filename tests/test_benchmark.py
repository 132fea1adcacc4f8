"""tools/benchmark.py: the quick CPU run writes a complete, consistent JSON report."""

import importlib.util
import json
import math
import os

import pytest
import torch

from conftest import REPO


def _load_tool():
    spec = importlib.util.spec_from_file_location("regionspot_benchmark_tool", os.path.join(REPO, "tools", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


@pytest.fixture(scope="module")
def report(tool, tmp_path_factory):
    path = tmp_path_factory.mktemp("benchmark") / "b.json"
    threads = torch.get_num_threads()
    # One thread: timings stay sane when other jobs share the machine's cores.
    assert tool.main(["--quick", "--device", "cpu", "--threads", "1", "--output", str(path)]) == 0
    assert torch.get_num_threads() == threads  # main() leaves the process's settings as found
    with open(path) as f:
        return json.load(f)


def _positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_report_header(report):
    assert report["schema"] == "regionspot-benchmark/1"
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["torch_version"] == torch.__version__
    assert report["threads"] == 1 and report["date"]
    s = report["settings"]
    assert s["image_size"] == [480, 640] and s["original_size"] == [480, 640]
    assert s["num_boxes"] == [1, 10] and s["models"] == ["small"]
    assert s["repeats"] == 2 and s["warmup"] == 1 and s["quick"] is True
    assert s["amp_requested"] is False and s["amp_effective"] is False
    assert s["mask_on"] is True and s["num_classes"] == 1203 and s["test_topk"] == 900
    assert list(report["configs"]) == ["small"]


def test_config_figures(report):
    res = report["configs"]["small"]
    assert (res["sam"], res["clip"], res["clip_input_size"]) == ("tiny", "tiny", 224)
    assert res["warmup"] == 1 and res["repeats"] == 2

    p = res["params"]
    assert all(isinstance(v, int) and v > 0 for v in p.values())
    assert p["head_trainable"] == p["head"]
    assert p["sam_total"] == p["sam_image_encoder"] + p["sam_prompt_encoder"] + p["sam_mask_decoder"]
    assert p["frozen_total"] == p["sam_total"] + p["clip_total"]

    t = res["text_embeddings"]
    assert t["num_classes"] == 1203 and t["num_templates"] == 81
    assert t["classes_encoded"] == 1 and t["estimated"] is True  # CPU default: 1 class, extrapolated
    assert _positive_finite(t["ms"]) and t["ms_all_classes"] == pytest.approx(t["ms"] * 1203)

    for stage in ("sam_image_encoder", "clip_semantic"):
        fig = res["image_stages_ms"][stage]
        assert len(fig["samples"]) == 2 and all(_positive_finite(v) for v in fig["samples"])
        assert fig["min"] <= fig["median"] <= fig["max"]

    assert set(res["num_boxes"]) == {"1", "10"}
    for n, row in res["num_boxes"].items():
        stages = ("sam_image_encoder", "clip_semantic", "sam_mask_decoder", "head", "postprocess")
        for key in [f"{s}_ms" for s in stages] + ["sum_of_stages_ms", "end_to_end_ms", "images_per_second"]:
            assert _positive_finite(row[key]), (n, key, row[key])
        assert row["sum_of_stages_ms"] == pytest.approx(sum(row[f"{s}_ms"] for s in stages))
        assert row["images_per_second"] == pytest.approx(1000.0 / row["end_to_end_ms"], rel=1e-6)
        assert all(len(v) == 2 for v in row["samples_ms"].values())
        assert row["end_to_end_ms"] == pytest.approx(sorted(row["samples_ms"]["end_to_end"])[0] / 2
                                                     + sorted(row["samples_ms"]["end_to_end"])[1] / 2)
        assert row["num_detections"] == min(900, int(n) * 1203)
        assert row["end_to_end_peak_bytes"] is None  # no per-phase figure on the CPU

    mem = res["memory"]
    assert mem["kind"] == "cpu_process_peak_rss" and mem["peak_bytes"] > 10 * 2 ** 20


def test_random_boxes_are_valid(tool):
    boxes = tool.random_boxes(500, 480, 640, torch.Generator().manual_seed(0))
    assert boxes.shape == (500, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 640).all() and (boxes[:, 3] <= 480).all()
    assert (boxes[:, 2] - boxes[:, 0] >= 8 - 1e-4).all() and (boxes[:, 3] - boxes[:, 1] >= 8 - 1e-4).all()


def test_settings_resolution(tool):
    parser = tool.build_parser()
    args = tool.resolve_settings(parser.parse_args(["--device", "cpu"]), parser)
    assert args.models == ["small", "bb", "bl"] and args.num_boxes == [1, 10, 100]
    assert args.image_size == (800, 1066) and args.text_classes == 1
    assert tool.repeats_for("small", args) == (1, 5) and tool.repeats_for("bl", args) == (0, 1)
    assert args.output.endswith(os.path.join("output", "benchmark", "benchmark_cpu.json"))
    args = tool.resolve_settings(parser.parse_args(["--device", "cpu", "--quick", "--repeats", "3"]), parser)
    assert args.models == ["small"] and tool.repeats_for("small", args) == (1, 3)
    for bad in (["--models", "small,nope"], ["--num-boxes", "0"], ["--image-size", "800"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            tool.resolve_settings(parser.parse_args(["--device", "cpu"] + bad), parser)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            tool.resolve_settings(parser.parse_args(["--device", "cuda"]), parser)


def test_mask_output_memory_does_not_grow_with_pairs(report):
    """900 (box, class) pairs on 10 boxes hold 10 masks, not 900."""
    out = report["configs"]["small"]["mask_output"]
    h, w = out["image_size"]
    assert (h, w) == (480, 640) and out["pairs"] == 900  # --quick; 800x1333 by default
    few, many = out["cases"]
    assert few["num_boxes"] == 10 and few["num_detections"] == 900
    assert few["distinct_masks"] <= 10 and few["mask_bytes"] == few["distinct_masks"] * h * w
    assert few["per_pair_layout_bytes"] == 900 * h * w and few["mask_bytes"] * 50 < few["per_pair_layout_bytes"]
    assert many["num_boxes"] == 900 and many["distinct_masks"] > few["distinct_masks"]
    for case in (few, many):
        assert _positive_finite(case["postprocess_ms"]) and _positive_finite(case["rle_encode_ms"])
        assert isinstance(case["peak_increase_bytes"], int)
    assert report["settings"]["mask_image_size"] == [480, 640] and report["settings"]["mask_pairs"] == 900
