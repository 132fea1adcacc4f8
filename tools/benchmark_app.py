"""Time the web app (upload -> first result, vocabulary change -> new result) and attention recording.
The tool is :mod:`regionspot.tools.benchmark_app` (``--help`` for its usage)."""

import sys

from regionspot.tools.benchmark_app import main

if __name__ == "__main__":
    sys.exit(main())
