"""The main job on the bundled real-photo sample, on the CPU, in 75-90 s on an idle 2-core machine.
The tool is :mod:`regionspot.tools.run_sample` (``python -m regionspot.tools.run_sample --help``)."""

import sys

from regionspot.tools.run_sample import main

if __name__ == "__main__":
    sys.exit(main())
