"""Measure the plain and the fast CLIP text-embedding paths on the CPU (LVIS vocabulary).
The tool is :mod:`regionspot.tools.benchmark_text` (``python -m regionspot.tools.benchmark_text --help``)."""

import sys

from regionspot.tools.benchmark_text import main

if __name__ == "__main__":
    sys.exit(main())
