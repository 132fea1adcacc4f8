"""Speed and memory of RegionSpot: ``python tools/benchmark.py SUBCOMMAND ...`` (stages, e2e, eval,
text, train, pairs, app). The tool is :mod:`regionspot.tools.benchmark` (``--help`` for its usage)."""

import sys

from regionspot.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
