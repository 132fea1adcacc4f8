"""Shared fixtures: small random SAM and CLIP written in the official file formats, and a
RegionSpot model built from them through the real config and loading code."""

import importlib
import os
import warnings

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")

torch.set_num_threads(2)


def load_tool(name: str):
    """The tool ``name`` as the module ``regionspot.tools.<name>`` (``tools/<name>.py`` is its
    command-line wrapper)."""
    return importlib.import_module(f"regionspot.tools.{name}")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a shared 2-core machine, two OpenMP threads competing with other processes made SAM's
    mask decoder up to 50x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def forget_new_datasets():
    """Remove the datasets a test registered (catalog and metadata) when it ends."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    before = set(DatasetCatalog.list())
    yield
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="session")
def sam_path(weights_dir):
    from regionspot.testing.random_backbones import write_random_sam

    return write_random_sam(str(weights_dir / "sam_random_tiny.pth"), "tiny", seed=0)


@pytest.fixture(scope="session")
def clip_path(weights_dir):
    from regionspot.testing.random_backbones import write_random_clip

    return write_random_clip(str(weights_dir / "clip_random_tiny.pt"), "tiny", seed=0)


def make_cfg(sam_path, clip_path, cache_dir, **overrides):
    """The sample CPU config with the random weights and a custom vocabulary."""
    from regionspot.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"))
    cfg.MODEL.REGIONSPOT.SAM_WEIGHTS = sam_path
    cfg.MODEL.REGIONSPOT.CLIP_WEIGHTS = clip_path
    cfg.MODEL.REGIONSPOT.TEXT_CACHE_DIR = str(cache_dir)
    cfg.MODEL.REGIONSPOT.VOCABULARY = "custom"
    cfg.MODEL.REGIONSPOT.CUSTOM_VOCABULARY = "cat,dog,car,person"
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = getattr(node, part)
        setattr(node, last, value)
    return cfg


@pytest.fixture(scope="session")
def tiny_cfg(sam_path, clip_path, tmp_path_factory):
    return make_cfg(sam_path, clip_path, tmp_path_factory.mktemp("text_cache"))


def build_tiny_model(cfg):
    """build_model(cfg) with the config's vocabulary set (what train_net does before a forward)."""
    from detectron2.modeling import build_model

    from regionspot.modeling.text_classifier import vocabulary_from_config

    torch.manual_seed(0)
    model = build_model(cfg)
    model.set_vocabulary(vocabulary_from_config(cfg))
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    return build_tiny_model(tiny_cfg).eval()


@pytest.fixture(scope="session")
def head_path(tiny_cfg, tmp_path_factory):
    """A head checkpoint of the tiny model (untrained weights, seed 0) written by the project's
    checkpointer, for entry points that refuse an empty ``MODEL.WEIGHTS``."""
    from regionspot.checkpoint import RegionSpotCheckpointer

    folder = tmp_path_factory.mktemp("head")
    RegionSpotCheckpointer(build_tiny_model(tiny_cfg), save_dir=str(folder)).save("head_random")
    return str(folder / "head_random.pth")


@pytest.fixture(autouse=True)
def _restore_project_loggers():
    """Entry points called in-process (``demo.main``, ``tool.main``) set up the project's
    loggers for a person (console handlers, ``propagate=False``); undo that after each test so
    that later tests' ``caplog`` still sees the records."""
    import logging

    names = ("regionspot", "detectron2", "fvcore")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate, logging.getLogger(n).level)
             for n in names}
    yield
    for name, (handlers, propagate, level) in saved.items():
        log = logging.getLogger(name)
        log.handlers[:] = handlers
        log.propagate, log.level = propagate, level


def _no_console(name):
    def disabled():
        raise AssertionError(f"{name}.disabled() writes to the console among pytest's progress dots; tests must not "
                             f"print: put the figures in an assertion message or read them with {name}.readouterr()")
    return disabled


@pytest.fixture
def capsys(capsys):
    """pytest's ``capsys`` without ``disabled()``: no test writes to the console (under pytest's
    default fd capture that is the only way a test's output gets among the dots)."""
    capsys.disabled = _no_console("capsys")
    return capsys


@pytest.fixture
def capfd(capfd):
    """pytest's ``capfd`` without ``disabled()`` (see ``capsys``)."""
    capfd.disabled = _no_console("capfd")
    return capfd


def assert_same_masks(ours, reference, what: str = "masks") -> None:
    """Binary masks from two computations of the same logits (ours and a package's reference,
    which agree to ~1e-5 before the threshold) are equal up to the pixels whose logit lies within
    that rounding of 0: at most 1 in 10,000 pixels (and at least one pixel) may differ. A real
    defect (a shifted paste, a wrong crop or resize) changes the masks' borders, hundreds of
    pixels. Bit-exact equality would hold only where both computations round alike, which
    differs between CPUs."""
    ours = np.asarray(ours.cpu() if isinstance(ours, torch.Tensor) else ours).astype(bool)
    reference = np.asarray(reference.cpu() if isinstance(reference, torch.Tensor) else reference).astype(bool)
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} != {reference.shape}"
    differing = int((ours != reference).sum())
    allowed = max(1, reference.size // 10_000)
    assert differing <= allowed, f"{what}: {differing} of {reference.size} pixels differ (at most {allowed} may)"


# ----------------------------------------------------------------------------- skips in CI
# Under CI=true the only skips allowed are the CUDA tests (marker ``cuda``) on a machine where
# torch sees no CUDA device; any other skip (a missing tool such as Chromium or Playwright, a
# missing interpreter) fails the test with its reason, so that CI never passes a check that
# did not run. Elsewhere a skip stays a skip, listed with its reason (-rs in .ci/run).
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not IN_CI or not report.skipped or getattr(report, "wasxfail", None) is not None:
        return
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"CI=true: this test may not skip in CI: {reason.removeprefix('Skipped: ')}"
