"""Dataset registrations in Detectron2's catalog.

``regionspot_sample``: the bundled real-photo sample (LVIS v1 format), under
``$DETECTRON2_DATASETS/regionspot_sample`` (default ``datasets/``); its photos are written
there from installed packages on first use.
"""

from .regionspot_sample import register_regionspot_sample, sample_root

register_regionspot_sample(sample_root())
