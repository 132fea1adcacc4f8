"""Compute the CLIP text embeddings of a vocabulary ahead of time (fills the text-embedding cache).
The tool is :mod:`regionspot.tools.dump_text_embeddings`
(``python -m regionspot.tools.dump_text_embeddings --help``)."""

import sys

from regionspot.tools.dump_text_embeddings import main

if __name__ == "__main__":
    sys.exit(main())
