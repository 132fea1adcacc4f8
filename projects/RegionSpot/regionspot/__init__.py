"""RegionSpot for Detectron2: recognize any region with frozen SAM and CLIP.

Importing the package registers the ``RegionSpot`` meta-architecture and the bundled
``regionspot_sample`` dataset with Detectron2.
"""

__version__ = "0.1.0"

import warnings as _warnings

try:
    import torch as _torch  # noqa: F401
except ImportError:  # a deploy-only install: regionspot.deploy runs exported models on ONNX Runtime, torch-free
    _torch = None

if _torch is not None:
    # The dependencies' import-time deprecation notices (fvcore's torch.jit.script, ...) are not
    # the user's to act on: every entry point (python tools/X.py, the console scripts) imports this
    # package first, so they are silenced here, for these imports only.
    with _warnings.catch_warnings():
        for _message in (".*torch.jit.script.*deprecated.*", ".*torch.jit.load.*deprecated.*",
                         ".*pkg_resources is deprecated.*"):
            _warnings.filterwarnings("ignore", message=_message)
        from .config import add_regionspot_config  # noqa: E402
        from .data import datasets as _datasets  # noqa: E402,F401  (dataset registrations)
        from .modeling.meta_arch import RegionSpot  # noqa: E402,F401  (meta-architecture registration)
        from .predictor import RegionSpotPredictor  # noqa: E402,F401

__all__ = ["add_regionspot_config", "RegionSpot", "RegionSpotPredictor", "__version__"]
