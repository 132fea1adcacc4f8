#!/usr/bin/env python
"""Train and evaluate RegionSpot: the checkout's wrapper of ``regionspot-train``
(:mod:`regionspot.tools.train_net`, same flags; ``--help`` lists them).

    python train_net.py --config-file configs/regionspot_bl.yaml --num-gpus 8

``main(args)`` here is one process's run on parsed arguments (:func:`regionspot.tools.train_net.train`),
as in Detectron2's ``train_net.py`` scripts.
"""

import sys

from regionspot.tools.train_net import (  # noqa: F401  (the names scripts and tests use)
    Trainer,
    check_inputs,
    get_parser,
    launch,
    run,
    setup,
    train,
    worker_main,
)
from regionspot.tools.train_net import train as main  # noqa: F401

if __name__ == "__main__":
    sys.exit(run())
