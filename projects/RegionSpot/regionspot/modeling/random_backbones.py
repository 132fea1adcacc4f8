"""Moved to :mod:`regionspot.testing.random_backbones` (test fixtures are not part of the model).

Kept only so that the scripts under ``tools/`` that still import this path work until their
imports are updated; new code imports :mod:`regionspot.testing.random_backbones`.
"""

from ..testing.random_backbones import *  # noqa: F401,F403
