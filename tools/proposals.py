"""Inspect and convert proposal files (a detector's boxes for RegionSpot's ``file`` source).
The tool is :mod:`regionspot.tools.proposals` (``python -m regionspot.tools.proposals --help``)."""

import sys

from regionspot.tools.proposals import main

if __name__ == "__main__":
    sys.exit(main())
