"""Summarize RegionSpot evaluation outputs in the layout of the paper's Table 1.
The tool is :mod:`regionspot.tools.summarize` (``python -m regionspot.tools.summarize --help``)."""

import sys

from regionspot.tools.summarize import main

if __name__ == "__main__":
    sys.exit(main())
