"""Convert the official OpenImages v6 box annotations of one split into a COCO-format json.
The tool is :mod:`regionspot.tools.convert_openimages` (``python -m regionspot.tools.convert_openimages --help``)."""

import sys

from regionspot.tools.convert_openimages import main

if __name__ == "__main__":
    sys.exit(main())
