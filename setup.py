"""Packaging for RegionSpot (``projects/RegionSpot/regionspot``, import name ``regionspot``).

Install everything with the project's installer rather than with pip alone::

    python scripts/install_deps.py      # into the Python that runs it
    bash scripts/run_tests.sh           # or: create/reuse .venv, install, run the tests

(the README shows the same commands). Two dependencies cannot be expressed here:

* ``detectron2`` is not published on PyPI under its own name. Its official source is its
  GitHub repository, which needs torch at build time and compiles C++ ops. The installer
  keeps a working detectron2 if there is one, installs the official repository where GitHub
  can be reached, and otherwise builds the pure-Python part of the ``pb1-detectron2==0.6``
  sdist (the v0.6 sources) with small compatibility patches. Every route installs a
  distribution named ``detectron2``, which is what ``install_requires`` below asks for, so
  ``pip install -e .`` run on its own fails until the installer has provided it.
* ``lvis`` (the LVIS API) declares ``opencv-python``, which would clash with
  ``opencv-python-headless`` (both own ``cv2/``); the installer installs it with
  ``--no-deps`` and patches its removed-in-numpy-1.24 ``np.float``.

This file must stay importable without torch: pip runs it in an isolated build environment.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
PROJECT_DIR = "projects/RegionSpot"
PACKAGE = "regionspot"


def read_version() -> str:
    """Return ``__version__`` from the package's ``__init__.py`` without importing it."""
    init_py = HERE / PROJECT_DIR / PACKAGE / "__init__.py"
    try:
        text = init_py.read_text(encoding="utf-8")
    except OSError:
        return "0.1.0"
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else "0.1.0"


# The command-line tools (regionspot/tools/<module>.py, each with main(argv=None) -> int); the
# same tools run from a checkout as `python tools/<module>.py`. Every benchmark is a subcommand of
# regionspot-benchmark (regionspot/tools/benchmark.py).
TOOLS = {
    "regionspot-benchmark": "benchmark",
    "regionspot-proposals": "proposals",
    "regionspot-summarize": "summarize",
    "regionspot-dump-text-embeddings": "dump_text_embeddings",
    "regionspot-extract-sam-tokens": "extract_sam_tokens",
    "regionspot-convert-openimages": "convert_openimages",
    "regionspot-run-sample": "run_sample",
    "regionspot-export-region-embeddings": "export_region_embeddings",
    "regionspot-export": "export_onnx",
    # The entry points a checkout also runs as train_net.py, demo/demo.py and demo/app.py.
    "regionspot-train": "train_net",
    "regionspot-demo": "demo",
    "regionspot-app": "app",
}
CONSOLE_SCRIPTS = [f"{name} = {PACKAGE}.tools.{module}:main" for name, module in TOOLS.items()]


setup(
    name="regionspot",
    version=read_version(),
    description="RegionSpot: open-vocabulary region recognition with frozen SAM and CLIP, "
    "on Detectron2",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"": PROJECT_DIR},
    packages=find_packages(where=PROJECT_DIR),
    # regionspot/configs is a link to the repository's configs/ in a checkout (the one source):
    # the wheel and the sdist carry the files themselves (regionspot.model_zoo).
    package_data={PACKAGE: ["*.json", "**/*.json", "*.yaml", "**/*.yaml", "configs/*.yaml"]},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        # clip-anytorch does `from pkg_resources import packaging`; setuptools 81 removed
        # pkg_resources, and torch 2.14 declares setuptools>=77.0.3.
        "setuptools>=77.0.3,<81",
        "segment-anything==1.0",
        # LOCALIZER sam_hq (regionspot/modeling/sam_hq.py builds SAM-HQ from this package's modules
        # and its predictor/generator are the parity references; its MaskDecoderHQ steps are
        # restated there for batched boxes, checked against 0.3). Its light-model module imports
        # timm without declaring it: timm is named here for that.
        "segment-anything-hq==0.3",
        # timm: also OpenCLIP's timm image towers (SigLIP, EVA02) for VL_MODEL open_clip
        # (regionspot/modeling/semantic_features.py TimmSemanticFeatures: VisionTransformer / Eva
        # forward_intermediates(return_prefix_tokens=...), set_input_size; the test models use
        # create_model("local-dir:...")), checked against 1.0.31.
        "timm>=1.0.31,<1.1",
        "clip-anytorch",
        # VL_MODEL open_clip (regionspot/modeling/open_clip_model.py: create_model("local-dir:..."),
        # the tower attributes read there were checked against 3.3).
        "open-clip-torch>=3.3,<3.4",
        # LOCALIZER sam2: the sam2 package itself is installed by scripts/install_deps.py with
        # --no-deps (its iopath>=0.1.10 clashes with detectron2's iopath<0.1.10; see there); these
        # are its other runtime requirements (it builds models from yaml with hydra/omegaconf).
        "hydra-core>=1.3.2",
        "omegaconf>=2.1",
        "pillow>=9.4",
        "ftfy",
        "regex",
        "tqdm",
        # SAM-token cache shards (regionspot.data.token_cache): safe, memory-mapped tensors.
        "safetensors>=0.4",
        # Provided by scripts/install_deps.py (see the module docstring).
        "detectron2",
        "fvcore",
        "iopath<0.1.10",  # detectron2 0.6 declares iopath<0.1.10
        "opencv-python-headless",
        "pycocotools",
        # TEST.EVALUATOR_BACKEND faster_coco_eval: LVIS AP from its C++ core, equal to the LVIS
        # API's (regionspot/evaluation/fast_lvis.py, which was checked against 1.8.0 and drives its
        # COCOeval_faster object directly, hence the bound on the minor version).
        "faster-coco-eval>=1.8.0,<1.9",
        "matplotlib",
        # Offline sample photographs (skimage.data, sklearn.datasets.load_sample_images).
        "scikit-image",
        "scikit-learn",
    ],
    # ruff: the linter and import sorter CI runs before the tests (ruff.toml); its rules change
    # between minor versions, hence the bound.
    extras_require={
        "test": ["pytest", "ruff>=0.17,<0.18"],
        # The web app (demo/app.py; checked with Gradio 6.31: Blocks, launch(theme=...), gr.Request's
        # session_hash, SelectData) and its browser test's driver (Playwright's Python package only:
        # the browser is Debian's chromium, installed by scripts/install_deps.py).
        "app": ["gradio>=6.31,<7", "playwright>=1.50,<2"],
        # OpenCLIP models whose tokenizer lives on the Hugging Face hub (SigLIP): open_clip's
        # HFTokenizer reads the local OPENCLIP_TOKENIZER folder with transformers' AutoTokenizer.
        # An extra (the installer installs it) so that the GPU wheel bundle, which carries
        # install_requires only, stays small; without it the error names this extra.
        "hub-tokenizers": ["transformers>=4.40"],
        # regionspot-export onnx (regionspot/onnx_export.py): torch.onnx's dynamo exporter needs
        # onnxscript; onnx.checker checks every file.
        "export": ["onnx>=1.17", "onnxscript"],
        # regionspot.deploy.OnnxRegionSpotPredictor, torch-free: ONNX Runtime, the exported BPE
        # tokenizer (tokenizers) with CLIP's cleaning (ftfy), PIL and OpenCV resizes.
        "onnxruntime": ["onnxruntime>=1.20", "tokenizers>=0.15", "ftfy", "numpy", "pillow>=9.4",
                        "opencv-python-headless"],
    },
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
