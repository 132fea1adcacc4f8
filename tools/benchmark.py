"""Inference speed and memory of RegionSpot, stage by stage, on the CPU or a CUDA GPU.
The tool is :mod:`regionspot.tools.benchmark` (``python -m regionspot.tools.benchmark --help``)."""

import sys

from regionspot.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
