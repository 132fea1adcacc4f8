#!/usr/bin/env python3
"""Build and check the offline wheel bundle for a bare GPU machine (``tools/gpu/make_wheelhouse.sh``).

    python tools/gpu/wheelhouse.py build  [--out wheels] [--limit-mib 55]
    python tools/gpu/wheelhouse.py verify [--out wheels] [--python /path/to/python3.12]
    python tools/gpu/wheelhouse.py plan          # the requirements it would build, nothing else

The GPU machine this is for has Python 3.12, PyTorch with CUDA, torchvision, numpy,
opencv-python-headless, scikit-image, pytest and matplotlib (and what those depend on:
:data:`GPU_PROVIDED`), no network, and receives the working tree and at most 64 MiB in all.
``build`` writes, on a machine that reaches the package registry, every other runtime
dependency as a wheel for CPython 3.12 on manylinux x86_64 into ``--out`` (git-ignored):

* the project's ``install_requires`` read from ``setup.py`` (parsed, not run; extras such as
  ``[test]`` or ``[app]`` are not followed), minus :data:`GPU_PROVIDED`, followed transitively
  through each wheel's own ``Requires-Dist`` (markers evaluated for CPython 3.12 on Linux x86_64;
  several requirements on one package are combined, and a wheel that no longer satisfies them
  is replaced);
* what ``scripts/install_deps.py`` installs outside ``setup.py``, built as that installer builds
  it, with its functions: detectron2 from the ``pb1-detectron2`` 0.6 sdist patched by
  ``patch_detectron2_tree`` (a pure-Python wheel, no compiled ops), and lvis (``LVIS_REQ``,
  its own dependencies not followed, as the installer's ``--no-deps``) with
  ``patch_lvis_numpy124_float`` applied inside the wheel;
* the project itself (``pip wheel --no-deps .``).

A package with a cp312 manylinux x86_64 (or pure) wheel on the registry is downloaded as that
wheel; one with only an sdist is built into a wheel here (environment ``SAM2_BUILD_CUDA=0`` so
that SAM 2 builds without its CUDA extension), which must come out pure Python. The total must
stay under ``--limit-mib`` (55 MiB by default, under the 64 MiB the GPU machine receives with
the working tree). ``manifest.json`` in ``--out`` lists each wheel, its size, sha256, version and
which requirement brought it in.

``verify`` checks a bundle here: every wheel is pure Python or tagged for CPython 3.12
manylinux x86_64; the total is under the limit; ``pip install --no-index --no-deps --target DIR``
with ``--python`` (a Python 3.12) succeeds; and every top-level module of the bundle is imported
there in a fresh interpreter. A module whose import stops at a package the GPU machine provides
(torch, numpy, cv2, ...; absent from a bare Python 3.12 here) is reported as "needs the GPU
machine's packages"; any other failure fails the check. Importing everything with torch is
the GPU check's first step (``tools/gpu/check.sh``).

Exit status: 0 when the bundle was built / verified, 1 on a failure (one line saying what), 2
on bad options.
"""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "wheels"
DEFAULT_LIMIT_MIB = 55.0

# What the bare GPU machine has: the packages it is described with, and what they depend on
# (torch: filelock, typing-extensions, sympy/mpmath, networkx, jinja2/markupsafe, fsspec, triton,
# the nvidia-* and cuda-* libraries; matplotlib: contourpy, cycler, fonttools, kiwisolver,
# packaging, pillow, pyparsing, python-dateutil, six; scikit-image: scipy, imageio, tifffile,
# lazy-loader; pytest: iniconfig, pluggy, pygments). Shipping one of these would shadow the
# machine's own build (PYTHONPATH comes first), so none is bundled. setuptools is NOT here: the
# project pins it below 81 (clip-anytorch needs pkg_resources), so the bundle brings its own.
GPU_PROVIDED = frozenset(canonicalize_name(n) for n in (
    "torch", "torchvision", "numpy", "opencv-python-headless", "scikit-image", "pytest", "matplotlib",
    "filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "triton",
    "contourpy", "cycler", "fonttools", "kiwisolver", "packaging", "pillow", "pyparsing", "python-dateutil",
    "six", "scipy", "imageio", "tifffile", "lazy-loader", "iniconfig", "pluggy", "pygments",
))
GPU_PROVIDED_PREFIXES = ("nvidia-", "cuda-")
# Import names of GPU_PROVIDED packages (a bundled module that stops at one of these imports on
# the GPU machine, not here).
GPU_PROVIDED_MODULES = frozenset((
    "torch", "torchvision", "numpy", "cv2", "skimage", "pytest", "matplotlib", "filelock", "typing_extensions",
    "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "triton", "contourpy", "cycler",
    "fontTools", "kiwisolver", "packaging", "PIL", "pyparsing", "dateutil", "six", "scipy", "imageio", "tifffile",
    "lazy_loader", "iniconfig", "pluggy", "pygments", "_pytest",
))

# The target: CPython 3.12 on Linux x86_64 (markers, and the tags pip downloads for).
TARGET_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.12.1", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
    "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.1",
    "python_version": "3.12", "sys_platform": "linux", "extra": "",
}
# pip (23) does not widen a manylinux_2_28 platform to the older ones: each is named.
PIP_TARGET_ARGS = ["--python-version", "3.12", "--implementation", "cp",
                   *[arg for glibc in range(28, 16, -1) for arg in ("--platform", f"manylinux_2_{glibc}_x86_64")],
                   "--platform", "manylinux2014_x86_64", "--platform", "manylinux2010_x86_64",
                   "--platform", "manylinux1_x86_64"]
# Environment of every build: SAM 2's setup.py builds its CUDA extension unless told not to.
BUILD_ENV = {"SAM2_BUILD_CUDA": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONWARNINGS": "ignore"}

MANYLINUX_RE = re.compile(r"^(manylinux1|manylinux2010|manylinux2014|manylinux_\d+_\d+)_x86_64$")


class BundleError(RuntimeError):
    """A step of building or checking the bundle failed (one line for the user)."""


def say(message: str) -> None:
    print(f"[wheelhouse] {message}", flush=True)


# ----------------------------------------------------------------------------- declarations
def load_install_deps():
    """``scripts/install_deps.py`` as a module (its constants and patch functions)."""
    path = REPO / "scripts" / "install_deps.py"
    spec = importlib.util.spec_from_file_location("regionspot_install_deps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup_py_requirements(setup_py: Path = REPO / "setup.py") -> list[str]:
    """The ``install_requires`` strings of ``setup.py``, read by parsing it (never run, never the
    ``extras_require``). Raises BundleError when the list is not a literal."""
    tree = ast.parse(setup_py.read_text(encoding="utf-8"), filename=str(setup_py))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for kw in node.keywords:
                if kw.arg == "install_requires":
                    try:
                        value = ast.literal_eval(kw.value)
                    except ValueError as exc:
                        raise BundleError(f"{setup_py}: install_requires is not a literal list") from exc
                    return [str(v) for v in value]
    raise BundleError(f"{setup_py}: no setup(install_requires=...) found")


def provided(name: str) -> bool:
    """Whether the GPU machine already has the distribution ``name``."""
    name = canonicalize_name(name)
    return name in GPU_PROVIDED or name.startswith(GPU_PROVIDED_PREFIXES)


def applies(req: Requirement) -> bool:
    """Whether ``req`` applies on the target (its marker, with no extra requested)."""
    return req.marker is None or req.marker.evaluate(dict(TARGET_ENV))


def plan(install_deps=None) -> dict:
    """What ``build`` starts from: {"requirements": setup.py's install_requires that the GPU
    machine lacks (detectron2 and lvis handled apart), "special": {"detectron2": sdist,
    "lvis": requirement}, "provided": the ones the machine has}."""
    install_deps = install_deps or load_install_deps()
    reqs, skipped = [], []
    for text in setup_py_requirements():
        req = Requirement(text)
        if not applies(req):
            continue
        name = canonicalize_name(req.name)
        if provided(name):
            skipped.append(text)
        elif name in ("detectron2", "lvis"):
            continue  # built as scripts/install_deps.py builds them
        else:
            reqs.append(text)
    return {"requirements": reqs, "provided": skipped,
            "special": {"detectron2": f"{install_deps.D2_SDIST_NAME}=={install_deps.D2_SDIST_VERSION} (patched sdist)",
                        "lvis": install_deps.LVIS_REQ}}


# ----------------------------------------------------------------------------- wheel files
def wheel_tags_ok(filename: str) -> tuple[bool, str]:
    """Whether a wheel installs on CPython 3.12 / manylinux x86_64: every tag set of its name is
    pure (``py3``/``cp312``-``none``-``any``) or ``cp312``/``abi3`` on a manylinux x86_64
    platform. Returns (ok, why not)."""
    try:
        _, _, _, tags = parse_wheel_filename(filename)
    except Exception as exc:  # packaging's InvalidWheelFilename
        return False, f"not a wheel file name ({exc})"
    good = []
    for tag in tags:
        interp_ok = tag.interpreter in ("py3", "py312", "cp312") or (
            tag.abi == "abi3" and re.fullmatch(r"cp3(\d+)", tag.interpreter) is not None
            and int(tag.interpreter[3:]) <= 12)
        if tag.platform == "any":
            good.append(interp_ok and tag.abi == "none")
        else:
            good.append(interp_ok and tag.abi in ("cp312", "abi3", "none") and bool(MANYLINUX_RE.match(tag.platform)))
    if any(good):
        return True, ""
    return False, "tags " + ".".join(sorted({str(t) for t in tags})) + " are neither pure nor cp312 manylinux x86_64"


def wheel_metadata(path: Path) -> dict:
    """{"name", "version", "requires": [Requires-Dist strings], "top_level": [import names]}."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        meta_name = next((n for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if meta_name is None:
            raise BundleError(f"{path.name}: no .dist-info/METADATA")
        from email.parser import Parser

        meta = Parser().parsestr(zf.read(meta_name).decode("utf-8", "replace"))
        dist_info = meta_name.split("/")[0]
        top_txt = f"{dist_info}/top_level.txt"
        top = set()
        if top_txt in names:
            top = {line.strip() for line in zf.read(top_txt).decode().splitlines() if line.strip()}
        if not top:
            for n in names:
                first = n.split("/")[0]
                if first.endswith((".dist-info", ".data")):
                    continue
                if "/" in n and n.split("/")[1] == "__init__.py":
                    top.add(first)
                elif "/" not in n and n.endswith(".py"):
                    top.add(n[:-3])
                elif "/" not in n and n.endswith(".so"):
                    top.add(n.split(".")[0])
    top = sorted(t.replace("/", ".") for t in top if t and not t.startswith("_") and t not in ("tests", "test"))
    return {"name": canonicalize_name(meta["Name"]), "version": meta["Version"],
            "requires": list(meta.get_all("Requires-Dist") or []), "top_level": top}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def patch_wheel(path: Path, member_suffix: str, patch) -> int:
    """Rewrite the member of wheel ``path`` whose name ends with ``member_suffix`` with
    ``patch(text) -> (new_text, count)``, and its line in RECORD (hash, size); returns the count.
    The wheel is replaced atomically."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        data = {i.filename: zf.read(i.filename) for i in infos}
    targets = [n for n in data if n.endswith(member_suffix)]
    if len(targets) != 1:
        raise BundleError(f"{path.name}: expected one member ending with {member_suffix}, found {targets}")
    member = targets[0]
    new_text, count = patch(data[member].decode("utf-8"))
    if not count:
        return 0
    data[member] = new_text.encode("utf-8")
    record = next(n for n in data if n.endswith(".dist-info/RECORD"))
    rows = list(csv.reader(io.StringIO(data[record].decode("utf-8"))))
    digest = base64.urlsafe_b64encode(hashlib.sha256(data[member]).digest()).rstrip(b"=").decode()
    for row in rows:
        if row and row[0] == member:
            row[1:3] = [f"sha256={digest}", str(len(data[member]))]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    data[record] = buf.getvalue().encode("utf-8")
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for info in infos:
            zf.writestr(info, data[info.filename], compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)
    return count


# ----------------------------------------------------------------------------- build
def pip(*args: str, cwd: Path | None = None, python: str | None = None) -> str:
    cmd = [python or sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=dict(os.environ, **BUILD_ENV), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise BundleError(f"`{' '.join(cmd[2:])}` exited with {proc.returncode}:\n{tail}")
    return proc.stdout


def _new_file(folder: Path, before: set, pattern: str) -> Path:
    new = sorted(set(folder.glob(pattern)) - before)
    if len(new) != 1:
        raise BundleError(f"expected one new {pattern} in {folder}, found {[p.name for p in new]}")
    return new[0]


def fetch_wheel(req: Requirement, out: Path, work: Path) -> Path:
    """A wheel for ``req`` in ``out``: the registry's cp312 manylinux x86_64 / pure wheel, else
    its sdist built here into a wheel (which must be pure)."""
    spec = f"{req.name}{req.specifier}"
    before = set(out.glob("*.whl"))
    try:
        pip("download", "--no-deps", "--only-binary=:all:", *PIP_TARGET_ARGS, "-d", str(out), spec)
        return _new_file(out, before, "*.whl")
    except BundleError as binary_error:
        if "No matching distribution" not in str(binary_error) and "Could not find a version" not in str(binary_error):
            raise
    sdists = work / "sdists"
    sdists.mkdir(parents=True, exist_ok=True)
    before_sdists = set(sdists.iterdir())
    pip("download", "--no-deps", "--no-binary", ":all:", "-d", str(sdists), spec)
    sdist = _new_file(sdists, before_sdists, "*")
    pip("wheel", "--no-deps", "-w", str(out), str(sdist))
    wheel = _new_file(out, before, "*.whl")
    if not wheel.name.endswith("-none-any.whl"):
        wheel.unlink()
        raise BundleError(f"{req.name} has no cp312 manylinux wheel and its sdist built a platform wheel "
                          f"({wheel.name}); the GPU machine cannot build it")
    say(f"built {wheel.name} from its sdist")
    return wheel


def build_sam2(install_deps, out: Path, work: Path) -> Path:
    """sam2 (``SAM2_REQ``) as the installer installs it: its sdist built with this environment's
    torch (``--no-build-isolation``: its build asks for torch, which an isolated build would
    download) and ``SAM2_BUILD_CUDA=0`` (no CUDA extension, so the wheel is pure Python); its
    own requirements are not followed (``--no-deps``: its iopath pin clashes with detectron2's,
    see scripts/install_deps.py), setup.py declares the ones RegionSpot needs."""
    for old in out.glob("sam2-*.whl"):
        old.unlink()
    sdists = work / "sdists"
    sdists.mkdir(parents=True, exist_ok=True)
    before_sdists, before = set(sdists.iterdir()), set(out.glob("*.whl"))
    pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(sdists),
        install_deps.SAM2_REQ)
    sdist = _new_file(sdists, before_sdists, "*")
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(sdist))
    wheel = _new_file(out, before, "*.whl")
    if not wheel.name.endswith("-none-any.whl"):
        raise BundleError(f"sam2 built a platform wheel ({wheel.name}): SAM2_BUILD_CUDA=0 was not honoured")
    say(f"built {wheel.name} from its sdist (no CUDA extension)")
    return wheel


def build_detectron2(install_deps, out: Path, work: Path) -> Path:
    """detectron2 as scripts/install_deps.py builds it (patched pb1-detectron2 0.6 sdist, no
    compiled ops), packed as a pure wheel."""
    d2_dir = work / "detectron2"
    d2_dir.mkdir(parents=True, exist_ok=True)
    sdist_name = f"{install_deps.D2_SDIST_NAME}=={install_deps.D2_SDIST_VERSION}"
    cached = sorted(install_deps.D2_BUILD_DIR.glob(f"pb1[-_]detectron2-{install_deps.D2_SDIST_VERSION}.tar.gz"))
    if cached:
        sdist = cached[0]
        say(f"detectron2: using the installer's cached sdist {sdist}")
    else:
        # Preparing its metadata runs its setup.py, which imports torch: no build isolation.
        before = set(d2_dir.glob("*.tar.gz"))
        pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(d2_dir), sdist_name)
        sdist = _new_file(d2_dir, before, "*.tar.gz")
    src = install_deps.unpack(sdist, d2_dir)
    summary = install_deps.patch_detectron2_tree(src)
    say("detectron2: patched " + "; ".join(summary))
    for old in out.glob("detectron2-*.whl"):
        old.unlink()
    before = set(out.glob("*.whl"))
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src))
    return _new_file(out, before, "detectron2-*.whl")


def build_lvis(install_deps, out: Path, work: Path) -> Path:
    """lvis (``LVIS_REQ``) with the installer's numpy>=1.24 patch applied inside its wheel."""
    for old in out.glob("lvis-*.whl"):
        old.unlink()
    wheel = fetch_wheel(Requirement(install_deps.LVIS_REQ), out, work)
    count = patch_wheel(wheel, "lvis/eval.py", lambda text: install_deps.NP_ALIAS_RE.subn(lambda m: m.group(1), text))
    say(f"lvis: patched {count} removed numpy alias(es) in lvis/eval.py inside {wheel.name}")
    return wheel


def build_project(out: Path) -> Path:
    for old in out.glob("regionspot-*.whl"):
        old.unlink()
    before = set(out.glob("*.whl"))
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO))
    shutil.rmtree(REPO / "build" / "lib", ignore_errors=True)
    shutil.rmtree(REPO / "build" / "bdist.linux-x86_64", ignore_errors=True)
    return _new_file(out, before, "regionspot-*.whl")


def total_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.whl"))


def build(out: Path, limit_mib: float) -> dict:
    """Build the bundle into ``out`` (wheels already there that still satisfy the requirements are
    kept, others removed) and write ``out/manifest.json``; returns the manifest."""
    install_deps = load_install_deps()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="regionspot-wheelhouse-"))
    p = plan(install_deps)
    say(f"from setup.py: {len(p['requirements'])} requirements to bundle, provided by the GPU machine: "
        + ", ".join(p["provided"]))
    entries: dict[str, dict] = {}  # name -> {"file", "version", "required_by", "specifier", "deps"}

    def record(wheel: Path, required_by: str, follow: bool) -> None:
        meta = wheel_metadata(wheel)
        entry = entries.setdefault(meta["name"], {"required_by": []})
        entry.update(file=wheel.name, version=meta["version"], top_level=meta["top_level"],
                     deps=meta["requires"] if follow else [], follow=follow)
        if required_by not in entry["required_by"]:
            entry["required_by"].append(required_by)

    try:
        record(build_detectron2(install_deps, out, work), "scripts/install_deps.py (detectron2)", True)
        record(build_lvis(install_deps, out, work), "scripts/install_deps.py (lvis, --no-deps)", False)
        record(build_sam2(install_deps, out, work), "scripts/install_deps.py (sam2, --no-deps)", False)
        record(build_project(out), "the project", False)  # its deps are the setup.py requirements
        specs: dict[str, SpecifierSet] = {}
        queue = [(Requirement(r), "setup.py") for r in p["requirements"]]
        queue += [(Requirement(d), name) for name, e in entries.items() for d in e["deps"]]  # detectron2's
        while queue:
            req, by = queue.pop(0)
            name = canonicalize_name(req.name)
            if provided(name) or not applies(req):
                continue
            if req.extras:
                say(f"note: {by} asks for {req.name}[{','.join(sorted(req.extras))}]; the extras are not bundled")
            specs[name] = specs.get(name, SpecifierSet()) & req.specifier
            entry = entries.get(name)
            if entry is not None:
                if by not in entry["required_by"]:
                    entry["required_by"].append(by)
                if specs[name].contains(Version(entry["version"]), prereleases=True):
                    continue
                if not entry["follow"]:  # a special build (detectron2, lvis, the project)
                    raise BundleError(f"{by} requires {req}, but the bundle builds {name} {entry['version']}")
                say(f"{name} {entry['version']} does not satisfy {specs[name]} ({by}); replacing it")
                (out / entry["file"]).unlink(missing_ok=True)
            existing = [w for w in out.glob("*.whl") if canonicalize_name(parse_wheel_filename(w.name)[0]) == name]
            keep = next((w for w in existing if specs[name].contains(parse_wheel_filename(w.name)[1], prereleases=True)
                         and wheel_tags_ok(w.name)[0]), None)
            for w in existing:
                if w != keep:
                    w.unlink()
            wheel = keep or fetch_wheel(Requirement(f"{name}{specs[name]}"), out, work)
            if keep is None:
                say(f"{wheel.name} ({by})")
            record(wheel, by, True)
            queue.extend((Requirement(d), f"{name}") for d in entries[name]["deps"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    kept = {e["file"] for e in entries.values()}
    for stray in out.glob("*.whl"):
        if stray.name not in kept:
            say(f"removing {stray.name}: no requirement needs it any more")
            stray.unlink()
    bad = [f"{w.name}: {why}" for w in sorted(out.glob("*.whl")) for ok, why in [wheel_tags_ok(w.name)] if not ok]
    if bad:
        raise BundleError("wheels the GPU machine cannot install: " + "; ".join(bad))
    size = total_bytes(out)
    manifest = {
        "schema": "regionspot-wheelhouse/1", "target": "CPython 3.12, manylinux x86_64",
        "provided_by_the_gpu_machine": sorted(GPU_PROVIDED) + [f"{p}*" for p in GPU_PROVIDED_PREFIXES],
        "total_bytes": size, "limit_bytes": int(limit_mib * 2**20),
        "wheels": [{"name": n, "version": e["version"], "file": e["file"], "bytes": (out / e["file"]).stat().st_size,
                    "sha256": sha256(out / e["file"]), "required_by": e["required_by"], "top_level": e["top_level"]}
                   for n, e in sorted(entries.items())],
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")
    if size > limit_mib * 2**20:
        largest = sorted(manifest["wheels"], key=lambda w: -w["bytes"])[:5]
        raise BundleError(f"the bundle is {size / 2**20:.1f} MiB, over the {limit_mib:g} MiB limit; largest: "
                          + ", ".join(f"{w['file']} {w['bytes'] / 2**20:.1f} MiB" for w in largest))
    say(f"{len(manifest['wheels'])} wheels, {size / 2**20:.1f} MiB (limit {limit_mib:g} MiB) in {out}")
    return manifest


# ----------------------------------------------------------------------------- verify
IMPORT_PROBE = r"""
import importlib, json, sys
provided = set(sys.argv[2].split(","))
try:
    importlib.import_module(sys.argv[1])
    print(json.dumps({"status": "ok"}))
except ModuleNotFoundError as exc:
    root = (exc.name or "").split(".")[0]
    status = "needs_gpu_machine" if root in provided else "failed"
    print(json.dumps({"status": status, "error": f"{type(exc).__name__}: {exc}"}))
except Exception as exc:
    print(json.dumps({"status": "failed", "error": f"{type(exc).__name__}: {exc}"}))
"""


def verify(out: Path, python: str, limit_mib: float, target: Path | None = None) -> dict:
    """Check the bundle in ``out`` (see the module docstring); returns the report, raises
    BundleError on the first failure of the tags, the size or the install, and after all imports
    when one failed."""
    wheels = sorted(out.glob("*.whl"))
    if not wheels:
        raise BundleError(f"no wheels in {out}: build them with tools/gpu/make_wheelhouse.sh")
    bad = [f"{w.name}: {why}" for w in wheels for ok, why in [wheel_tags_ok(w.name)] if not ok]
    if bad:
        raise BundleError("wheels the GPU machine cannot install: " + "; ".join(bad))
    size = total_bytes(out)
    if size > limit_mib * 2**20:
        raise BundleError(f"the bundle is {size / 2**20:.1f} MiB, over the {limit_mib:g} MiB limit")
    say(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB: every one pure or cp312 manylinux x86_64")
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
    if version.returncode != 0:
        raise BundleError(f"cannot run {python}")
    if version.stdout.strip() != "3.12":
        raise BundleError(f"{python} is Python {version.stdout.strip()}, not 3.12")
    own_target = target is None
    target = target or Path(tempfile.mkdtemp(prefix="regionspot-wheelhouse-target-"))
    try:
        pip("install", "--no-index", "--no-deps", "--no-compile", "--target", str(target),
            *[str(w) for w in wheels], python=python)
        say(f"pip install --no-index --no-deps --target {target}: ok with {python}")
        env = dict(os.environ, PYTHONPATH=str(target), PYTHONNOUSERSITE="1", PYTHONWARNINGS="ignore")
        results = {}
        for w in wheels:
            for module in wheel_metadata(w)["top_level"]:
                proc = subprocess.run([python, "-c", IMPORT_PROBE, module, ",".join(sorted(GPU_PROVIDED_MODULES))],
                                      env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300)
                try:
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    res = {"status": "failed", "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
                res["wheel"] = w.name
                results[module] = res
    finally:
        if own_target:
            shutil.rmtree(target, ignore_errors=True)
    ok = sorted(m for m, r in results.items() if r["status"] == "ok")
    deferred = sorted(m for m, r in results.items() if r["status"] == "needs_gpu_machine")
    failed = {m: r for m, r in results.items() if r["status"] == "failed"}
    say(f"imported without torch: {len(ok)} modules ({', '.join(ok)})")
    say(f"need the GPU machine's packages (imported by tools/gpu/check.sh there): {', '.join(deferred) or 'none'}")
    report = {"wheels": len(wheels), "total_bytes": size, "python": python, "imports": results}
    if failed:
        raise BundleError("imports failed: " + "; ".join(f"{m} ({r['wheel']}): {r['error']}"
                                                        for m, r in sorted(failed.items())))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="wheelhouse.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "verify", "plan"))
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the wheel folder (default: wheels/, git-ignored)")
    parser.add_argument("--limit-mib", type=float, default=DEFAULT_LIMIT_MIB, help="largest total size (55)")
    parser.add_argument("--python", default=os.environ.get("REGIONSPOT_PY312", "python3.12"),
                        help="a Python 3.12 for verify (default: $REGIONSPOT_PY312 or python3.12)")
    parser.add_argument("--report", help="verify: also write the import report to this JSON file")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    try:
        if args.command == "plan":
            print(json.dumps(plan(), indent=1))
        elif args.command == "build":
            build(out, args.limit_mib)
        else:
            python = shutil.which(args.python) or args.python
            report = verify(out, python, args.limit_mib)
            if args.report:
                Path(args.report).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    except BundleError as exc:
        print(f"wheelhouse.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
