"""The main job on the bundled real-photo sample, on the CPU (its time: ``docs/speed.md``).

1. writes small RANDOM SAM and CLIP models in the official file formats;
2. evaluates the untrained head on the sample (LVIS AP, ground-truth boxes as proposals);
3. trains the head on the sample (``train_net.py``);
4. evaluates the trained head the same way;
5. benchmarks the trained head with a detector's boxes: a proposal file in the COCO results
   format that every detector's evaluator writes, here from a SIMULATED detector (each
   ground-truth box jittered, plus random false positives, with scores), through
   ``MODEL.REGIONSPOT.PROPOSALS file``;
6. runs the demo on one photo;
then prints the training loss at the start and end, one AP table of the three evaluations in the
paper's Table-1 layout (read from their ``metrics.json``, with the protocol and what the numbers
mean under it; also written as ``summary/table1.md`` and ``.png``) and where everything was
written. The backbones are random, so the numbers measure the pipeline (the head learns to
separate the sample's boxes), not recognition accuracy.

While a step runs, its progress lines (training: ``iter N/M ... it/s ... ETA``) are shown, and a
line every 30 s when a step has printed nothing for that long; each step's whole output is in
``<output>/logs/``.

Threads: every step uses all CPU cores (PyTorch's default); ``--threads N`` (or
``OMP_NUM_THREADS=N``) limits the threads of each step.

    python tools/run_sample.py [--output output/sample] [--iters 300] [--threads N]
"""

import argparse
import ast
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
import warnings

from regionspot.model_zoo import get_config_file
from regionspot.tools.common import output_path

CONFIG = "regionspot_sample_cpu.yaml"  # a bundled config (regionspot.model_zoo)
DEMO_IMAGE = "astronaut.png"
BANNER = (
    "NOTE: SAM and CLIP here are small RANDOMLY INITIALISED models (no pretrained weights can be\n"
    "downloaded on this machine). The AP below measures that the pipeline works and that the head\n"
    "learns the sample's training boxes; it says nothing about RegionSpot's accuracy."
)
# Lines of a step's output shown on the console (everything goes to the step's log file):
# training progress (regionspot.train's "iter N/M  x it/s  y images/s  ETA ..."), Detectron2's
# inference progress, and problems.
SHOWN = re.compile(r"\biter \d+/\d+\b|\bInference done \d+/\d+|\bTotal inference time\b|\bWARNING\b|\bERROR\b")
NOISE = ("Assuming user provided the results in correct format",)  # the LVIS API's, on every evaluation
# A step silent for this long gets a line saying it is still running.
HEARTBEAT_S = 30.0
# Lines of a failed step's log printed on the console.
FAILURE_TAIL = 40


def shown(line: str) -> bool:
    """Whether a line of a step's output is shown on the console (see :data:`SHOWN`)."""
    return bool(SHOWN.search(line)) and not any(noise in line for noise in NOISE)


def run(step: str, cmd, log_path: str, env=None, heartbeat_s: float = HEARTBEAT_S) -> None:
    """Run one step as a subprocess, its whole output written to ``log_path`` and its progress
    lines shown; a line every ``heartbeat_s`` seconds of silence; exit if the step fails (after
    printing the end of its log)."""
    print(f"\n=== {step}\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    lines: "queue.Queue" = queue.Queue()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

        def read():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        tail = []
        last_shown = time.perf_counter()
        while True:
            try:
                line = lines.get(timeout=heartbeat_s)
            except queue.Empty:
                line = ""
            if line is None:
                break
            now = time.perf_counter()
            if line:
                log.write(line)
                log.flush()
                tail = (tail + [line.rstrip()])[-FAILURE_TAIL:]
                if shown(line):
                    print("  " + line.rstrip(), flush=True)
                    last_shown = now
            if now - last_shown >= heartbeat_s:
                print(f"  ... still running ({now - start:.0f}s; the whole output is in {log_path})", flush=True)
                last_shown = now
        code = proc.wait()
    print(f"--- {step}: {'done' if code == 0 else f'FAILED (exit {code})'} in {time.perf_counter() - start:.0f}s, "
          f"log {log_path}", flush=True)
    if code:
        print(f"the last {len(tail)} lines of {log_path}:\n" + "\n".join("  " + t for t in tail), flush=True)
        sys.exit(code)


def write_simulated_detections(sample: dict, path: str, seed: int = 0) -> str:
    """A detector-style proposal file (COCO results list, XYWH pixels) for the sample.

    Simulated, not a real detector: every ground-truth box jittered by up to 10% of its size
    (score 0.5-0.95), plus two random boxes per image (score 0.05-0.4, category 1).
    """
    import numpy as np

    from regionspot.io import write_json_atomic

    rng = np.random.RandomState(seed)
    sizes = {im["id"]: (im["width"], im["height"]) for im in sample["images"]}
    results = []
    for ann in sample["annotations"]:
        x, y, w, h = ann["bbox"]
        W, H = sizes[ann["image_id"]]
        dx, dy, dw, dh = rng.uniform(-0.1, 0.1, 4) * [w, h, w, h]
        x0, y0 = max(0.0, x + dx), max(0.0, y + dy)
        x1, y1 = min(float(W), x + dx + w + dw), min(float(H), y + dy + h + dh)
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(float(rng.uniform(0.5, 0.95)), 4)})
    for image_id, (W, H) in sizes.items():
        for _ in range(2):
            w, h = rng.uniform(0.1, 0.5) * W, rng.uniform(0.1, 0.5) * H
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            results.append({"image_id": image_id, "category_id": 1,
                            "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                            "score": round(float(rng.uniform(0.05, 0.4)), 4)})
    return write_json_atomic(path, results)


def metrics_path(folder: str) -> str:
    return os.path.join(folder, "inference", "regionspot_sample", "metrics.json")


def read_metrics(folder: str) -> dict:
    with open(metrics_path(folder)) as f:
        return json.load(f)


def box_ap(metrics: dict):
    """The box AP of an evaluation's metrics (None when missing or not a number: strict JSON
    writes a NaN as null)."""
    value = (metrics.get("results") or {}).get("bbox", {}).get("AP")
    return float(value) if isinstance(value, (int, float)) and value == value else None


def read_losses(train_dir: str):
    rows = []
    with open(os.path.join(train_dir, "metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("total_loss") is not None:  # = loss_region_focal, the only loss
                rows.append((row["iteration"], row["total_loss"]))
    return rows


def _config_solver() -> dict:
    import yaml

    with open(get_config_file(CONFIG)) as f:
        return yaml.safe_load(f)["SOLVER"]


def config_max_iter() -> int:
    return int(_config_solver()["MAX_ITER"])


def schedule(iters: int):
    """Config overrides for a training run of ``iters`` iterations: the sample config's
    schedule (warm-up, learning-rate steps) scaled to that length."""
    solver = _config_solver()
    scale = iters / solver["MAX_ITER"]
    steps = solver["STEPS"]
    steps = ast.literal_eval(steps) if isinstance(steps, str) else steps  # "(250,)" in the yaml
    steps = tuple(max(1, round(s * scale)) for s in steps)
    warmup = min(solver["WARMUP_ITERS"], max(1, iters // 5))
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps).replace(" ", ""),
            "SOLVER.WARMUP_ITERS", str(warmup)]


def explanation(n_classes: int, untrained_ap) -> str:
    """What the table's numbers mean (printed under the table, and in table1.md / .png)."""
    untrained = f" ({untrained_ap:.1f})" if untrained_ap is not None else ""
    return (f"Random SAM/CLIP backbones: these numbers check the pipeline, they are not RegionSpot's accuracy. "
            f"The untrained head's box AP{untrained} is chance level for this setup, not something learned: the "
            f"proposals are the ground-truth boxes, so every box is correctly placed, and with only {n_classes} "
            f"classes each box is kept with most or all of them, so its right label is among the detections; AP "
            f"then measures only how high the right class scores, and LVIS scores each class only on the few "
            f"images that contain it or list it as absent, where a random head often ranks the right box first "
            f"(with LVIS's 1203 classes chance is near 0). Training must raise it well above. Mask AP compares "
            f"SAM's masks with the sample's ground-truth masks, which are its boxes (the sample is annotated with "
            f"boxes only): a random SAM's masks are blobs, not boxes, so ~0 is expected here; it says nothing "
            f"about the head.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=output_path("sample"),
                        help="the run's folder: random weights, outputs, logs, summary (default: ./output/sample "
                             "under the current folder); the sample's photos go under "
                             "$DETECTRON2_DATASETS/regionspot_sample (./datasets/regionspot_sample when unset)")
    parser.add_argument("--iters", type=int, default=None,
                        help="training iterations (default: the config's 300); the schedule is scaled to it")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of each step (default: all cores, or OMP_NUM_THREADS when set)")
    args = parser.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        parser.error("--iters must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    out = os.path.abspath(args.output)
    print(BANNER, flush=True)

    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cores = os.cpu_count() or 1
    threads = env.get("OMP_NUM_THREADS") or f"{cores} (all cores)"
    print(f"\nCPU threads per step: {threads} of {cores} cores (limit with --threads N or OMP_NUM_THREADS=N). "
          f"75-90 s in all on an idle 2-core machine; far slower when other jobs share the cores.", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= 0.5 * cores:
        print(f"NOTE: the machine is busy (1-minute load average {load:.1f} on {cores} cores): this job competes "
              f"for the same cores and will run slower; its progress lines show how fast.", flush=True)

    # This process only prepares files and reads results: the libraries' deprecation warnings
    # (torch.jit, pkg_resources) say nothing to the user here.
    warnings.simplefilter("ignore", FutureWarning)
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated")
    from regionspot.data.datasets.regionspot_sample import prepare_regionspot_sample, sample_root
    from regionspot.testing.random_backbones import write_random_clip, write_random_sam

    json_path, image_root = prepare_regionspot_sample(sample_root())
    sam_path = os.path.join(out, "weights", "sam_random_tiny.pth")
    clip_path = os.path.join(out, "weights", "clip_random_tiny.pt")
    if not os.path.exists(sam_path):
        write_random_sam(sam_path, "tiny", seed=0)
    if not os.path.exists(clip_path):
        write_random_clip(clip_path, "tiny", seed=0)
    print(f"sample: {json_path} (images in {image_root})\nrandom SAM: {sam_path}\nrandom CLIP: {clip_path}")

    common = ["MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
              "MODEL.REGIONSPOT.TEXT_CACHE_DIR", os.path.join(out, "text_cache")]
    train_net = [sys.executable, "-m", "regionspot.tools.train_net", "--config-file", CONFIG]
    train_dir = os.path.join(out, "train")
    folders = {name: os.path.join(out, name) for name, _ in EVALUATIONS}

    run("evaluate the untrained head (chance level)", train_net + ["--eval-only", "--untrained-head"] + common +
        ["OUTPUT_DIR", folders["eval_untrained"]], os.path.join(out, "logs", "eval_untrained.log"), env)
    run(f"train the head ({args.iters or config_max_iter()} iterations)",
        train_net + common + (schedule(args.iters) if args.iters else []) + ["OUTPUT_DIR", train_dir],
        os.path.join(out, "logs", "train.log"), env)
    weights = os.path.join(train_dir, "model_final.pth")
    run("evaluate the trained head", train_net + ["--eval-only"] + common +
        ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", folders["eval_trained"]],
        os.path.join(out, "logs", "eval_trained.log"), env)

    with open(json_path) as f:
        sample = json.load(f)
    detections = write_simulated_detections(sample, os.path.join(out, "proposals", "simulated_detector.json"))
    run("evaluate the trained head on a detector's boxes (simulated detector, COCO results file)",
        train_net + ["--eval-only"] + common +
        ["MODEL.WEIGHTS", weights, "MODEL.REGIONSPOT.PROPOSALS", "file", "MODEL.REGIONSPOT.PROPOSAL_FILE", detections,
         "OUTPUT_DIR", folders["eval_trained_detector"]],
        os.path.join(out, "logs", "eval_trained_detector.log"), env)

    # The demo draws the trained head's labels for the sample's boxes of one photo.
    image = next(im for im in sample["images"] if im["file_name"] == DEMO_IMAGE)
    boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
             for a in sample["annotations"] if a["image_id"] == image["id"]]
    from detectron2.data import MetadataCatalog

    from regionspot.io import write_json_atomic

    vocabulary = MetadataCatalog.get("regionspot_sample").thing_classes
    boxes_file = write_json_atomic(os.path.join(out, "demo_boxes.json"), {DEMO_IMAGE: boxes})
    run("demo on a photo", [sys.executable, "-m", "regionspot.tools.demo", "--config-file", CONFIG,
                            "--input", os.path.join(image_root, DEMO_IMAGE), "--boxes", boxes_file,
                            "--vocabulary", "custom", "--custom-vocabulary", ",".join(vocabulary),
                            "--output", os.path.join(out, "demo"),
                            "--opts"] + common + ["MODEL.WEIGHTS", weights],
        os.path.join(out, "logs", "demo.log"), env)

    return report(out, len(sample["images"]), vocabulary)


# The evaluations of the report, in its table's row order: (output folder, row label).
EVALUATIONS = (("eval_untrained", "untrained head, GT boxes"), ("eval_trained", "trained head, GT boxes"),
               ("eval_trained_detector", "trained head, simulated detector (file)"))
# The box AP the trained head must gain over the untrained one on the sample.
LEARNED_GAIN = 10.0


def report(out: str, n_images: int, vocabulary) -> int:
    """Print the job's results from the files its steps wrote: the training loss, one AP table
    of the three evaluations (Table-1 layout, their protocol and what the numbers mean under
    it), written to ``<out>/summary/table1.md`` and ``.png`` too; then check that the head
    learned (box AP up by more than :data:`LEARNED_GAIN`). Returns the exit status."""
    from regionspot.tools import summarize

    before, after = (read_metrics(os.path.join(out, name)) for name, _ in EVALUATIONS[:2])
    ap_before, ap_after = box_ap(before), box_ap(after)
    losses = read_losses(os.path.join(out, "train"))
    print("\n" + "=" * 78)
    print(BANNER)
    if losses:
        print(f"\ntraining loss (sigmoid focal): iteration {losses[0][0]}: {losses[0][1]:.4f} -> "
              f"iteration {losses[-1][0]}: {losses[-1][1]:.4f}")
    rows = summarize.load_runs([metrics_path(os.path.join(out, name)) for name, _ in EVALUATIONS],
                               labels=[label for _, label in EVALUATIONS])
    note = explanation(len(vocabulary), ap_before)
    print(f"\nLVIS AP (%) on the sample's {n_images} images (the training images), vocabulary: the sample's "
          f"{len(vocabulary)} LVIS categories; Table-1 layout, each evaluation once:\n")
    print(summarize.format_report(rows, note=note))
    md, png = summarize.write_outputs(rows, os.path.join(out, "summary"), note=note,
                                      title="RegionSpot on the bundled sample, random SAM/CLIP (Table 1 layout)")
    print(f"\nsummary: {md}, {png}")
    print(f"demo: {os.path.join(out, 'demo', os.path.splitext(DEMO_IMAGE)[0] + '.jpg')} (+ .json)")
    print(f"outputs: {out}")
    if ap_before is None or ap_after is None or not ap_after > ap_before + LEARNED_GAIN:
        shown_ap = " -> ".join("n/a" if v is None else f"{v:.1f}" for v in (ap_before, ap_after))
        print(f"FAILED: the head did not learn (box AP {shown_ap}; it must gain more than {LEARNED_GAIN:g} points)")
        return 1
    print(f"OK: the head learned the sample (box AP {ap_before:.1f} -> {ap_after:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
