"""Export a RegionSpot model to ONNX for ONNX Runtime (``regionspot-export onnx``).
The tool is :mod:`regionspot.tools.export_onnx` (``--help`` for its usage)."""

import sys

from regionspot.tools.export_onnx import main

if __name__ == "__main__":
    sys.exit(main())
