"""Training speed of RegionSpot: iterations and images per second, with and without the SAM-token.
The tool is :mod:`regionspot.tools.benchmark_train` (``python -m regionspot.tools.benchmark_train --help``)."""

import sys

from regionspot.tools.benchmark_train import main

if __name__ == "__main__":
    sys.exit(main())
