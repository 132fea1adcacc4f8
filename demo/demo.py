#!/usr/bin/env python
"""The checkout's wrapper of ``regionspot-demo`` (:mod:`regionspot.tools.demo`, same flags;
``--help`` lists them): recognise regions in your own images with your own class names."""

import sys

from regionspot.tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
