"""Dataset registrations in Detectron2's catalog.

``regionspot_sample``: the bundled real-photo sample (LVIS v1 format), under
``$DETECTRON2_DATASETS/regionspot_sample`` (default ``datasets/``); its photos are written
there from installed packages on first use.

The paper's training datasets (``objects365_v1_train``, ``objects365_v2_train``,
``objects365_v2_val``, ``openimages_v6_train``, ``openimages_v6_val``, ``v3det_v1_train``,
``v3det_v1_val``): registered lazily from their default locations under
``$DETECTRON2_DATASETS`` (see :mod:`.builtin` and ``datasets/README.md``); nothing is read
until a dataset is used.
"""

from .builtin import register_all_training_datasets
from .regionspot_sample import register_regionspot_sample, sample_root

register_regionspot_sample(sample_root())
register_all_training_datasets()
