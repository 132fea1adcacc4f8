"""What each localizer and vision-language model costs per image, and each pair's training cost
(also ``python tools/benchmark.py --pairs``). The tool is :mod:`regionspot.tools.benchmark_pairs`."""

import sys

from regionspot.tools.benchmark_pairs import main

if __name__ == "__main__":
    sys.exit(main())
