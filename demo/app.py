#!/usr/bin/env python
"""The checkout's wrapper of ``regionspot-app`` (:mod:`regionspot.tools.app`, same flags;
``--help`` lists them): RegionSpot in the browser."""

import sys

from regionspot.tools.app import main

if __name__ == "__main__":
    sys.exit(main())
