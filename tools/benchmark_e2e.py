"""End-to-end mode of ``tools/benchmark.py`` (``--end-to-end``): the real evaluation loop.
The tool is :mod:`regionspot.tools.benchmark_e2e` (``python -m regionspot.tools.benchmark_e2e --help``)."""

import sys

from regionspot.tools.benchmark_e2e import main

if __name__ == "__main__":
    sys.exit(main())
