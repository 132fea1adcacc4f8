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
   below, and installed as a distribution named ``detectron2`` without compiled ops. The
   patches (each function's docstring says why): our own setup.py; a ``detectron2/_C.py``
   placeholder; Pillow>=10 (``Image.LINEAR``); numpy>=1.24 (``np.float`` & co.);
   setuptools>=81 (``pkg_resources`` in the model zoo); ``launch`` on CPU with gloo and a
   clean worker exit; DDP of CPU models; COCOEvaluator without the compiled evaluator;
   ``load_lvis_json`` for dataset names without built-in metadata.
3. the project itself: ``pip install -e '.[test]'``.
4. lvis: ``lvis==0.5.3`` installed with ``--no-deps`` (its metadata pulls ``opencv-python``,
   which clashes with ``opencv-python-headless``), then its numpy>=1.24 breakage patched in
   site-packages. It runs after the project step, which brings its real runtime deps.

A stamp file in the environment (``sys.prefix``) records a hash of ``setup.py`` and this
script; when it matches and a quick import check passes, a re-run only prints
"environment up to date". Nothing is written into git-tracked paths, apart from the
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
D2_PATCH_LEVEL = 2

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
import torch, torchvision, detectron2.data, detectron2.evaluation, segment_anything, clip, lvis
import lvis.eval
with open(lvis.eval.__file__, encoding="utf-8") as f:
    assert not re.search({NP_ALIAS_RE.pattern!r}, f.read()), "lvis/eval.py is not patched"
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
# Each patch edits the unpacked v0.6 sources and asserts that it found what it edits, so a
# changed sdist fails loudly here instead of installing half-patched code.


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
        patch_setup_py(src),
        patch_add_c_placeholder(pkg),
        patch_pillow_linear(src),
        patch_numpy_aliases(src),
        patch_model_zoo_pkg_resources(pkg),
        patch_launch_cpu(pkg),
        patch_ddp_cpu(pkg),
        patch_coco_evaluator(pkg),
        patch_lvis_loader(pkg),
    ]


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


def patch_setup_py(src: Path) -> str:
    """Replace the sdist's setup.py: distribution name ``detectron2``, no extension build (and
    so no torch/CUDA_HOME at build time), runtime requirements only, model-zoo configs kept."""
    setup_py = src / "setup.py"
    text = setup_py.read_text(encoding="utf-8")
    for expected in ('name="pb1-detectron2"', "ext_modules=get_extensions()", "PROJECTS = {"):
        if expected not in text:
            raise PatchError(f"setup.py: {expected!r} not found; the sdist changed")
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


def patch_add_c_placeholder(pkg: Path) -> str:
    """Add ``detectron2/_C.py``: four modules import ``_C`` at load time; the sdist has no
    C++ sources to build it from."""
    if list(pkg.glob("_C.*")):
        raise PatchError("detectron2/_C already exists in the sdist")
    if (pkg / "layers" / "csrc").exists():
        raise PatchError("the sdist ships detectron2/layers/csrc: build the ops instead")
    for user in ("layers/deform_conv.py", "layers/rotated_boxes.py",
                 "layers/roi_align_rotated.py", "evaluation/fast_eval_api.py"):
        if "from detectron2 import _C" not in (pkg / user).read_text(encoding="utf-8"):
            raise PatchError(f"{user} no longer imports detectron2._C")
    (pkg / "_C.py").write_text(C_PLACEHOLDER.format(LEVEL=D2_PATCH_LEVEL), encoding="utf-8")
    return "_C.py placeholder"


def _sub_all(src: Path, pattern: re.Pattern[str], repl) -> tuple[int, int]:
    lines = files = 0
    for path in sorted(src.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        new, n = pattern.subn(repl, text)
        if n:
            files += 1
            lines += sum(1 for a, b in zip(text.splitlines(), new.splitlines(), strict=True)
                         if a != b)
            path.write_text(new, encoding="utf-8")
    return lines, files


def patch_pillow_linear(src: Path) -> str:
    """Pillow 10 removed ``Image.LINEAR`` (an alias of BILINEAR); it is a default argument in
    data/transforms/transform.py, so ``import detectron2.data`` fails without this."""
    lines, files = _sub_all(src, re.compile(r"\bImage\.LINEAR\b"), "Image.BILINEAR")
    if not lines:
        raise PatchError("no Image.LINEAR found; the sdist changed")
    return f"Image.LINEAR ({lines} line(s))"


def patch_numpy_aliases(src: Path) -> str:
    """numpy 1.24 removed ``np.int``, ``np.float``, ``np.str``, ``np.object`` (and deprecated
    ``np.bool`` until 2.0); use the builtins (data/build.py's class histogram is hit by every
    training loader)."""
    lines, files = _sub_all(src, NP_ALIAS_RE, lambda m: m.group(1))
    if not lines:
        raise PatchError("no removed numpy aliases found; the sdist changed")
    return f"numpy aliases ({lines} lines in {files} files)"


def patch_model_zoo_pkg_resources(pkg: Path) -> str:
    """setuptools 81 dropped ``pkg_resources``; find the bundled configs next to the module."""
    path = pkg / "model_zoo" / "model_zoo.py"
    replace_once(path, "import pkg_resources\n", "", "pkg_resources import")
    replace_once(
        path,
        '    cfg_file = pkg_resources.resource_filename(\n'
        '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
        '    )\n',
        '    # Patched (RegionSpot install_deps): pkg_resources is gone in setuptools>=81.\n'
        '    cfg_file = os.path.join(\n'
        '        os.path.dirname(os.path.abspath(__file__)), "configs", config_path\n'
        '    )\n',
        "resource_filename call",
    )
    return "model_zoo without pkg_resources"


def patch_launch_cpu(pkg: Path) -> str:
    """``launch`` asserts CUDA and hard-codes NCCL, so ``--num-gpus N`` cannot start on a CPU
    machine: use gloo there. At exit, a worker that used ``comm.all_gather`` can abort
    ("terminate called without an active exception", about 1 run in 7) because the cached
    global gloo group outlives the process group: clear that cache, then destroy the group."""
    path = pkg / "engine" / "launch.py"
    replace_once(
        path,
        '    assert torch.cuda.is_available(), "cuda is not available. Please check your '
        'installation."\n',
        '    # Patched (RegionSpot install_deps): fall back to gloo on machines without CUDA.\n'
        '    has_gpu = torch.cuda.is_available()\n',
        "CUDA assertion",
    )
    replace_once(path, '            backend="NCCL",\n',
                 '            backend="NCCL" if has_gpu else "GLOO",\n', "NCCL backend")
    replace_once(
        path,
        "    assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "    torch.cuda.set_device(local_rank)\n",
        "    if has_gpu:\n"
        "        assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "        torch.cuda.set_device(local_rank)\n",
        "set_device",
    )
    replace_once(
        path,
        "    comm.synchronize()\n\n    main_func(*args)\n",
        "    comm.synchronize()\n\n"
        "    main_func(*args)\n"
        "    # Patched (RegionSpot install_deps): release the cached gloo group before the\n"
        "    # process group, else the worker can abort at exit after comm.all_gather.\n"
        "    comm._get_global_gloo_group.cache_clear()\n"
        "    comm._LOCAL_PROCESS_GROUP = None\n"
        "    dist.destroy_process_group()\n",
        "worker's main_func call",
    )
    comm_py = (pkg / "utils" / "comm.py").read_text(encoding="utf-8")
    if "@functools.lru_cache()\ndef _get_global_gloo_group():" not in comm_py:
        raise PatchError("utils/comm.py: _get_global_gloo_group is no longer an lru_cache")
    return "launch on CPU with gloo, clean worker exit"


def patch_ddp_cpu(pkg: Path) -> str:
    """``create_ddp_model`` always passes ``device_ids=[local_rank]``, which DDP rejects for a
    model on the CPU: pass it only for CUDA models, so CPU workers from ``launch`` can train."""
    replace_once(
        pkg / "engine" / "defaults.py",
        '    if "device_ids" not in kwargs:\n',
        '    # Patched (RegionSpot install_deps): device_ids only for models on CUDA.\n'
        '    if "device_ids" not in kwargs and any(p.is_cuda for p in model.parameters()):\n',
        "create_ddp_model device_ids",
    )
    return "create_ddp_model for CPU models"


def patch_coco_evaluator(pkg: Path) -> str:
    """``COCOEvaluator`` defaults to ``use_fast_impl=True``, the compiled COCOeval_opt this
    build lacks: use the official pycocotools implementation instead (same metrics)."""
    replace_once(
        pkg / "evaluation" / "coco_evaluation.py",
        "        self._use_fast_impl = use_fast_impl\n",
        "        # Patched (RegionSpot install_deps): no compiled COCOeval_opt in this build.\n"
        "        if use_fast_impl:\n"
        '            self._logger.info("detectron2 has no C++ ops: using the official COCO API")\n'
        "        self._use_fast_impl = False\n",
        "use_fast_impl assignment",
    )
    return "COCOEvaluator without the compiled evaluator"


def patch_lvis_loader(pkg: Path) -> str:
    """``load_lvis_json(..., dataset_name)`` raises for names without built-in LVIS metadata;
    use what is registered in MetadataCatalog instead (else the JSON's own categories). Images
    without ``coco_url`` (custom LVIS-format files) use their ``file_name``."""
    path = pkg / "data" / "datasets" / "lvis.py"
    replace_once(
        path,
        "    if dataset_name is not None:\n"
        "        meta = get_lvis_instances_meta(dataset_name)\n"
        "        MetadataCatalog.get(dataset_name).set(**meta)\n",
        "    if dataset_name is not None:\n"
        "        meta = _lvis_meta_or_registered(dataset_name, lvis_api)\n",
        "built-in metadata lookup",
    )
    replace_once(
        path,
        '        split_folder, file_name = img_dict["coco_url"].split("/")[-2:]\n',
        '        if "coco_url" not in img_dict:  # Patched (RegionSpot): custom LVIS-format file\n'
        '            return os.path.join(img_root, img_dict["file_name"])\n'
        '        split_folder, file_name = img_dict["coco_url"].split("/")[-2:]\n',
        "coco_url file name",
    )
    replace_once(
        path,
        "def get_lvis_instances_meta(dataset_name):\n",
        '''def _lvis_meta_or_registered(dataset_name, lvis_api):
    """Patched in by RegionSpot's install_deps: metadata for ``dataset_name``.

    Built-in LVIS/COCO metadata when the name has it (as before); otherwise what is already
    registered in MetadataCatalog, adding ``thing_classes`` from the JSON's categories when
    none is registered and their ids are 1..N (the ids ``load_lvis_json`` shifts by one).
    """
    catalog_meta = MetadataCatalog.get(dataset_name)
    try:
        meta = get_lvis_instances_meta(dataset_name)
    except ValueError:
        meta = catalog_meta.as_dict()
        if "thing_classes" not in meta:
            cats = sorted(lvis_api.load_cats(None), key=lambda c: c["id"])
            if [c["id"] for c in cats] == list(range(1, len(cats) + 1)):
                catalog_meta.set(thing_classes=[c["name"] for c in cats])
            else:
                logger.warning(
                    "No built-in metadata for {} and its category ids are not 1..N: "
                    "thing_classes not set".format(dataset_name)
                )
        return meta
    catalog_meta.set(**meta)
    return meta


def get_lvis_instances_meta(dataset_name):
''',
        "get_lvis_instances_meta definition",
    )
    return "load_lvis_json for custom dataset names"


# ----------------------------------------------------------------------------- project, lvis


def ensure_project() -> None:
    step = "project"
    pip(step, "-e", ".[test]", cwd=REPO_ROOT)
    location = project_location()
    if location is None or PROJECT_PACKAGE_DIR not in [location, *location.parents]:
        raise StepError(step, f"regionspot resolves to {location}, not to {PROJECT_PACKAGE_DIR}")
    say(step, f"installed regionspot (editable, from {location.relative_to(REPO_ROOT)}) "
              "with its [test] extra")


def project_location() -> Path | None:
    ok, out = python_check("import importlib.util as u; s = u.find_spec('regionspot'); "
                           "print(s.submodule_search_locations[0] if s else '')")
    line = last_line(out)
    return Path(line).resolve() if ok and line else None


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
        text = eval_py.read_text(encoding="utf-8")
        new, count = NP_ALIAS_RE.subn(lambda m: m.group(1), text)
        if count:
            eval_py.write_text(new, encoding="utf-8")
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
        say("env", f"environment up to date ({time.monotonic() - start:.1f} s)")
        return 0

    try:
        STAMP_FILE.unlink(missing_ok=True)
        ensure_torch()
        ensure_detectron2(args.detectron2_route)
        ensure_project()
        ensure_lvis()
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
