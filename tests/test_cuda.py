"""The CUDA paths (marker ``cuda``; skipped where torch sees no CUDA device): float16 and bfloat16
encoders against float32, batch 16 against batch 1, SDPA attention against segment_anything's
own forward, AMP training steps (bfloat16; float16 with the GradScaler), one-process NCCL DDP
training and its resume, every proposal source, no CPU tensor in the forward's hot loop, and
the peak GPU memory per image.

Run them with ``python -m pytest -m cuda tests`` (``tools/gpu/check.sh`` does, first thing
after the imports). The models have RANDOM weights at the real sizes (SAM ViT-B, CLIP
ViT-B/16), written in the official file formats where a config loads them: the deviations
measure the arithmetic of each path, not accuracy. Tolerances are those measured on the CPU
(docs/speed.md, "Deviation of each switch") with a margin; every measured deviation and the
peak memory are written to ``$REGIONSPOT_GPU_OUT/cuda_figures.json`` (default
``output/gpu_check/``) for docs/speed.md.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is "
                       "False); tools/gpu/check.sh runs these on a GPU"),
]

FIGURES = os.path.join(os.environ.get("REGIONSPOT_GPU_OUT", os.path.join(REPO, "output", "gpu_check")),
                       "cuda_figures.json")
TIMEOUT = 600  # hang guard of each subprocess


def record(key: str, value) -> None:
    """Merge ``{key: value}`` into the figures file (atomically)."""
    os.makedirs(os.path.dirname(FIGURES), exist_ok=True)
    try:
        with open(FIGURES) as f:
            figures = json.load(f)
    except (OSError, ValueError):
        figures = {}
    figures[key] = value
    figures["device"] = torch.cuda.get_device_name(0)
    figures["torch"] = torch.__version__
    tmp = FIGURES + ".tmp"
    with open(tmp, "w") as f:
        json.dump(figures, f, indent=1, sort_keys=True)
    os.replace(tmp, FIGURES)


def run(cmd, env=None, timeout=TIMEOUT):
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def bb_weights(tmp_path_factory):
    """SAM ViT-B (state-dict .pth) and CLIP ViT-B/16 (TorchScript archive) with random weights."""
    from regionspot.testing.random_backbones import write_random_clip, write_random_sam

    folder = tmp_path_factory.mktemp("bb_weights")
    return (write_random_sam(str(folder / "sam_vit_b_random.pth"), "vit_b", seed=0),
            write_random_clip(str(folder / "clip_vit_b16_random.pt"), "ViT-B/16", seed=0))


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    """DETECTRON2_DATASETS for the subprocesses (the bundled sample's photos are written there)."""
    return str(tmp_path_factory.mktemp("datasets"))


def bb_options(bb_weights, out):
    sam, clip = bb_weights
    return ["MODEL.DEVICE", "cuda", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip,
            "MODEL.REGIONSPOT.SAM_INPUT_SIZE", "1024", "MODEL.REGIONSPOT.CLIP_INPUT_SIZE", "224",
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", os.path.join(out, "cache"), "OUTPUT_DIR", out]


# ----------------------------------------------------------------------------- inference paths
def e2e(tmp_path, datasets_dir, *argv):
    """``tools/benchmark.py e2e`` on CUDA (BB, random weights); its JSON report."""
    out = tmp_path / "e2e.json"
    run([sys.executable, "tools/benchmark.py", "e2e", "--device", "cuda", "--models", "bb", "--no-compile",
         "--workers", "4", "--quiet", "--output", str(out), "--data-dir", str(tmp_path / "data"), *argv],
        env={"DETECTRON2_DATASETS": datasets_dir})
    with open(out) as f:
        return json.load(f)


def test_fast_paths_on_cuda_against_float32_on_the_sample(tmp_path, datasets_dir):
    """On the bundled sample (8 photos, 62 boxes): the exact fast path (batch, SDPA, worker
    resizes) equals the float32 plain path; float16 and bfloat16 encoders stay within the CPU's
    measured deviations (tokens, logits, top-1 changes, AP)."""
    report = e2e(tmp_path, datasets_dir, "--dataset", "regionspot_sample", "--batch-size", "8",
                 "--runs", "plain,fast,fast_fp16,fast_bf16")
    runs = report["runs"]
    record("sample_deviations", {k: runs[k]["deviation"] for k in ("fast", "fast_fp16", "fast_bf16")})
    record("sample_peak_memory_bytes_per_image", {k: r["peak_memory_bytes"] / r["settings"]["batch"]
                                                 for k, r in runs.items()})
    fast, fp16, bf16 = runs["fast"]["deviation"], runs["fast_fp16"]["deviation"], runs["fast_bf16"]["deviation"]
    boxes = fast["boxes"]
    assert boxes > 0
    # float32 on CUDA: float rounding only (cuDNN's TF32 convolutions included)
    assert fast["tokens_max_abs"] <= 1e-2 * fast["tokens_max_abs_reference"]
    assert fast["top1_changed"] <= 0.02 * boxes and fast["ap_max_abs"] <= 0.5
    # CPU (docs/speed.md): float16 tokens 6.2e-3, bfloat16 tokens 4.8e-2 to 5.8e-2, logits <= 0.12
    # (BB); float16 changes the tokens several times less than bfloat16.
    assert fp16["tokens_max_abs"] <= 2.5e-2 and fp16["logits_max_abs"] <= 0.25
    assert bf16["tokens_max_abs"] <= 0.15 and bf16["logits_max_abs"] <= 0.5
    assert fp16["tokens_max_abs"] < bf16["tokens_max_abs"]
    for d in (fp16, bf16):
        assert d["top1_changed"] <= 0.1 * boxes and d["ap_max_abs"] <= 5.0


def test_batch_16_equals_batch_1(tmp_path, datasets_dir):
    """16 synthetic LVIS-like images: one batch of 16 (SAM's and CLIP's encoders on the whole
    batch, worker resizes) against one image at a time, float32, same attention; the peak GPU
    memory per image of both is recorded."""
    report = e2e(tmp_path, datasets_dir, "--images", "16", "--batch-size", "16", "--runs", "plain,batched")
    plain, batched = report["runs"]["plain"], report["runs"]["batched"]
    assert batched["settings"]["batch"] == 16
    d = batched["deviation"]
    record("batch16_deviation", d)
    record("peak_memory_bytes_per_image", {"batch1_official_fp32": plain["peak_memory_bytes"],
                                           "batch16_official_fp32": batched["peak_memory_bytes"] / 16})
    assert d["boxes"] == 160
    assert d["tokens_max_abs"] <= 1e-2 * d["tokens_max_abs_reference"]
    assert d["logits_max_abs"] <= 1e-2 * d["logits_max_abs_reference"]
    assert d["top1_changed"] <= 2 and d["ap_max_abs"] <= 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sdpa_encoder_equals_the_official_forward_on_cuda(dtype):
    """SAM ViT-B's image encoder (random, non-zero relative-position tables), batch 2 at 1024 px:
    SDPA attention (CUDA kernels) against segment_anything's forward, in the same dtype."""
    from regionspot.modeling.fast_attention import sam_attention_kind, set_sam_attention
    from regionspot.testing.random_backbones import random_sam

    encoder = random_sam("vit_b", seed=3).image_encoder.to("cuda", dtype).eval()
    x = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
    with torch.no_grad():
        official = encoder(x).float()
        set_sam_attention(encoder, "sdpa")
        assert sam_attention_kind(encoder) == "sdpa"
        fast = encoder(x).float()
    rel = float((fast - official).abs().max() / official.abs().max())
    record(f"sdpa_vs_official_{str(dtype).split('.')[-1]}", {"max_abs_over_max_ref": rel})
    assert torch.isfinite(fast).all()
    assert rel <= {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 0.1}[dtype]


# ----------------------------------------------------------------------------- training
def train(tmp_path, bb_weights, datasets_dir, name, *extra, ddp=False, resume=False, out=None):
    out = out or str(tmp_path / name)
    steps = os.path.join(out, f"steps_{'resume' if resume else 'first'}.json")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "tests/cuda_training.py", "--out", steps, *(["--ddp"] if ddp else []), "--",
           "--config-file", "configs/regionspot_sample_cpu.yaml", *(["--resume"] if resume else []),
           *bb_options(bb_weights, out), "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "8",
           "SOLVER.WARMUP_ITERS", "2", "DATALOADER.NUM_WORKERS", "2", *extra]
    run(cmd, env={"DETECTRON2_DATASETS": datasets_dir})
    with open(steps) as f:
        return out, json.load(f)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_amp_training_step_decreases_the_loss_with_finite_gradients(tmp_path, bb_weights, datasets_dir, precision):
    """20 iterations on the sample under autocast (float16: with the GradScaler): the loss of
    the last 5 steps is below that of the first 5, and the head's gradients are finite (float16:
    after the scaler's first skipped steps, if any)."""
    _, result = train(tmp_path, bb_weights, datasets_dir, precision, "SOLVER.MAX_ITER", "20",
                      "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", precision)
    steps = result["steps"]
    record(f"amp_{precision}_losses", [s["loss"] for s in steps])
    assert len(steps) == 20 and all(s["head_device"].startswith("cuda") for s in steps)
    losses = [s["loss"] for s in steps]
    assert all(isinstance(v, float) for v in losses), losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    finite = [s["grads_finite"] for s in steps]
    if precision == "float16":
        assert steps[0]["scale"] is not None and sum(finite) >= 15 and all(finite[-5:]), steps
    else:
        assert all(finite), steps


def test_one_process_nccl_ddp_trains_20_iterations_and_resumes(tmp_path, bb_weights, datasets_dir):
    out, first = train(tmp_path, bb_weights, datasets_dir, "ddp", "SOLVER.MAX_ITER", "20", "SOLVER.CHECKPOINT_PERIOD",
                       "10", ddp=True)
    assert [s["iter"] for s in first["steps"]] == list(range(20))
    assert {s["wrapper"] for s in first["steps"]} == {"DistributedDataParallel"}
    assert all(s["grads_finite"] for s in first["steps"])
    saved = torch.load(os.path.join(out, "model_final.pth"), weights_only=True, map_location="cpu")
    assert saved["iteration"] == 19 and all(k.startswith("head.") for k in saved["model"])
    _, second = train(tmp_path, bb_weights, datasets_dir, "ddp", "SOLVER.MAX_ITER", "25", "SOLVER.CHECKPOINT_PERIOD",
                      "10", ddp=True, resume=True, out=out)
    assert second["start_iter"] == 20 and [s["iter"] for s in second["steps"]] == list(range(20, 25))
    resumed = torch.load(os.path.join(out, "model_final.pth"), weights_only=True, map_location="cpu")
    assert resumed["iteration"] == 24
    assert any(not torch.equal(saved["model"][k], resumed["model"][k]) for k in saved["model"])


# ----------------------------------------------------------------------------- proposal sources
def test_every_proposal_source_runs_on_cuda(tmp_path, bb_weights, datasets_dir):
    """``train_net.py --eval-only`` on the sample with ground-truth boxes, a detector file, a
    random RPN and SAM's automatic masks, all on CUDA."""
    from regionspot.config import load_config
    from regionspot.data.proposal_files import ProposalSet, write_proposal_file
    from regionspot.testing.random_backbones import write_random_rpn

    rpn = write_random_rpn(str(tmp_path / "rpn.pth"), load_config(os.path.join(REPO, "configs", "eval_lvis_rpn.yaml")))
    boxes = {str(i): [[10.0, 10.0, 200.0, 150.0], [50.0, 40.0, 300.0, 260.0]] for i in range(1, 9)}
    scores = {k: [0.9, 0.6] for k in boxes}
    glip = write_proposal_file(ProposalSet("memory", "glip", boxes=boxes, scores=scores), str(tmp_path / "p.json"),
                               "glip")
    extra = {"gt": [], "file": ["MODEL.REGIONSPOT.PROPOSAL_FILE", glip], "rpn": ["MODEL.REGIONSPOT.RPN_WEIGHTS", rpn],
             "sam_auto": ["MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", "16"]}
    configs = {"gt": "eval_lvis_gt", "file": "eval_lvis_glip", "rpn": "eval_lvis_rpn", "sam_auto": "eval_lvis_sam_auto"}
    counts = {}
    for source, opts in extra.items():
        out = str(tmp_path / source)
        run([sys.executable, "train_net.py", "--config-file", f"configs/{configs[source]}.yaml", "--eval-only",
             "--untrained-head", *bb_options(bb_weights, out), "MODEL.WEIGHTS", "",
             "DATASETS.TEST", "('regionspot_sample',)", "MODEL.REGIONSPOT.VOCABULARY", "dataset", *opts],
            env={"DETECTRON2_DATASETS": datasets_dir})
        with open(os.path.join(out, "inference", "regionspot_sample", "metrics.json")) as f:
            metrics = json.load(f)
        assert metrics["proposals"] == source and "AP" in metrics["results"]["bbox"], source
        with open(os.path.join(out, "inference", "regionspot_sample", "lvis_instances_results.json")) as f:
            counts[source] = len(json.load(f))
        assert counts[source] > 0, source
    record("proposal_sources_detections", counts)


# ----------------------------------------------------------------------------- device placement
def test_no_host_device_copies_in_the_forward_beyond_the_inputs(tmp_path):
    """A warm forward of a batch of 4 (BB, float16 encoders, SDPA) under the profiler: the bytes
    copied host -> device are those of the inputs (images, boxes) plus a small allowance; every
    parameter and buffer of the model is on the GPU and the outputs are made there."""
    from torch.profiler import ProfilerActivity, profile

    from regionspot.testing.random_backbones import random_regionspot

    model = random_regionspot("bb", seed=0, encoder_precision="float16").to("cuda").eval()
    model.set_vocabulary([f"class {i}" for i in range(100)],
                         text_embeddings=torch.nn.functional.normalize(torch.randn(100, 512), dim=-1))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {b.device.type for b in model.buffers()} <= {"cuda"}
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(4):
        image = (torch.rand(3, 800, 1066, generator=g) * 255).to(torch.uint8)
        boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0], [100.0, 100.0, 900.0, 700.0]] * 5)
        from detectron2.structures import Boxes, Instances

        inst = Instances((800, 1066))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.zeros(len(boxes), dtype=torch.long)
        batch.append({"image": image, "height": 480, "width": 640, "instances": inst})
    input_bytes = sum(x["image"].numel() * x["image"].element_size() + x["instances"].gt_boxes.tensor.numel() * 4
                      for x in batch)
    with torch.no_grad():
        model(batch)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            outputs = model(batch)
            torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    # the copies' sizes: the "bytes" argument of each host-to-device memcpy in the profiler's
    # Chrome trace (FunctionEvent has no byte count)
    trace = str(tmp_path / "forward_trace.json")
    prof.export_chrome_trace(trace)
    with open(trace) as f:
        htod = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    sizes = [e.get("args", {}).get("bytes") for e in htod]
    image_bytes = sum(x["image"].numel() * x["image"].element_size() for x in batch)
    record("forward_host_to_device", {"copies": len(htod), "bytes": sum(b or 0 for b in sizes),
                                      "input_bytes": input_bytes,
                                      "peak_memory_bytes_per_image_fp16_batch4": peak / 4})
    assert all(o["instances"].scores.device.type == "cuda" for o in outputs)
    assert htod and None not in sizes, f"memcpy events without a byte count: {htod[:3]}"
    # one copy per input tensor and a few scalars; never a weight or a feature map per call
    assert len(htod) <= 20 * len(batch) + 50, [e["name"] for e in htod][:50]
    assert image_bytes <= sum(sizes) <= input_bytes + (1 << 20), (sum(sizes), image_bytes, input_bytes)
