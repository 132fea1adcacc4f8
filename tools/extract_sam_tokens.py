"""Run frozen SAM once per training image and store its position-aware tokens (fills the SAM-token cache).
The tool is :mod:`regionspot.tools.extract_sam_tokens` (``python -m regionspot.tools.extract_sam_tokens --help``)."""

import sys

from regionspot.tools.extract_sam_tokens import main

if __name__ == "__main__":
    sys.exit(main())
