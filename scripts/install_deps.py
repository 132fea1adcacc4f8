#!/usr/bin/env python3
"""Install RegionSpot and its dependencies into the Python environment that runs this script.

Usage (with the target environment's python)::

    python scripts/install_deps.py [--force] [--verbose] [--detectron2-route auto|git|sdist]

``scripts/ensure_env.sh`` picks that python (the active virtualenv/conda env, else ``.venv/``)
and runs this script; ``scripts/run_tests.sh`` and ``scripts/run_sample.sh`` source it.

Steps, each printing one line saying what it did:

1. torch + torchvision: keep an importable pair whose compiled ops run on the CPU; otherwise
   install the torch 2.14 / torchvision 0.29 pair. The registry's torchvision wheels are CUDA
   builds: next to the CPU-only torch wheel their ``_C`` fails to load, while the CUDA torch
   2.14 pair runs every op on the CPU and serves GPU users unchanged.
2. detectron2 (not on PyPI under its own name), by the first route that applies:
   ``keep`` an importable one; ``git``: the official repository, where GitHub is reachable;
   ``sdist``: the PyPI sdist ``pb1-detectron2==0.6`` (the v0.6 Python sources without the C++
   sources), unpacked under ``build/detectron2-src/``, patched by the ``patch_*`` functions
   below, and installed as a distribution named ``detectron2`` without compiled ops. Only
   what the project needs is patched; each patch is named for the failure it prevents (its
   docstring says which, tests/test_install_deps.py shows it): the sdist's setup.py (C++
   build, distribution name); ``detectron2._C`` missing (a placeholder module); Pillow>=10
   (``Image.LINEAR``); numpy>=1.24 (``np.int`` & co.); COCOEvaluator's compiled evaluator.
3. the project itself: ``pip install -e '.[test,app,hub-tokenizers,export,onnxruntime]'`` (the
   test extra: pytest, and ruff, the linter that ``.ci/run`` runs before the tests; the app
   extra: Gradio for ``demo/app.py`` and the Playwright package its browser test drives Chromium
   with; hub-tokenizers: transformers, for OpenCLIP models whose tokenizer is a Hugging Face one,
   e.g. SigLIP; export and onnxruntime: onnx, onnxscript and ONNX Runtime for
   ``regionspot-export onnx``, ``regionspot.deploy`` and their tests).
3b. Chromium for that browser test: Debian's ``chromium`` package (``apt-get install -y
   chromium``) when ``/usr/bin/chromium`` is missing and apt is usable as root; never a browser
   download. This step runs on every run, the up-to-date one too (the browser lives outside
   the environment the stamp describes). Where it cannot be installed the step says why; the
   browser test is then skipped with that reason listed, and fails under ``CI=true``.
4. lvis: ``lvis==0.5.3`` installed with ``--no-deps`` (its metadata pulls ``opencv-python``,
   which clashes with ``opencv-python-headless``), then its numpy>=1.24 breakage
   (``np.float`` in ``LVISEval.accumulate``) patched in site-packages. It runs after the
   project step, which brings its real runtime deps.

A stamp file in the environment (``sys.prefix``) records a hash of ``setup.py`` and this
script; when it matches and a quick import check passes, a re-run only checks Chromium (3b) and
prints "environment up to date". Nothing is written into git-tracked paths, apart from the
(git-ignored) egg-info of the editable install.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGE_DIR = REPO_ROOT / "projects" / "RegionSpot" / "regionspot"
D2_BUILD_DIR = REPO_ROOT / "build" / "detectron2-src"
STAMP_FILE = Path(sys.prefix) / ".regionspot-install-stamp"

# Keep SETUPTOOLS in step with setup.py: clip-anytorch needs pkg_resources (gone in 81), torch
# 2.14 declares >=77.0.3. It is passed with every pip install that could move setuptools.
SETUPTOOLS = "setuptools>=77.0.3,<81"
TORCH_PAIR = ["torch==2.14.*", "torchvision==0.29.*"]

D2_GIT_URL = "https://github.com/facebookresearch/detectron2.git"
D2_SDIST_NAME, D2_SDIST_VERSION = "pb1-detectron2", "0.6"
# What detectron2 0.6 needs at import/run time. Its setup.py also lists black==21.4b2,
# future, pydot (caffe2 export) and tensorboard (one optional writer), none of them needed.
D2_RUNTIME_DEPS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]
# detectron2 imports cv2 but leaves the choice of OpenCV wheel to its users.
D2_OPENCV = "opencv-python-headless"
# Bump when the sdist patches change: an installed build with an older level is rebuilt.
# Level 3: only the patches the project needs (no launch, DDP, model-zoo or load_lvis_json ones).
D2_PATCH_LEVEL = 3

LVIS_REQ = "lvis==0.5.3"

# Removed numpy aliases used as types (np.int -> int, ...); np.int64, np.float32, np.bool_ and
# the like do not match.
NP_ALIAS_RE = re.compile(r"np\.(int|float|str|object|bool)\b(?!\d|_)")

TORCH_CHECK = """
import torch, torchvision
from torchvision.ops import nms
keep = nms(torch.tensor([[0., 0., 1., 1.], [0., 0., 1., 1.]]), torch.tensor([1., .5]), 0.5)
assert keep.tolist() == [0], keep
print("torch", torch.__version__, "torchvision", torchvision.__version__)
"""

D2_CHECK = """
import detectron2, detectron2.data, detectron2.evaluation, detectron2.engine
try:
    from detectron2 import _C
    level = getattr(_C, "__regionspot_patch_level__", "native")
except ImportError:
    level = "missing"
print("detectron2", detectron2.__version__, level, detectron2.__file__)
"""

LVIS_CHECK = """
import lvis
from lvis import LVIS, LVISEval, LVISResults
print("lvis", lvis.__file__)
"""

FAST_CHECK = f"""
import importlib.util, re
import torch, torchvision, detectron2.data, detectron2.evaluation, segment_anything, clip, lvis, sam2.build_sam
import lvis.eval
with open(lvis.eval.__file__, encoding="utf-8") as f:
    assert not re.search({NP_ALIAS_RE.pattern!r}, f.read()), "lvis/eval.py is not patched"
assert importlib.util.find_spec("ruff"), "ruff (the test extra) is not installed"
assert importlib.util.find_spec("gradio") and importlib.util.find_spec("playwright"), "the app extra is not installed"
spec = importlib.util.find_spec("regionspot")
print("regionspot", spec.origin if spec else None)
"""


class StepError(RuntimeError):
    """A step failed; carries what to show the user."""

    def __init__(self, step: str, message: str, cmd: list[str] | None = None, tail: str = ""):
        super().__init__(message)
        self.step, self.message, self.cmd, self.tail = step, message, cmd, tail


VERBOSE = False


def say(step: str, message: str) -> None:
    print(f"[install_deps] {step}: {message}", flush=True)


def run(step: str, cmd: list[str], *, cwd: Path | None = None, timeout: float | None = None,
        check: bool = True) -> tuple[int, str]:
    """Run ``cmd`` (output kept, and streamed with --verbose); (exit code, output tail).

    Raises StepError when it fails and ``check`` is set.
    """
    env = dict(os.environ, PYTHONWARNINGS="ignore", PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        if VERBOSE:
            tail: collections.deque[str] = collections.deque(maxlen=60)
            with subprocess.Popen(cmd, cwd=cwd or REPO_ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, errors="replace") as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    print("    " + line, end="", flush=True)
                    tail.append(line.rstrip("\n"))
                rc = proc.wait()
            output = "\n".join(tail)
        else:
            proc = subprocess.run(cmd, cwd=cwd or REPO_ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, errors="replace", timeout=timeout)
            rc, output = proc.returncode, "\n".join(proc.stdout.splitlines()[-60:])
    except subprocess.TimeoutExpired:
        rc, output = 124, f"timed out after {timeout} s"
    except OSError as exc:
        rc, output = 127, f"cannot run {cmd[0]}: {exc}"
    if check and rc != 0:
        raise StepError(step, f"command exited with {rc}", cmd, output)
    return rc, output


def pip(step: str, *args: str, cwd: Path | None = None) -> str:
    return run(step, [sys.executable, "-m", "pip", "install", "--no-input",
                      "--progress-bar", "off", *args], cwd=cwd)[1]


def python_check(code: str, timeout: float = 300) -> tuple[bool, str]:
    """Run ``code`` in a fresh interpreter of this environment.

    Returns (ok, its stdout) when it succeeds, else (False, the tail of stdout and stderr).
    """
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    if proc.returncode == 0:
        return True, proc.stdout
    return False, "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------- torch


def ensure_torch() -> None:
    step = "torch"
    ok, out = python_check(TORCH_CHECK)
    if ok:
        say(step, f"kept the installed pair ({last_line(out)}); its ops run on the CPU")
        return
    say(step, f"no working pair ({last_line(out) or 'not installed'}); installing "
              f"{' '.join(TORCH_PAIR)} (about 3 GB)")
    pip(step, *TORCH_PAIR, SETUPTOOLS)
    ok, out = python_check(TORCH_CHECK)
    if not ok:
        raise StepError(step, "torchvision.ops.nms still fails on the CPU after installing "
                              "the pair", [sys.executable, "-c", "<torch check>"], out)
    say(step, f"installed {last_line(out)}")


# ----------------------------------------------------------------------------- detectron2


def ensure_detectron2(route: str) -> None:
    step = "detectron2"
    ok, out = python_check(D2_CHECK)
    if ok and route == "auto":
        _, version, level, location = last_line(out).split(" ", 3)
        if level == "native" or level == str(D2_PATCH_LEVEL):
            kind = "with its compiled ops" if level == "native" else "sdist build, no C++ ops"
            say(step, f"route keep: detectron2 {version} already importable ({kind}) "
                      f"at {location}")
            return
        if level == "missing":
            say(step, f"detectron2 {version} at {location} has no detectron2._C: reinstalling")
        else:
            say(step, f"the installed sdist build has patch level {level}, this installer's "
                      f"is {D2_PATCH_LEVEL}: rebuilding")
    elif not ok:
        say(step, f"not importable yet ({last_line(out) or 'no output'})")

    if route == "git" or (route == "auto" and github_reachable()):
        say(step, "route git: GitHub is reachable; building the official repository "
                  "(compiles its C++ ops, takes several minutes)")
        try:
            pip(step, "--no-build-isolation", f"git+{D2_GIT_URL}", SETUPTOOLS)
        except StepError as exc:
            if route == "git":
                raise
            say(step, f"route git failed ({exc.message}: {last_line(exc.tail)}); "
                      "falling back to route sdist")
            install_detectron2_from_sdist()
    else:
        why = "GitHub is not reachable" if route == "auto" else "forced"
        say(step, f"route sdist ({why}): building the patched {D2_SDIST_NAME}=="
                  f"{D2_SDIST_VERSION} sdist without C++ ops")
        install_detectron2_from_sdist()
    ok, out = python_check(D2_CHECK)
    if not ok:
        raise StepError(step, "detectron2 does not import after installing it",
                        [sys.executable, "-c", "<detectron2 check>"], out)
    say(step, f"installed {' '.join(last_line(out).split(' ')[:2])}")


def github_reachable(timeout: float = 15.0) -> bool:
    """Quick probe: can git list the official repository's refs?"""
    if shutil.which("git") is None:
        return False
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    try:
        proc = subprocess.run(["git", "ls-remote", "--exit-code", D2_GIT_URL, "HEAD"],
                              capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except (subprocess.TimeoutExpired, OSError):
        return False
    return proc.returncode == 0


def install_detectron2_from_sdist() -> None:
    step = "detectron2"
    D2_BUILD_DIR.mkdir(parents=True, exist_ok=True)
    sdist = cached_sdist()
    if sdist is not None:
        say(step, f"using the cached sdist {sdist.relative_to(REPO_ROOT)}")
        try:
            src = unpack(sdist, D2_BUILD_DIR)
        except (tarfile.TarError, OSError, EOFError) as exc:
            say(step, f"the cached sdist is unreadable ({exc}); downloading it again")
            sdist.unlink()
            sdist = None
    if sdist is None:
        # Preparing its metadata runs its setup.py, which imports torch: no build isolation.
        run(step, [sys.executable, "-m", "pip", "download", "--no-input", "--progress-bar",
                   "off", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
                   f"{D2_SDIST_NAME}=={D2_SDIST_VERSION}", "-d", str(D2_BUILD_DIR)])
        sdist = cached_sdist()
        if sdist is None:
            raise StepError(step, f"pip download left no sdist in {D2_BUILD_DIR}")
        say(step, f"downloaded {sdist.name}")
        try:
            src = unpack(sdist, D2_BUILD_DIR)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise StepError(step, f"cannot unpack {sdist}: {exc}") from exc
    try:
        summary = patch_detectron2_tree(src)
    except PatchError as exc:
        raise StepError(step, f"patching the sdist failed: {exc}") from exc
    say(step, "patched: " + "; ".join(summary))
    run(step, [sys.executable, "-m", "compileall", "-q", str(src)])
    pip(step, "--no-build-isolation", "--no-deps", str(src))
    pip(step, *D2_RUNTIME_DEPS, D2_OPENCV, SETUPTOOLS)


def cached_sdist() -> Path | None:
    found = sorted(D2_BUILD_DIR.glob(f"pb1[-_]detectron2-{D2_SDIST_VERSION}.tar.gz"))
    return found[0] if found else None


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into ``dest`` afresh (patches apply to pristine sources)."""
    with tarfile.open(archive) as tar:
        tops = {Path(name).parts[0] for name in tar.getnames() if name not in ("", ".")}
        if len(tops) != 1:
            raise tarfile.TarError(f"expected one top folder, found {sorted(tops)}")
        src = dest / tops.pop()
        shutil.rmtree(src, ignore_errors=True)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python without PEP 706 filters
            tar.extractall(dest)
    return src


# ----------------------------------------------------------------------------- sdist patches
#
# The patches the project needs, each named for the failure it prevents. Each keeps the exact
# upstream text it replaces (the *_UPSTREAM constants), asserts that it finds that text in the
# unpacked v0.6 sources (so a changed sdist fails loudly here instead of installing half-patched
# code), and tests/test_install_deps.py runs the upstream text to show the failure in this
# environment and the replacement to show it gone.
#
# Not patched, because nothing in the project reaches them: ``launch`` (CUDA-only, NCCL) and
# ``create_ddp_model`` (GPU device_ids): the project has its own launcher and DDP wrapper in
# regionspot/engine/launch.py, and RegionSpotTrainer does not run DefaultTrainer.__init__;
# ``model_zoo`` (pkg_resources, gone in setuptools 81): nothing imports it and SETUPTOOLS stays
# below 81 for clip-anytorch anyway; ``load_lvis_json`` with dataset names without built-in
# metadata: the project calls it with ``dataset_name=None`` on a file with ``coco_url``s only
# (the bundled sample) and reads users' files with its own loader
# (regionspot/data/datasets/user.py).


class PatchError(RuntimeError):
    pass


def replace_once(path: Path, old: str, new: str, why: str) -> None:
    text = path.read_text(encoding="utf-8")
    count = text.count(old)
    if count != 1:
        raise PatchError(f"{path.name}: expected 1 occurrence of {old.strip()[:60]!r} "
                         f"({why}), found {count}")
    path.write_text(text.replace(old, new), encoding="utf-8")


def patch_detectron2_tree(src: Path) -> list[str]:
    pkg = src / "detectron2"
    if not (pkg / "__init__.py").is_file():
        raise PatchError(f"{src} has no detectron2/__init__.py")
    return [
        patch_setup_py_cpp_build_and_name(src),
        patch_c_module_import_error(pkg),
        patch_pillow10_image_linear(pkg),
        patch_numpy124_removed_aliases(src),
        patch_coco_evaluator_needs_c_ops(pkg),
    ]


# What the sdist's setup.py is recognised by: the distribution name (which does not satisfy the
# project's ``detectron2`` requirement) and the C++ extension build (whose sources it lacks).
SETUP_PY_UPSTREAM = ('name="pb1-detectron2"', "ext_modules=get_extensions()")

SDIST_SETUP_PY = '''\
"""detectron2 v0.6 without its C++ ops, written by RegionSpot's scripts/install_deps.py.

Replaces the sdist's setup.py, which is named pb1-detectron2, imports torch, compiles
detectron2/layers/csrc (absent from the sdist) and pins tools that runtime imports do not need
(black==21.4b2, future, pydot, tensorboard). detectron2/_C.py is a placeholder whose compiled
ops raise a clear error.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(
    r"^__version__\\s*=\\s*['\\"]([^'\\"]+)['\\"]",
    (HERE / "detectron2" / "__init__.py").read_text(encoding="utf-8"),
    re.MULTILINE,
).group(1)

# Projects detectron2 installs as detectron2.projects.* (as in its own setup.py).
PROJECTS = {PROJECTS!r}

setup(
    name="detectron2",
    version=VERSION,
    author="FAIR",
    url="https://github.com/facebookresearch/detectron2",
    description="Detectron2 v0.6 (pure-Python build, no compiled ops)",
    license="Apache-2.0",
    python_requires=">=3.7",
    packages=find_packages(exclude=("configs", "tests*")) + list(PROJECTS),
    package_dir=PROJECTS,
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    install_requires={RUNTIME_DEPS!r},
)
'''


def patch_setup_py_cpp_build_and_name(src: Path) -> str:
    """Failure prevented: ``pip install`` of the sdist fails (its setup.py builds a C++
    extension from ``detectron2/layers/csrc/vision.cpp``, which the sdist does not ship), and
    were it built, its distribution name ``pb1-detectron2`` would not satisfy the project's
    ``detectron2`` requirement. The replacement is named ``detectron2``, builds no extension
    (so needs no torch or CUDA_HOME at build time), lists runtime requirements only and keeps
    the model-zoo configs."""
    setup_py = src / "setup.py"
    text = setup_py.read_text(encoding="utf-8")
    for expected in (*SETUP_PY_UPSTREAM, "PROJECTS = {"):
        if expected not in text:
            raise PatchError(f"setup.py: {expected!r} not found; the sdist changed")
    if (src / "detectron2" / "layers" / "csrc").exists():
        raise PatchError("the sdist ships detectron2/layers/csrc: build the ops instead")
    projects = dict(re.findall(r'"(detectron2\.projects\.\w+)":\s*"([^"]+)"', text))
    if not projects:
        raise PatchError("setup.py: no detectron2.projects mapping found")
    for package_dir in projects.values():
        if not (src / package_dir / "__init__.py").is_file():
            raise PatchError(f"setup.py: project package {package_dir} missing")
    if not list((src / "detectron2" / "model_zoo" / "configs").glob("*.yaml")):
        raise PatchError("detectron2/model_zoo/configs has no yaml files")
    setup_py.write_text(SDIST_SETUP_PY.format(PROJECTS=projects, RUNTIME_DEPS=D2_RUNTIME_DEPS),
                        encoding="utf-8")
    # The sdist's own egg-info (named pb1_detectron2) would confuse the metadata build.
    for egg_info in src.glob("*.egg-info"):
        shutil.rmtree(egg_info)
    return "setup.py (name detectron2, no C++ build, runtime deps)"


# The modules that import the compiled ops at load time, and how.
C_MODULE_UPSTREAM = "from detectron2 import _C"
C_MODULE_USERS = ("layers/deform_conv.py", "layers/rotated_boxes.py",
                  "layers/roi_align_rotated.py", "evaluation/fast_eval_api.py")

C_PLACEHOLDER = '''\
"""Placeholder for detectron2's compiled ops (written by RegionSpot's scripts/install_deps.py).

This detectron2 was built from the v0.6 Python sources without its C++/CUDA extension.
Importing ``detectron2._C`` works, so the modules that import it at load time
(layers.deform_conv, layers.rotated_boxes, layers.roi_align_rotated, evaluation.fast_eval_api)
import too; using a compiled op raises a RuntimeError. Unavailable: rotated boxes
(box_iou_rotated, nms_rotated, ROIAlignRotated), deformable convolution and the fast COCO
evaluator (COCOEvaluator is patched to use the official pycocotools one). Everything else,
including nms and roi_align through torchvision, works. Install detectron2 from its official
repository to get the compiled ops.
"""

__regionspot_patch_level__ = {LEVEL}


def get_compiler_version():
    return "none (pure-Python detectron2 build without compiled ops)"


def get_cuda_version():
    return "none (pure-Python detectron2 build without compiled ops)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(
        f"detectron2._C.{{name}} is unavailable: this detectron2 was built without its C++ "
        "ops (rotated boxes, deformable convolution and the fast COCO evaluator are "
        "unavailable). Install detectron2 from https://github.com/facebookresearch/detectron2 "
        "to use them."
    )
'''


def patch_c_module_import_error(pkg: Path) -> str:
    """Failure prevented: ``ImportError: cannot import name '_C' from 'detectron2'`` on
    ``import detectron2.modeling`` (through detectron2.layers) and ``import
    detectron2.evaluation``: four modules import the compiled ``_C`` at load time and the sdist
    has no C++ sources to build it. Adds ``detectron2/_C.py``, a placeholder whose ops raise a
    clear RuntimeError when used (the project uses none of them)."""
    if list(pkg.glob("_C.*")):
        raise PatchError("detectron2/_C already exists in the sdist")
    for user in C_MODULE_USERS:
        if C_MODULE_UPSTREAM not in (pkg / user).read_text(encoding="utf-8"):
            raise PatchError(f"{user} no longer imports detectron2._C")
    (pkg / "_C.py").write_text(C_PLACEHOLDER.format(LEVEL=D2_PATCH_LEVEL), encoding="utf-8")
    return "_C.py placeholder"


# data/transforms/transform.py, ExtentTransform: a default argument, evaluated at import.
PILLOW_LINEAR_UPSTREAM = "    def __init__(self, src_rect, output_size, interp=Image.LINEAR, fill=0):\n"
PILLOW_LINEAR_PATCHED = "    def __init__(self, src_rect, output_size, interp=Image.BILINEAR, fill=0):\n"


def patch_pillow10_image_linear(pkg: Path) -> str:
    """Failure prevented: ``AttributeError: module 'PIL.Image' has no attribute 'LINEAR'`` on
    ``import detectron2.data`` with Pillow >= 10, which removed that alias of BILINEAR (a
    default argument of ExtentTransform, so evaluated when the module loads)."""
    replace_once(pkg / "data" / "transforms" / "transform.py", PILLOW_LINEAR_UPSTREAM,
                 PILLOW_LINEAR_PATCHED, "ExtentTransform's Image.LINEAR default")
    return "Image.LINEAR -> Image.BILINEAR"


# NP_ALIAS_RE (above) finds them. One of the upstream lines it rewrites: data/build.py's
# class histogram, which get_detection_dataset_dicts prints for every dataset the project loads.
NUMPY_ALIAS_UPSTREAM = "    histogram = np.zeros((num_classes,), dtype=np.int)\n"


def patch_numpy124_removed_aliases(src: Path) -> str:
    """Failure prevented: ``AttributeError: module 'numpy' has no attribute 'int'`` (and
    ``float``, ``str``, ``object``) with numpy >= 1.24, which removed those aliases of the
    builtins; first hit by the class histogram of every dataset the project loads
    (data/build.py); also in structures/masks.py, the visualizer and the evaluators. Uses the
    builtins instead (``np.bool``, back in numpy 2, is rewritten to ``bool`` too)."""
    build_py = src / "detectron2" / "data" / "build.py"
    if NUMPY_ALIAS_UPSTREAM not in build_py.read_text(encoding="utf-8"):
        raise PatchError("data/build.py: the class histogram's np.int not found; the sdist changed")
    lines = files = 0
    for path in sorted(src.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        new, n = NP_ALIAS_RE.subn(lambda m: m.group(1), text)
        if n:
            files += 1
            lines += sum(1 for a, b in zip(text.splitlines(), new.splitlines(), strict=True)
                         if a != b)
            path.write_text(new, encoding="utf-8")
    return f"numpy aliases ({lines} lines in {files} files)"


# evaluation/coco_evaluation.py, COCOEvaluator.__init__ (use_fast_impl defaults to True).
COCO_FAST_IMPL_UPSTREAM = "        self._use_fast_impl = use_fast_impl\n"
COCO_FAST_IMPL_PATCHED = (
    "        # Patched (RegionSpot install_deps): no compiled COCOeval_opt in this build.\n"
    "        if use_fast_impl:\n"
    '            self._logger.info("detectron2 has no C++ ops: using the official COCO API")\n'
    "        self._use_fast_impl = False\n"
)


def patch_coco_evaluator_needs_c_ops(pkg: Path) -> str:
    """Failure prevented: ``RuntimeError: detectron2._C.InstanceAnnotation is unavailable``
    from ``COCOEvaluator.evaluate()`` (RegionSpotCOCOEvaluator, for COCO-format datasets):
    ``use_fast_impl`` defaults to True, which selects the compiled COCOeval_opt whenever the
    evaluator keeps 100 detections per image (its default). Uses pycocotools' COCOeval
    instead (same metrics)."""
    replace_once(pkg / "evaluation" / "coco_evaluation.py", COCO_FAST_IMPL_UPSTREAM,
                 COCO_FAST_IMPL_PATCHED, "use_fast_impl assignment")
    return "COCOEvaluator without the compiled evaluator"


# ----------------------------------------------------------------------------- project, lvis

# lvis 0.5.3's eval.py, LVISEval.accumulate (the two lines with removed numpy aliases).
LVIS_NP_FLOAT_UPSTREAM = (
    "                tp_sum = np.cumsum(tps, axis=1).astype(dtype=np.float)\n"
    "                fp_sum = np.cumsum(fps, axis=1).astype(dtype=np.float)\n"
)


def patch_lvis_numpy124_float(eval_py: Path) -> int:
    """Failure prevented: ``AttributeError: module 'numpy' has no attribute 'float'`` from
    ``LVISEval.accumulate()`` (every LVIS evaluation with the default "lvis" backend) with numpy
    >= 1.24. Rewrites the removed aliases in lvis/eval.py to the builtins; returns how many."""
    text = eval_py.read_text(encoding="utf-8")
    new, count = NP_ALIAS_RE.subn(lambda m: m.group(1), text)
    if count:
        eval_py.write_text(new, encoding="utf-8")
    return count


def ensure_project() -> None:
    step = "project"
    pip(step, "-e", ".[test,app,hub-tokenizers,export,onnxruntime]", cwd=REPO_ROOT)
    location = project_location()
    if location is None or PROJECT_PACKAGE_DIR not in [location, *location.parents]:
        raise StepError(step, f"regionspot resolves to {location}, not to {PROJECT_PACKAGE_DIR}")
    ruff_version = [sys.executable, "-m", "ruff", "--version"]
    rc, out = run(step, ruff_version, check=False)
    if rc != 0:
        raise StepError(step, "ruff (the [test] extra) does not run", ruff_version, out)
    say(step, f"installed regionspot (editable, from {location.relative_to(REPO_ROOT)}) "
              f"with its [test] extra (pytest, {last_line(out)}), [app] extra (gradio, playwright), "
              f"[export] (onnx, onnxscript) and [onnxruntime] extras")


CHROMIUM = Path("/usr/bin/chromium")


SKIPPED = "the browser test will be skipped (under CI=true it fails, naming what is missing)"


def ensure_chromium() -> None:
    """Debian's chromium for the web app's browser test (tests/test_app_browser.py), by apt;
    Playwright's own browser download is never used. Run on every run of the installer, the
    up-to-date one included (the stamp does not cover a browser outside the environment). Never
    fails the install: where Chromium cannot be had the browser test is skipped with the reason
    listed (``-rs``), and under ``CI=true`` it fails with one line naming what is missing."""
    step = "chromium"
    if CHROMIUM.exists():
        say(step, f"{CHROMIUM} present (the browser test uses it)")
        return
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        say(step, f"{CHROMIUM} missing and apt-get is not usable as root here: {SKIPPED}")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace",
                                  stdin=subprocess.DEVNULL, timeout=900)
        except (subprocess.TimeoutExpired, OSError) as exc:
            say(step, f"{' '.join(cmd)} failed ({exc}): {SKIPPED}")
            return
        if proc.returncode != 0:
            say(step, f"{' '.join(cmd)} exited with {proc.returncode} ({last_line(proc.stdout + proc.stderr)}): "
                      + SKIPPED)
            return
    say(step, f"installed Debian's chromium ({CHROMIUM})" if CHROMIUM.exists() else
              f"apt-get installed chromium but {CHROMIUM} is still missing: {SKIPPED}")


def project_location() -> Path | None:
    ok, out = python_check("import importlib.util as u; s = u.find_spec('regionspot'); "
                           "print(s.submodule_search_locations[0] if s else '')")
    line = last_line(out)
    return Path(line).resolve() if ok and line else None


SAM2_REQ = "sam2==1.1.0"


def ensure_sam2() -> None:
    step = "sam2"
    ok, out = python_check("import importlib.metadata as m; print(m.version('sam2'))")
    if ok and last_line(out) == SAM2_REQ.split("==")[1]:
        say(step, f"sam2 {last_line(out)} already installed")
    else:
        os.environ["SAM2_BUILD_CUDA"] = "0"  # no CUDA extension (see the module docstring)
        pip(step, "--no-deps", "--no-build-isolation", SAM2_REQ)
        say(step, f"installed {SAM2_REQ} with --no-deps, without its CUDA extension")
    ok, out = python_check("import sam2.build_sam, sam2.sam2_image_predictor, sam2.automatic_mask_generator")
    if not ok:
        raise StepError(step, "sam2 does not import", [sys.executable, "-c", "import sam2..."], out)


def ensure_lvis() -> None:
    step = "lvis"
    ok, out = python_check("import importlib.metadata as m; print(m.version('lvis'))")
    if ok:
        say(step, f"lvis {last_line(out)} already installed")
    else:
        pip(step, "--no-deps", LVIS_REQ)
        say(step, f"installed {LVIS_REQ} with --no-deps")
    ok, out = python_check("import importlib.util as u; "
                           "print(u.find_spec('lvis').submodule_search_locations[0])")
    if not ok:
        raise StepError(step, "cannot locate the lvis package", None, out)
    eval_py = Path(last_line(out)) / "eval.py"
    try:
        count = patch_lvis_numpy124_float(eval_py)
    except OSError as exc:
        raise StepError(step, f"cannot patch {eval_py}: {exc}") from exc
    if count:
        say(step, f"patched {count} removed numpy alias(es) in {eval_py}")
    else:
        say(step, f"{eval_py.name} already free of removed numpy aliases")
    ok, out = python_check(LVIS_CHECK)
    if not ok:
        raise StepError(step, "lvis does not import", [sys.executable, "-c", "<lvis check>"],
                        out)


# ----------------------------------------------------------------------------- main


def stamp_value() -> str:
    digest = hashlib.sha256()
    for path in (REPO_ROOT / "setup.py", Path(__file__).resolve()):
        digest.update(path.read_bytes())
    digest.update(str(REPO_ROOT).encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def up_to_date() -> bool:
    try:
        if STAMP_FILE.read_text(encoding="utf-8").strip() != stamp_value():
            return False
    except OSError:
        return False
    ok, out = python_check(FAST_CHECK)
    if not ok:
        return False
    location = last_line(out).split(" ", 1)[-1]
    return location != "None" and Path(location).resolve().is_relative_to(PROJECT_PACKAGE_DIR)


def main(argv: list[str] | None = None) -> int:
    global VERBOSE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="run every step despite the stamp")
    parser.add_argument("--verbose", "-v", action="store_true", help="stream pip's output")
    parser.add_argument("--detectron2-route", choices=("auto", "git", "sdist"), default="auto",
                        help="auto: keep, else git where GitHub is reachable, else sdist")
    args = parser.parse_args(argv)
    VERBOSE = args.verbose

    start = time.monotonic()
    say("env", f"python {sys.version.split()[0]} at {sys.executable} (prefix {sys.prefix})")
    if sys.version_info < (3, 10):  # noqa: UP036 (run by any python3)
        print("[install_deps] FAILED: RegionSpot needs Python >= 3.10", file=sys.stderr)
        return 1
    if not args.force and args.detectron2_route == "auto" and up_to_date():
        ensure_chromium()  # outside the environment: checked on every run
        say("env", f"environment up to date ({time.monotonic() - start:.1f} s)")
        return 0

    try:
        STAMP_FILE.unlink(missing_ok=True)
        ensure_torch()
        ensure_detectron2(args.detectron2_route)
        ensure_project()
        ensure_chromium()
        ensure_lvis()
        ensure_sam2()
        ok, out = python_check(FAST_CHECK)
        if not ok:
            raise StepError("final check", "the installed stack does not import",
                            [sys.executable, "-c", "<import check>"], out)
    except StepError as exc:
        print(f"[install_deps] FAILED at step '{exc.step}': {exc.message}", file=sys.stderr)
        if exc.cmd:
            print(f"[install_deps] command: {' '.join(exc.cmd)}", file=sys.stderr)
        if exc.tail:
            print("[install_deps] last lines of its output:\n"
                  + textwrap.indent(exc.tail, "    "), file=sys.stderr)
        return 1
    try:
        STAMP_FILE.write_text(stamp_value() + "\n", encoding="utf-8")
    except OSError as exc:
        say("env", f"could not write the stamp {STAMP_FILE} ({exc}): re-runs will redo the checks")
    say("env", f"done in {time.monotonic() - start:.0f} s; stamp written to {STAMP_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
