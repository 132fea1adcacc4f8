"""RegionSpot as a user who adds it to an existing environment gets it: the sdist is built from a
copy of the checkout's files, the wheel from that sdist (so the sdist holds what a rebuild needs),
the wheel is installed (not editable) into a fresh virtual environment that sees the installed
dependencies but not the checkout, and the README's commands run from an empty folder outside the
checkout with bundled config names, writing only under that folder. The sdist is also installed
with ``pip install`` into a second fresh environment.

The fresh environments see this Python's site-packages through a ``.pth`` file that lists the
folder: Python adds a listed folder to ``sys.path`` without reading the ``.pth`` files inside it,
so the checkout's editable install stays invisible.
"""

import glob
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile

import pytest

from conftest import REPO

TIMEOUT = 900  # a hang guard only


def _run(cmd, cwd, env, timeout=TIMEOUT):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _copy_checkout(target):
    """The checkout's tracked and new (not ignored) files, links kept as links: what a clone holds."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        source, dest = os.path.join(REPO, rel), os.path.join(target, rel)
        if not os.path.lexists(source):
            continue  # deleted in the work tree
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.islink(source):
            os.symlink(os.readlink(source), dest)
        else:
            shutil.copy2(source, dest)


def _fresh_venv(path, env):
    """A virtual environment without pip that imports this Python's site-packages (not its .pth files)."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=str(path.parent), env=env)
    python = str(path / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "dependencies.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]) + "\n")
    return python, purelib


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist, wheel, env): built from a copy of the checkout, the wheel from the sdist."""
    root = tmp_path_factory.mktemp("build")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    source = root / "checkout"
    _copy_checkout(str(source))
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(root / "dist")], cwd=str(source), env=env)
    (sdist,) = glob.glob(str(root / "dist" / "regionspot-*.tar.gz"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), sdist],
         cwd=str(root), env=env)
    (wheel,) = glob.glob(str(root / "dist" / "regionspot-*.whl"))
    return sdist, wheel, env


def test_the_sdist_holds_what_a_rebuild_needs(built):
    sdist, _, _ = built
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    configs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    for name in ["README.md", "LICENSE", "setup.py", "MANIFEST.in"] + [f"configs/{c}" for c in configs]:
        assert name in names, name
    bundled = {n.rsplit("/", 1)[1] for n in names if "/regionspot/configs/" in n and n.endswith(".yaml")}
    assert bundled == set(configs)


def test_pip_install_of_the_sdist(built, tmp_path):
    sdist, _, env = built
    python, purelib = _fresh_venv(tmp_path / "venv", env)
    _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", sdist], cwd=str(tmp_path), env=env)
    work = tmp_path / "work"
    work.mkdir()
    out = _run([python, "-c", "import regionspot, regionspot.model_zoo as z; print(regionspot.__file__); "
                              "print(z.get_config_file('regionspot_bl'))"], cwd=str(work), env=env).stdout.split()
    assert all(path.startswith(purelib) for path in out), out


def test_the_wheel_from_an_empty_folder(built, tmp_path):
    """The README's first commands, with bundled config names, from a folder outside the checkout."""
    _, wheel, env = built
    python, purelib = _fresh_venv(tmp_path / "venv", env)
    _run([python, "-m", "pip", "install", "--no-deps", wheel], cwd=str(tmp_path), env=env)
    bin_dir = os.path.dirname(python)
    env = dict(env, PATH=bin_dir + os.pathsep + env.get("PATH", ""))
    env.pop("DETECTRON2_DATASETS", None)
    work = tmp_path / "work"
    work.mkdir()
    cwd = str(work)
    before = set(os.listdir(purelib))

    where = _run([python, "-c", "import regionspot; print(regionspot.__file__)"], cwd=cwd, env=env).stdout.strip()
    assert where.startswith(purelib), where  # the wheel's package, not the checkout's

    help_text = _run(["regionspot-train", "--config-file", "regionspot_sample_cpu.yaml", "--help"], cwd=cwd, env=env)
    assert "usage: regionspot-train" in help_text.stdout and "./output" in help_text.stdout
    assert "$DETECTRON2_DATASETS" in help_text.stdout

    for command, says in (("regionspot-app", "./output/app_sample"), ("regionspot-run-sample", "./output/sample")):
        shown = _run([command, "--help"], cwd=cwd, env=env).stdout
        assert f"usage: {command}" in shown and says in " ".join(shown.split()), command

    # the sample config's random SAM and CLIP at its (relative) paths, as regionspot-run-sample writes them
    _run([python, "-c", "from regionspot.testing.random_backbones import write_random_clip, write_random_sam; "
                        "write_random_sam('output/sample/weights/sam_random_tiny.pth', 'tiny', seed=0); "
                        "write_random_clip('output/sample/weights/clip_random_tiny.pt', 'tiny', seed=0)"],
         cwd=cwd, env=env)
    short = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0", "SOLVER.IMS_PER_BATCH", "2"]
    _run(["regionspot-train", "--config-file", "regionspot_sample_cpu.yaml", *short], cwd=cwd, env=env)
    head = work / "output" / "sample" / "train" / "model_final.pth"
    assert head.is_file()
    assert (work / "datasets" / "regionspot_sample" / "images" / "astronaut.png").is_file()  # written on first use
    _run(["regionspot-train", "--config-file", "regionspot_sample_cpu.yaml", "--eval-only", "MODEL.WEIGHTS", str(head),
          "OUTPUT_DIR", "output/sample/eval"], cwd=cwd, env=env)
    metrics = work / "output" / "sample" / "eval" / "inference" / "regionspot_sample" / "metrics.json"
    assert metrics.is_file()

    _run(["regionspot-demo", "--config-file", "regionspot_sample_cpu.yaml", "--input",
          "datasets/regionspot_sample/images/astronaut.png", "--points", "200,150", "--vocabulary", "custom",
          "--custom-vocabulary", "person,rocket", "--output", "output/demo", "--opts", "MODEL.WEIGHTS", str(head)],
         cwd=cwd, env=env)
    assert (work / "output" / "demo" / "astronaut.jpg").is_file()
    assert (work / "output" / "demo" / "astronaut.json").is_file()

    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        block = re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)[0]
    (tmp_path / "readme_api.py").write_text(block + "\nprint('labels', out.labels)\n", encoding="utf-8")
    printed = _run([python, str(tmp_path / "readme_api.py")], cwd=cwd, env=env).stdout
    assert "labels" in printed

    assert set(os.listdir(purelib)) - before == set()  # nothing written into site-packages
    assert not os.path.exists(os.path.join(purelib, "regionspot", "output"))
