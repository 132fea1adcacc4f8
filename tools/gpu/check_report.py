#!/usr/bin/env python3
"""Helpers of ``tools/gpu/check.sh``: the import check (its first step) and the one JSON result.

    python tools/gpu/check_report.py imports --wheels wheels --out OUT/env.json
    python tools/gpu/check_report.py cuda --out OUT [--dry-run] [--tests tests]
    python tools/gpu/check_report.py summary --out OUT [--dry-run]

``imports``: imports every top-level module of the bundle (``wheels/manifest.json``, else the
wheels' own lists) and every module of the ``regionspot`` package, with torch, and writes what
it found: Python, torch (its CUDA and cuDNN), the GPU's name, memory and capability, and each
package's version and location. Exit status 1 when any import fails (each one named), so
that nothing else runs on a broken install.

``cuda``: runs the CUDA tests (``pytest -m cuda``, JUnit XML to ``OUT/cuda_tests.xml``) and
counts from that XML how many ran, skipped and failed (pytest exits 0 when every selected test
skips, so its exit status alone proves nothing). Outside ``--dry-run`` the stage fails, in one
line, unless ``torch.cuda.is_available()`` and every CUDA test ran and passed; with ``--dry-run``
(a CPU machine) it says that it ran no CUDA test. The counts go to ``OUT/cuda_stage.json``.

``summary``: merges what the stages left in OUT (``stages.tsv``: name, exit status, seconds,
limit; each stage's JSON) into ``OUT/gpu_check.json``, with the headline figures beside the
targets of issue 16 (BL ground-truth-box evaluation >= 300 images/s, BL training with the token
cache >= 500 images/s on one H100). Exit status 1 when a stage failed.
"""

import argparse
import importlib
import json
import os
import pkgutil
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TARGETS = {"bl_gt_eval_images_per_second": 300.0, "bl_train_cached_images_per_second": 500.0}


def bundle_modules(wheels: Path):
    """Top-level modules of the bundle's wheels: {module: wheel file}."""
    manifest = wheels / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        return {m: w["file"] for w in data["wheels"] for m in w["top_level"]}
    from wheelhouse import wheel_metadata  # tools/gpu/wheelhouse.py: the script's folder is on sys.path

    return {m: w.name for w in sorted(wheels.glob("*.whl")) for m in wheel_metadata(w)["top_level"]}


def check_imports(wheels: Path, out: Path) -> int:
    from importlib.metadata import PackageNotFoundError, version

    report = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
              "imports": {}, "failed": {}}
    modules = {"torch": "the machine", "torchvision": "the machine", "numpy": "the machine", "cv2": "the machine",
               "skimage": "the machine", "matplotlib": "the machine"}
    if wheels.is_dir():
        modules.update(bundle_modules(wheels))
    modules.pop("tools", None)  # detectron2's wheel carries its tools/ folder: this repository's tools/ wins
    import regionspot

    modules.update({m.name: "the working tree" for m in pkgutil.walk_packages(regionspot.__path__, "regionspot.")
                    if ".testing" not in m.name or m.name.endswith("random_backbones")})
    for name, source in sorted(modules.items()):
        start = time.perf_counter()
        try:
            module = importlib.import_module(name)
            report["imports"][name] = {"from": source, "file": getattr(module, "__file__", None),
                                       "seconds": round(time.perf_counter() - start, 3)}
        except Exception as exc:  # every failure is reported, then the check stops
            report["failed"][name] = f"{type(exc).__name__}: {exc}"
    versions = {}
    for dist in ("torch", "torchvision", "numpy", "opencv-python-headless", "scikit-image", "detectron2",
                 "segment-anything", "clip-anytorch", "open-clip-torch", "lvis", "fvcore", "iopath", "pycocotools",
                 "faster-coco-eval", "omegaconf", "setuptools", "regionspot", "sam2", "segment-anything-hq"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    report["versions"] = versions
    report["regionspot_file"] = regionspot.__file__
    import torch

    report["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                       "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = {"name": props.name, "memory_bytes": props.total_memory, "count": torch.cuda.device_count(),
                         "capability": f"{props.major}.{props.minor}"}
    else:
        report["gpu"] = None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    gpu = report["gpu"]["name"] if report["gpu"] else "no CUDA device"
    print(f"[check] python {report['python']}, torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}")
    print("[check] " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    print(f"[check] regionspot from {Path(regionspot.__file__).parent}")
    if not Path(regionspot.__file__).resolve().is_relative_to(REPO):
        print(f"[check] FAILED: regionspot is not this working tree's ({REPO})", file=sys.stderr)
        return 1
    print(f"[check] {len(report['imports'])} modules imported")
    for name, error in sorted(report["failed"].items()):
        print(f"[check] FAILED import {name} ({modules[name]}): {error}", file=sys.stderr)
    return 1 if report["failed"] else 0


def junit_counts(path: Path) -> dict:
    """``{"tests", "passed", "skipped", "failed"}`` counted over the ``<testcase>`` elements of a
    JUnit XML file written by pytest (a test with a ``<failure>`` or ``<error>`` child counts as
    failed, one with ``<skipped>`` as skipped). A missing or unreadable file counts nothing."""
    counts = {"tests": 0, "passed": 0, "skipped": 0, "failed": 0}
    try:
        cases = ElementTree.parse(path).getroot().iter("testcase")
    except (OSError, ElementTree.ParseError):
        return counts
    for case in cases:
        counts["tests"] += 1
        tags = {child.tag for child in case}
        key = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        counts[key] += 1
    return counts


def cuda_stage(out: Path, dry_run: bool, tests: str) -> int:
    """The ``cuda`` stage of check.sh: run ``pytest -m cuda`` and judge it by what ran."""
    xml = out / "cuda_tests.xml"
    xml.unlink(missing_ok=True)
    rc = subprocess.call([sys.executable, "-m", "pytest", "-m", "cuda", tests, "-q", "-p", "no:cacheprovider",
                          "-rfEs", "--junitxml", str(xml)], cwd=REPO)
    counts = junit_counts(xml)
    import torch

    available = torch.cuda.is_available()
    record = {"pytest_exit": rc, "cuda_available": available, "dry_run": dry_run, **counts}
    (out / "cuda_stage.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    ran = f"{counts['passed'] + counts['failed']} of {counts['tests']} CUDA tests ran"
    if dry_run:
        print(f"[check] cuda: dry run: ran no CUDA test ({counts['tests']} collected, {counts['skipped']} skipped: "
              f"torch.cuda.is_available() is {available}); pytest exit {rc}")
        return 0 if rc == 0 else 1
    problems = []
    if not available:
        problems.append("torch.cuda.is_available() is False")
    if counts["tests"] == 0:
        problems.append(f"no CUDA test found ({xml} {'is empty' if xml.is_file() else 'missing'})")
    if counts["skipped"]:
        problems.append(f"{counts['skipped']} skipped")
    if counts["failed"]:
        problems.append(f"{counts['failed']} failed")
    if rc != 0 and not counts["failed"]:
        problems.append(f"pytest exited with {rc}")
    if problems:
        print(f"[check] cuda: FAILED: {ran}: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print(f"[check] cuda: {ran}, all passed on {torch.cuda.get_device_name(0)}")
    return 0


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def headline(results: dict) -> dict:
    """The figures that docs/speed.md quotes, picked from the stages' JSON."""
    out = {}
    for variant in ("bb", "bl"):
        e2e = results.get(f"e2e_{variant}")
        if e2e:
            out[f"{variant}_e2e_images_per_second"] = {k: r.get("images_per_second") for k, r in e2e["runs"].items()}
            out[f"{variant}_e2e_peak_memory_bytes"] = {k: r.get("peak_memory_bytes") for k, r in e2e["runs"].items()}
            out[f"{variant}_e2e_deviation"] = {k: r.get("deviation") for k, r in e2e["runs"].items()
                                               if r.get("deviation")}
            if e2e.get("max_batch"):
                out[f"{variant}_largest_batch"] = e2e["max_batch"].get("largest_batch_that_fits")
    train = results.get("train")
    if train:
        out["train_images_per_second"] = {f"{model}_{mode}": r.get("images_per_second")
                                          for model, m in train.get("models", {}).items()
                                          for mode, r in m.get("modes", {}).items()}
        out["train_peak_bytes"] = {f"{model}_{mode}": r.get("peak_bytes")
                                   for model, m in train.get("models", {}).items()
                                   for mode, r in m.get("modes", {}).items()}
        out["train_precision"] = train.get("settings", {}).get("precision")
    evaluation = results.get("eval")
    if evaluation:
        tasks = evaluation.get("tasks", {})
        out["eval_seconds"] = {f"{task}_{backend}": t[backend]["seconds"] for task, t in tasks.items()
                               for backend in ("faster_coco_eval", "lvis") if isinstance(t.get(backend), dict)}
        out["eval_images"] = {task: t.get("set", {}).get("images") for task, t in evaluation.get("tasks", {}).items()}
    bl = (results.get("e2e_bl") or {}).get("runs", {})
    best = max((r.get("images_per_second") or 0 for k, r in bl.items() if k.startswith("fast")), default=None)
    out["targets_met"] = {
        "bl_gt_eval_images_per_second": None if best is None else best >= TARGETS["bl_gt_eval_images_per_second"],
        "bl_train_cached_images_per_second": (None if not train or "bl" not in train.get("models", {}) else
                                              (train["models"]["bl"]["modes"].get("cached", {})
                                               .get("images_per_second") or 0)
                                              >= TARGETS["bl_train_cached_images_per_second"]),
    }
    return out


def summary(out: Path, dry_run: bool) -> int:
    stages, failed = [], []
    tsv = out / "stages.tsv"
    for line in tsv.read_text(encoding="utf-8").splitlines() if tsv.is_file() else []:
        name, rc, seconds, limit = line.split("\t")
        status = "ok" if rc == "0" else ("timed out" if rc in ("124", "137") else f"failed (exit {rc})")
        stages.append({"stage": name, "status": status, "exit": int(rc), "seconds": float(seconds),
                       "limit_s": int(limit)})
        if rc != "0":
            failed.append(name)
    results = {}
    for name in ("env", "e2e_bb", "e2e_bl", "train", "eval", "wheelhouse"):
        data = _load(out / f"{name}.json")
        if data is not None:
            results[name] = data
    cuda = _load(out / "cuda_figures.json")
    if cuda is not None:
        results["cuda_tests"] = cuda
    cuda_stage_counts = _load(out / "cuda_stage.json")
    if cuda_stage_counts is not None:
        results["cuda_stage"] = cuda_stage_counts
    env = results.get("env") or {}
    report = {
        "schema": "regionspot-gpu-check/1", "dry_run": dry_run,
        "device": (env.get("gpu") or {}).get("name") or "cpu", "torch": (env.get("torch") or {}).get("version"),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": stages,
        "total_seconds": round(sum(s["seconds"] for s in stages), 1), "failed_stages": failed,
        "targets": TARGETS, "headline": headline(results), "results": results,
        **({"targets_met": "not applicable: a dry run (CPU, tiny models)"} if dry_run else {}),
        "note": "RANDOM weights: speeds and deviations are representative, AP figures are not accuracy",
    }
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "gpu_check.json")
    for s in stages:
        print(f"[check] {s['stage']:<12} {s['status']:<18} {s['seconds']:7.1f} s (limit {s['limit_s']} s)")
    if dry_run:
        print("[check] dry run: no CUDA test ran (CPU, tiny models); the cuda stage only checked that the "
              "CUDA tests are collected")
    print(f"[check] {len(stages) - len(failed)}/{len(stages)} stages ok in {report['total_seconds']} s; "
          f"results: {out / 'gpu_check.json'}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="check_report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("imports", "cuda", "summary"))
    parser.add_argument("--wheels", default=str(REPO / "wheels"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--tests", default="tests", help="cuda: where pytest looks for the CUDA tests")
    args = parser.parse_args(argv)
    if args.command == "imports":
        return check_imports(Path(args.wheels), Path(args.out))
    if args.command == "cuda":
        return cuda_stage(Path(args.out), args.dry_run, args.tests)
    return summary(Path(args.out), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
