"""Export region embeddings (safetensors + an index JSON) and search them by text or by region.
The tool is :mod:`regionspot.tools.export_region_embeddings` (``--help`` for its usage)."""

import sys

from regionspot.tools.export_region_embeddings import main

if __name__ == "__main__":
    sys.exit(main())
