#!/usr/bin/env python
"""The main job on the bundled real-photo sample, on the CPU, in a few minutes.

1. writes small RANDOM SAM and CLIP models in the official file formats;
2. evaluates the untrained head on the sample (LVIS AP, ground-truth boxes as proposals);
3. trains the head on the sample (``train_net.py``);
4. evaluates the trained head the same way;
5. benchmarks the trained head with a detector's boxes: a proposal file in the COCO results
   format that every detector's evaluator writes, here from a SIMULATED detector (each
   ground-truth box jittered, plus random false positives, with scores), through
   ``MODEL.REGIONSPOT.PROPOSALS file``;
6. runs the demo on one photo;
then prints the training loss at the start and end, the AP table before and after, the paper's
Table-1 layout for both proposal sources (``tools/summarize.py``) and where everything was
written. The backbones are random, so the numbers measure the pipeline (the head learns to
separate the sample's boxes), not recognition accuracy.

    python tools/run_sample.py [--output output/sample] [--iters 300]
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "RegionSpot"))

CONFIG = os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml")
DEMO_IMAGE = "astronaut.png"
BANNER = (
    "NOTE: SAM and CLIP here are small RANDOMLY INITIALISED models (no pretrained weights can be\n"
    "downloaded on this machine). The AP below measures that the pipeline works and that the head\n"
    "learns the sample's training boxes; it says nothing about RegionSpot's accuracy."
)


def run(step: str, cmd, log_path: str) -> None:
    """Run one step as a subprocess, its output teed to ``log_path``; exit if it fails."""
    print(f"\n=== {step}\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if any(k in line for k in ("iter:", "Evaluate annotation type", "Average Precision", "| AP ", "|:--",
                                       "| 0.", "| nan", "ERROR", "Error", "error:", "-> ")):
                print("  " + line.rstrip(), flush=True)
        code = proc.wait()
    print(f"--- {step}: {'done' if code == 0 else f'FAILED (exit {code})'} in {time.perf_counter() - start:.0f}s, "
          f"log {log_path}", flush=True)
    if code:
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


def read_metrics(folder: str) -> dict:
    with open(os.path.join(folder, "inference", "regionspot_sample", "metrics.json")) as f:
        return json.load(f)


def read_losses(train_dir: str):
    rows = []
    with open(os.path.join(train_dir, "metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            if "total_loss" in row:  # = loss_region_focal, the only loss
                rows.append((row["iteration"], row["total_loss"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(REPO, "output", "sample"))
    parser.add_argument("--iters", type=int, default=None, help="training iterations (default: the config's)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output)
    print(BANNER, flush=True)

    from regionspot.data.datasets.regionspot_sample import prepare_regionspot_sample, sample_root
    from regionspot.modeling.random_backbones import write_random_clip, write_random_sam

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
    train_net = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG]
    train_dir = os.path.join(out, "train")
    iters = ["SOLVER.MAX_ITER", str(args.iters)] if args.iters else []

    run("evaluate the untrained head", train_net + ["--eval-only"] + common +
        ["OUTPUT_DIR", os.path.join(out, "eval_untrained")], os.path.join(out, "logs", "eval_untrained.log"))
    run("train the head", train_net + common + iters + ["OUTPUT_DIR", train_dir],
        os.path.join(out, "logs", "train.log"))
    weights = os.path.join(train_dir, "model_final.pth")
    run("evaluate the trained head", train_net + ["--eval-only"] + common +
        ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", os.path.join(out, "eval_trained")],
        os.path.join(out, "logs", "eval_trained.log"))

    with open(json_path) as f:
        sample = json.load(f)
    detections = write_simulated_detections(sample, os.path.join(out, "proposals", "simulated_detector.json"))
    run("evaluate the trained head on a detector's boxes (simulated detector, COCO results file)",
        train_net + ["--eval-only"] + common +
        ["MODEL.WEIGHTS", weights, "MODEL.REGIONSPOT.PROPOSALS", "file", "MODEL.REGIONSPOT.PROPOSAL_FILE", detections,
         "OUTPUT_DIR", os.path.join(out, "eval_trained_detector")],
        os.path.join(out, "logs", "eval_trained_detector.log"))

    # The demo draws the trained head's labels for the sample's boxes of one photo.
    image = next(im for im in sample["images"] if im["file_name"] == DEMO_IMAGE)
    boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
             for a in sample["annotations"] if a["image_id"] == image["id"]]
    from regionspot.io import write_json_atomic

    from detectron2.data import MetadataCatalog

    vocabulary = MetadataCatalog.get("regionspot_sample").thing_classes
    boxes_file = write_json_atomic(os.path.join(out, "demo_boxes.json"), {DEMO_IMAGE: boxes})
    run("demo on a photo", [sys.executable, os.path.join(REPO, "demo", "demo.py"), "--config-file", CONFIG,
                            "--input", os.path.join(image_root, DEMO_IMAGE), "--boxes", boxes_file,
                            "--vocabulary", "custom", "--custom-vocabulary", ",".join(vocabulary),
                            "--output", os.path.join(out, "demo"),
                            "--opts"] + common + ["MODEL.WEIGHTS", weights],
        os.path.join(out, "logs", "demo.log"))

    before, after = read_metrics(os.path.join(out, "eval_untrained")), read_metrics(os.path.join(out, "eval_trained"))
    losses = read_losses(train_dir)
    keys = ["AP", "AP50", "APr", "APc", "APf"]
    print("\n" + "=" * 78)
    print(BANNER)
    print(f"\ntraining loss (sigmoid focal): iteration {losses[0][0]}: {losses[0][1]:.4f} -> "
          f"iteration {losses[-1][0]}: {losses[-1][1]:.4f}")
    print(f"\nLVIS AP on the sample's {len(sample['images'])} images (the training images), vocabulary: the "
          f"sample's {len(vocabulary)} LVIS categories; protocol: {before['protocol']['description']}:")
    print(f"  {'':22s}" + "".join(f"{k:>8s}" for k in keys))
    for name, m in (("untrained head", before), ("trained head", after)):
        for task in m["results"]:
            row = m["results"][task]
            print(f"  {name + ' ' + task:22s}" + "".join(f"{row.get(k, float('nan')):8.1f}" for k in keys))
    if "segm" in after["results"]:
        print("  (mask AP compares the random SAM's masks with the sample's ground truth, which is the boxes\n"
              "   themselves as the sample is annotated with boxes only: expect ~0 until real SAM weights are used)")
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import summarize

    rows = summarize.load_runs([os.path.join(out, "eval_trained"), os.path.join(out, "eval_trained_detector")],
                               labels=["GT boxes", "simulated detector (file)"])
    note = "random SAM/CLIP backbones: these numbers check the pipeline, they are not RegionSpot's accuracy"
    print("\nTable-1 layout, the trained head with two proposal sources:\n")
    print(summarize.format_report(rows, note=note))
    md, png = summarize.write_outputs(rows, os.path.join(out, "summary"), note=note)
    print(f"summary: {md}, {png}")
    print(f"\ndemo: {os.path.join(out, 'demo', os.path.splitext(DEMO_IMAGE)[0] + '.jpg')} (+ .json)")
    print(f"outputs: {out}")
    ap_before, ap_after = before["results"]["bbox"]["AP"], after["results"]["bbox"]["AP"]
    if not ap_after > ap_before + 10:
        print(f"FAILED: the head did not learn (box AP {ap_before:.1f} -> {ap_after:.1f})")
        return 1
    print(f"OK: the head learned the sample (box AP {ap_before:.1f} -> {ap_after:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
