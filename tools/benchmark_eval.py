"""Time the two LVIS evaluator backends on a synthetic LVIS-val-sized set and check they agree.
The tool is :mod:`regionspot.tools.benchmark_eval` (``python -m regionspot.tools.benchmark_eval --help``)."""

import sys

from regionspot.tools.benchmark_eval import main

if __name__ == "__main__":
    sys.exit(main())
