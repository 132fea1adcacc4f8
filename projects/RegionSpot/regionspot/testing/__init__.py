"""Test fixtures that ship with the package: small randomly initialised SAM, CLIP, RPN and
RegionSpot models (:mod:`regionspot.testing.random_backbones`) for tests, benchmarks and the
sample run. Nothing in the library imports this package."""
