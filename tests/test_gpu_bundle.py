"""The GPU-readiness tools that run here: the wheel bundle's planning and checks
(tools/gpu/wheelhouse.py) on small hand-made wheels, the GPU check's options and summary
(tools/gpu/check.sh, tools/gpu/check_report.py). The full bundle is built with
tools/gpu/make_wheelhouse.sh (it downloads); the check's dry run runs in .ci/run."""

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools", "gpu"))
import wheelhouse  # noqa: E402

PY312 = next((p for p in [os.environ.get("REGIONSPOT_PY312"), shutil.which("python3.12"),
                          *sorted(str(p) for p in Path("/root/.pyenv/versions").glob("3.12*/bin/python"))]
              if p and subprocess.run([p, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                      capture_output=True).returncode == 0), None)


def make_wheel(folder: Path, name: str, version: str, tag: str, files: dict, requires=()) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD with hashes)."""
    dist = f"{name}-{version}.dist-info"
    files = dict(files)
    files[f"{dist}/METADATA"] = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    files[f"{dist}/WHEEL"] = f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"
    rows = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append([path, f"sha256={digest}", str(len(data))])
    rows.append([f"{dist}/RECORD", "", ""])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    files[f"{dist}/RECORD"] = buf.getvalue()
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for p, text in files.items():
            zf.writestr(p, text)
    return path


def test_plan_follows_setup_py_without_the_gpu_machines_packages_or_extras():
    """The bundle starts from setup.py's install_requires: the GPU machine's packages and the
    extras ([test], a future [app]) are left out; detectron2 and lvis come from the installer."""
    p = wheelhouse.plan()
    names = {wheelhouse.Requirement(r).name for r in p["requirements"]}
    declared = {wheelhouse.Requirement(r).name for r in wheelhouse.setup_py_requirements()}
    assert {"segment-anything", "clip-anytorch", "fvcore", "iopath", "pycocotools", "faster-coco-eval",
            "setuptools"} <= names <= declared
    assert not names & {"torch", "torchvision", "opencv-python-headless", "matplotlib", "scikit-image", "detectron2",
                        "pytest", "ruff", "gradio", "playwright"}
    assert "pb1-detectron2==0.6" in p["special"]["detectron2"] and p["special"]["lvis"].startswith("lvis==")


def test_setup_py_requirements_are_parsed_not_run(tmp_path):
    setup_py = tmp_path / "setup.py"
    setup_py.write_text("raise SystemExit('never run')\nfrom setuptools import setup\n"
                        "setup(name='x', install_requires=['a>=1', 'sam2; python_version>=\"3.10\"'],\n"
                        "      extras_require={'app': ['gradio', 'playwright']})\n")
    assert wheelhouse.setup_py_requirements(setup_py) == ["a>=1", 'sam2; python_version>="3.10"']
    setup_py.write_text("from setuptools import setup\nREQS = ['a']\nsetup(name='x', install_requires=REQS)\n")
    with pytest.raises(wheelhouse.BundleError, match="not a literal"):
        wheelhouse.setup_py_requirements(setup_py)


@pytest.mark.parametrize("filename, ok", [
    ("a-1.0-py3-none-any.whl", True),
    ("b-1.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", True),
    ("c-1.0-cp38-abi3-manylinux2014_x86_64.whl", True),
    ("d-1.0-cp311-cp311-manylinux_2_17_x86_64.whl", False),  # another Python
    ("e-1.0-cp312-cp312-macosx_11_0_arm64.whl", False),
    ("f-1.0-cp312-cp312-musllinux_1_1_x86_64.whl", False),
    ("g-1.0-cp312-cp312-manylinux_2_17_aarch64.whl", False),
    ("h-1.0-cp312-cp312-win_amd64.whl", False),
])
def test_wheel_tags(filename, ok):
    assert wheelhouse.wheel_tags_ok(filename)[0] is ok


def test_lvis_patch_inside_a_wheel_keeps_the_record_valid(tmp_path):
    """The installer's numpy>=1.24 patch applied to lvis/eval.py inside the wheel, with RECORD's
    hash and size of the file updated (pip checks them)."""
    upstream = wheelhouse.load_install_deps().LVIS_NP_FLOAT_UPSTREAM
    wheel = make_wheel(tmp_path, "lvis", "0.5.3", "py3-none-any",
                       {"lvis/__init__.py": "", "lvis/eval.py": "import numpy as np\n" + upstream})
    install_deps = wheelhouse.load_install_deps()
    count = wheelhouse.patch_wheel(wheel, "lvis/eval.py",
                                   lambda t: install_deps.NP_ALIAS_RE.subn(lambda m: m.group(1), t))
    assert count == 2
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read("lvis/eval.py").decode()
        record = {row[0]: row for row in csv.reader(io.StringIO(zf.read("lvis-0.5.3.dist-info/RECORD").decode()))}
    assert "astype(dtype=float)" in text and "np.float)" not in text
    digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    assert record["lvis/eval.py"][1:] == [f"sha256={digest}", str(len(text.encode()))]
    assert wheelhouse.patch_wheel(wheel, "lvis/eval.py",
                                  lambda t: install_deps.NP_ALIAS_RE.subn(lambda m: m.group(1), t)) == 0


@pytest.mark.skipif(PY312 is None, reason="no Python 3.12 here (set REGIONSPOT_PY312)")
def test_verify_installs_offline_with_python312_and_sorts_the_imports(tmp_path):
    """verify: tags, size, `pip install --no-index --no-deps --target` with Python 3.12, then each
    module imported there: fine / stops at a package of the GPU machine / broken (a failure)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "fine", "1.0", "py3-none-any", {"fine/__init__.py": "VALUE = 1\n"})
    make_wheel(wheels, "needs_torch", "1.0", "py3-none-any", {"needs_torch/__init__.py": "import torch\n"})
    report = wheelhouse.verify(wheels, PY312, limit_mib=1)
    assert report["imports"]["fine"]["status"] == "ok"
    assert report["imports"]["needs_torch"]["status"] == "needs_gpu_machine"
    make_wheel(wheels, "broken", "1.0", "py3-none-any", {"broken/__init__.py": "import not_bundled_anywhere\n"})
    with pytest.raises(wheelhouse.BundleError, match="broken.*not_bundled_anywhere"):
        wheelhouse.verify(wheels, PY312, limit_mib=1)
    (wheels / "broken-1.0-py3-none-any.whl").unlink()
    make_wheel(wheels, "native", "1.0", "cp311-cp311-manylinux_2_17_x86_64", {"native/__init__.py": ""})
    with pytest.raises(wheelhouse.BundleError, match="native-1.0-cp311"):
        wheelhouse.verify(wheels, PY312, limit_mib=1)
    (wheels / "native-1.0-cp311-cp311-manylinux_2_17_x86_64.whl").unlink()
    make_wheel(wheels, "big", "1.0", "py3-none-any", {"big/__init__.py": "#" * 300_000})
    with pytest.raises(wheelhouse.BundleError, match="over the 0.1 MiB limit"):
        wheelhouse.verify(wheels, PY312, limit_mib=0.1)


def test_check_sh_refuses_unknown_options():
    proc = subprocess.run(["bash", "tools/gpu/check.sh", "--fast"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr


def test_check_summary_reports_each_stage_and_fails_on_a_timeout(tmp_path):
    """gpu_check.json: every stage with its status (a timed-out stage is named as such and
    fails the check), and the headline figures taken from the stages' JSON."""
    (tmp_path / "stages.tsv").write_text("imports\t0\t5.0\t40\ne2e_bl\t124\t100.2\t100\ntrain\t0\t30.1\t60\n")
    (tmp_path / "train.json").write_text(json.dumps({"settings": {"precision": "bfloat16"}, "models": {
        "bl": {"modes": {"online": {"images_per_second": 40.0, "peak_bytes": 5}, "cached": {"images_per_second": 600.0,
                                                                                             "peak_bytes": 3}}}}}))
    proc = subprocess.run([sys.executable, "tools/gpu/check_report.py", "summary", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "timed out" in proc.stdout and "2/3 stages ok" in proc.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed_stages"] == ["e2e_bl"] and report["stages"][1]["status"] == "timed out"
    assert report["headline"]["train_images_per_second"] == {"bl_online": 40.0, "bl_cached": 600.0}
    assert report["headline"]["targets_met"]["bl_train_cached_images_per_second"] is True
    assert report["headline"]["targets_met"]["bl_gt_eval_images_per_second"] is None  # no end-to-end figures


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_cuda" name="a"/>
<testcase classname="tests.test_cuda" name="b"><skipped message="needs a CUDA device"/></testcase>
<testcase classname="tests.test_cuda" name="c"><failure message="boom"/></testcase>
<testcase classname="tests.test_cuda" name="d"><error message="fixture"/></testcase>
</testsuite></testsuites>"""


def test_junit_counts_read_what_ran(tmp_path):
    from check_report import junit_counts

    (tmp_path / "cuda_tests.xml").write_text(JUNIT)
    assert junit_counts(tmp_path / "cuda_tests.xml") == {"tests": 4, "passed": 1, "skipped": 1, "failed": 2}
    assert junit_counts(tmp_path / "missing.xml") == {"tests": 0, "passed": 0, "skipped": 0, "failed": 0}


def _cuda_stage(tmp_path, *extra):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # a machine where torch sees no GPU
    return subprocess.run([sys.executable, "tools/gpu/check_report.py", "cuda", "--out", str(tmp_path),
                           "--tests", "tests/test_cuda.py", *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_cuda_stage_fails_in_one_line_when_no_cuda_test_ran(tmp_path):
    """pytest exits 0 when every CUDA test skips: outside --dry-run the stage reads the JUnit XML
    and fails, naming why, unless torch sees the GPU and every CUDA test ran."""
    proc = _cuda_stage(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[check] cuda:")]
    assert len(lines) == 1, proc.stderr
    assert "FAILED: 0 of" in lines[0] and "torch.cuda.is_available() is False" in lines[0] and "skipped" in lines[0]
    stage = json.loads((tmp_path / "cuda_stage.json").read_text())
    assert stage["tests"] >= 8 and stage["skipped"] == stage["tests"] and stage["pytest_exit"] == 0


def test_the_dry_run_cuda_stage_says_it_ran_no_cuda_test(tmp_path):
    proc = _cuda_stage(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[check] cuda: dry run: ran no CUDA test" in proc.stdout
    (tmp_path / "stages.tsv").write_text("cuda\t0\t3.0\t220\n")
    summary = subprocess.run([sys.executable, "tools/gpu/check_report.py", "summary", "--out", str(tmp_path),
                              "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0 and "dry run: no CUDA test ran" in summary.stdout, summary.stdout
    assert json.loads((tmp_path / "gpu_check.json").read_text())["results"]["cuda_stage"]["passed"] == 0
