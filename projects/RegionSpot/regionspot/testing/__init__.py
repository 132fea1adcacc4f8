"""Test fixtures that ship with the package: small randomly initialised SAM, CLIP, RPN and
RegionSpot models (:mod:`regionspot.testing.random_backbones`) for tests, benchmarks and the
sample run. The library itself does not use them (``modeling/random_backbones.py`` only
re-exports them for the scripts under ``tools/`` that still import the old path)."""
