"""regionspot-benchmark (tools/benchmark.py) stages, e2e, pairs and train: the quick CPU runs write
complete, consistent JSON reports; the subcommands import no subcommand and not the dispatcher."""

import json
import math
import os

import pytest
import torch

from conftest import load_tool
from regionspot.modeling.profiling import STAGE_LABELS


@pytest.fixture(scope="module")
def tool():
    return load_tool("benchmark")


@pytest.fixture(scope="module")
def stages():
    from regionspot.tools.benchmarks import stages

    return stages


@pytest.fixture(scope="module")
def report(tool, tmp_path_factory):
    path = tmp_path_factory.mktemp("benchmark") / "b.json"
    threads = torch.get_num_threads()
    # One thread: timings stay sane when other jobs share the machine's cores.
    assert tool.main(["stages", "--quick", "--device", "cpu", "--threads", "1", "--output", str(path)]) == 0
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
    assert s["precision"] == "float32" and s["encoder_dtype"] == "float32" and s["sam_attention"] == "sdpa"
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


def test_random_boxes_are_valid(stages):
    boxes = stages.random_boxes(500, 480, 640, torch.Generator().manual_seed(0))
    assert boxes.shape == (500, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 640).all() and (boxes[:, 3] <= 480).all()
    assert (boxes[:, 2] - boxes[:, 0] >= 8 - 1e-4).all() and (boxes[:, 3] - boxes[:, 1] >= 8 - 1e-4).all()


def test_settings_resolution(tool, stages):
    parser = tool.build_parser()

    def resolve(*argv):
        args = parser.parse_args(["stages", *argv])
        return stages.resolve_settings(args, args.subparser)

    args = resolve("--device", "cpu")
    assert args.models == ["small", "bb", "bl"] and args.num_boxes == [1, 10, 100]
    assert args.image_size == (800, 1066) and args.text_classes == 1
    assert stages.repeats_for("small", args) == (1, 5) and stages.repeats_for("bl", args) == (0, 1)
    assert args.output.endswith(os.path.join("output", "benchmark", "benchmark_cpu.json"))
    args = resolve("--device", "cpu", "--quick", "--repeats", "3")
    assert args.models == ["small"] and stages.repeats_for("small", args) == (1, 3)
    for bad in (["--models", "small,nope"], ["--num-boxes", "0"], ["--image-size", "800"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            resolve("--device", "cpu", *bad)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            resolve("--device", "cuda")


def test_one_command_and_no_import_cycle():
    """Every benchmark is a subcommand of the one dispatcher; a subcommand module imports neither
    the dispatcher nor another subcommand (only the shared timing/report modules and helpers)."""
    import ast

    from regionspot.tools import benchmark

    assert list(benchmark.SUBCOMMANDS) == ["stages", "e2e", "eval", "text", "train", "pairs", "app", "onnx"]
    modules = set(benchmark.SUBCOMMANDS.values())
    folder = os.path.join(os.path.dirname(benchmark.__file__), "benchmarks")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        assert "regionspot.tools.benchmark" not in imported, name
        others = {f"regionspot.tools.benchmarks.{m}" for m in modules if m != name[:-3]}
        assert not imported & others, (name, imported & others)


def test_a_bad_subcommand_option_is_one_error_line(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["e2e", "--device", "cpu", "--models", "small,bb"])
    assert exit_info.value.code == 2
    assert "benchmark.py e2e: error: e2e measures one model per run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--quick"])  # a subcommand is required
    assert exit_info.value.code == 2


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


@pytest.fixture(scope="module")
def e2e_report(tool, tmp_path_factory):
    """The end-to-end mode on the small model: plain vs fast (batched, SDPA, resizes in the
    loader) vs bfloat16, through the loader, the model and the LVIS evaluator."""
    from regionspot.tools.benchmarks import e2e as benchmark_e2e

    folder = tmp_path_factory.mktemp("e2e")
    path = folder / "e2e.json"
    argv = ["e2e", "--quick", "--device", "cpu", "--threads", "1", "--runs", "plain,fast,bf16",
            "--workers", "1", "--data-dir", str(folder / "data"), "--output", str(path), "--quiet"]
    build_model = benchmark_e2e.build_model

    def keep(*args, **kwargs):  # the models the runs build, for test_end_to_end_replaces_no_model_method
        model = build_model(*args, **kwargs)
        BUILT.append((model, _instance_callables(model)))
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchmark_e2e, "build_model", keep)
        assert tool.main(argv) == 0
    with open(path) as f:
        return json.load(f)


BUILT = []  # (model, its instance-level callables right after it was built), per end-to-end run


def _instance_callables(module):
    """The callables stored on the instances of ``module`` and its submodules (a replaced method
    would be one): ``{"<submodule path>.<name>": id(value)}``."""
    return {f"{prefix}.{key}": id(value) for prefix, sub in module.named_modules() for key, value in vars(sub).items()
            if callable(value) and not isinstance(value, torch.nn.Module)}


def test_end_to_end_replaces_no_model_method(e2e_report):
    """The stage figures and the recorded tokens come from profiler labels and hooks: no
    attribute of the model was replaced, and the hooks were removed after each run."""
    assert len(BUILT) == 3
    for model, callables in BUILT:
        assert _instance_callables(model) == callables  # nothing set or replaced during the run
        for sub in (model, model.head):  # what the benchmark times and records: its class's methods
            assert [k for k, v in vars(sub).items() if callable(v) and hasattr(type(sub), k)] == []
        assert not model._forward_pre_hooks and not model.head._forward_hooks
        assert "always_decode_masks" not in vars(model) or model.always_decode_masks is False


def test_end_to_end_fast_path_gives_the_plain_results(e2e_report):
    s = e2e_report["settings"]
    assert e2e_report["schema"] == "regionspot-benchmark-e2e/1"
    assert s["model"] == "small" and s["images"] == 4 and s["num_classes"] == 1203 and s["batch_size"] == 2
    plain, fast, bf16 = (e2e_report["runs"][k] for k in ("plain", "fast", "bf16"))
    assert plain["settings"] == dict(batch=1, precision="float32", attention="official", compile=False,
                                     worker_resize=False)
    assert fast["settings"] == dict(batch=2, precision="float32", attention="sdpa", compile=False,
                                    worker_resize=True)
    for run in (plain, fast, bf16):
        assert run["images"] == 4 and _positive_finite(run["images_per_second"])
        assert run["images_per_second"] == pytest.approx(4 / run["loop_s"])
        assert set(run["stages_s"]) == {"data_wait", "sam_image_encoder", "clip_semantic", "proposals",
                                        "sam_prompt_decoder", "head", "postprocess", "evaluator_process"}
        # the model's stages come from the profiled pass, data wait and the evaluator from the timed one
        model_stages = {k: v for k, v in run["stages_s"].items() if k not in ("data_wait", "evaluator_process")}
        assert sum(model_stages.values()) <= run["profiled_pass_s"] * 1.05
        assert run["stages_s"]["data_wait"] + run["stages_s"]["evaluator_process"] <= run["loop_s"] * 1.05
        # every stage the model labels (regionspot.modeling.meta_arch.STAGE_LABELS) ran and was timed
        assert all(_positive_finite(run["stages_s"][k]) for k in STAGE_LABELS), run["stages_s"]
        assert all("profiler" in run["stages_source"][k] for k in STAGE_LABELS)
        assert set(run["results"]["bbox"]) >= {"AP", "APr", "APc", "APf"}
    # the exact fast path: float rounding only, the same labels and the same AP
    d = fast["deviation"]
    assert d["against"] == "plain" and d["boxes"] == 40
    assert d["tokens_max_abs"] < 1e-4 * d["tokens_max_abs_reference"]
    assert d["logits_max_abs"] < 1e-4 * d["logits_max_abs_reference"]
    assert d["top1_changed"] == 0 and d["ap_max_abs"] < 1e-4
    assert fast["speedup"] == pytest.approx(fast["images_per_second"] / plain["images_per_second"])
    # bfloat16 encoders do change the numbers (measured, reported, off by default)
    assert bf16["deviation"]["tokens_max_abs"] > 1e-4


def test_end_to_end_workload_is_lvis_like(e2e_report):
    """The synthetic workload: LVIS format (1203 categories with LVIS v1's r/c/f split), the
    requested boxes per image, JPEG photos of COCO sizes."""
    from regionspot.data.datasets.user import read_dataset_json
    from regionspot.tools.benchmarks.e2e_workload import PHOTO_SIZES

    json_path = e2e_report["settings"]["data_json"]
    data = read_dataset_json(json_path)
    assert len(data["images"]) == 4 and len(data["annotations"]) == 40 and len(data["categories"]) == 1203
    freq = [c["frequency"] for c in data["categories"]]
    assert (freq.count("r"), freq.count("c"), freq.count("f")) == (337, 461, 405)
    for img in data["images"]:
        assert (img["height"], img["width"]) in PHOTO_SIZES
        path = os.path.join(os.path.dirname(json_path), "images", img["file_name"])
        with open(path, "rb") as f:
            assert f.read(2) == b"\xff\xd8"  # JPEG
    for ann in data["annotations"]:
        img = data["images"][ann["image_id"] - 1]
        x, y, w, h = ann["bbox"]
        assert w >= 8 and h >= 8 and x >= 0 and y >= 0
        assert x + w <= img["width"] + 0.01 and y + h <= img["height"] + 0.01


def test_the_pairs_table_counts_each_encoder_and_prices_each_pair(tmp_path):
    """benchmark.py pairs (subprocess): per-model FLOPs and time, a FLOP-bound GPU-hours row per
    pair, JSON + Markdown written; an unknown model name is one error line, exit 2."""
    import json
    import subprocess
    import sys

    out = tmp_path / "pairs.json"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(repo, "tools", "benchmark.py"), "pairs", "--localizers", "SAM 2.1 Hiera-T",
           "--vl-models", "OpenAI CLIP ViT-B/16", "--repeats", "1", "--threads", "1", "--sustained-tflops", "100",
           "--output", str(out)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    hiera, clip_b = report["models"]["SAM 2.1 Hiera-T"], report["models"]["OpenAI CLIP ViT-B/16"]
    assert hiera["input_px"] == 1024 and clip_b["input_px"] == 224
    assert hiera["gflops"] > clip_b["gflops"] > 10  # a 1024-px Hiera costs more than a 224-px ViT-B/16
    (pair,) = report["pairs"]
    expected = report["settings"]["schedule_images"] * clip_b["gflops"] * 1e9 / 100e12 / 3600
    assert abs(pair["train_gpu_hours"] - expected) < 1e-9
    assert "| SAM 2.1 Hiera-T | OpenAI CLIP ViT-B/16 |" in (tmp_path / "pairs.md").read_text()
    bad = subprocess.run(cmd[:4] + ["SAM 9"], cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown ['SAM 9']" in bad.stderr and "Traceback" not in bad.stderr


def test_pairs_flops_include_fused_attention():
    """The FLOP count sees attention that runs in fused kernels elsewhere (SDPA's flash path,
    nn.MultiheadAttention's batch-first fast path): otherwise Hiera and OpenCLIP are undercounted."""
    import torch.nn.functional as F

    from regionspot.tools.benchmarks.pairs import measure

    q = torch.randn(1, 4, 64, 16)
    assert measure(lambda: F.scaled_dot_product_attention(q, q, q), torch.device("cpu"), 1)["gflops"] * 1e9 == \
        2 * 2 * 4 * 64 * 64 * 16  # QK^T and AV, 2 FLOPs per multiply-add
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(1, 10, 32)
    with torch.no_grad():
        counted = measure(lambda: mha(x, x, x, need_weights=False), torch.device("cpu"), 1)["gflops"] * 1e9
    projections = 2 * 10 * 32 * 32 * 4  # q, k, v and out projections
    assert counted == projections + 2 * 2 * 10 * 10 * 32


def test_the_training_and_stage_benchmarks_run_every_pair_family(tmp_path):
    """benchmark.py train and stages (subprocesses) on the small variants of the other pairs
    (SAM-HQ, SAM 2.1, OpenCLIP): the same commands as for the released pair, with each pair's head."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    variants = "small_samhq,small_sam2,small_openclip"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = subprocess.run([sys.executable, os.path.join(repo, "tools", "benchmark.py"), "train", "--models", variants,
                            "--iters", "1", "--warmup", "0", "--image-size", "160x200", "--device", "cpu",
                            "--output", str(tmp_path / "train.json")],
                           cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    models = json.loads((tmp_path / "train.json").read_text())["models"]
    assert [models[v]["sam"] for v in variants.split(",")] == ["sam_hq:tiny", "sam2:tiny", "tiny"]
    assert all(m["modes"][mode]["images_per_second"] > 0 for m in models.values() for mode in ("online", "cached"))
    stages = subprocess.run([sys.executable, os.path.join(repo, "tools", "benchmark.py"), "stages",
                             "--models", "small_sam2", "--num-boxes", "2", "--repeats", "1", "--warmup", "0",
                             "--image-size", "160x200",
                             "--original-size", "160x200", "--mask-image-size", "160x200", "--text-classes", "4",
                             "--device", "cpu", "--output", str(tmp_path / "stages.json")],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert stages.returncode == 0, stages.stdout[-2000:] + stages.stderr[-2000:]
    assert "small_sam2" in stages.stdout and (tmp_path / "stages.json").is_file()
