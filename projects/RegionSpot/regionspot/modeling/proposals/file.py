"""Moved to :mod:`regionspot.data.proposal_files` (proposal files are read by the data loader).

Kept only so that the scripts under ``tools/`` that still import this path work until their
imports are updated; new code imports :mod:`regionspot.data.proposal_files`.
"""

from ...data.proposal_files import *  # noqa: F401,F403
from ...data.proposal_files import __all__  # noqa: F401
