"""The digits classifier behind FD-digits (and, noise-aware, classifier guidance).

Usage: ``python -m train --config=train/configs/digits_classifier.py --workdir=runs/clf``
(``--config.noise_aware=True`` for classifier/minority guidance; ``--config.out=PATH`` to
write elsewhere than ``WORKDIR/classifier.npz``). Well under a minute on a CPU.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.method = "classifier"
    c.seed = 0
    c.steps = 1500
    c.noise_aware = False
    c.batch_size = 128
    c.learning_rate = 3e-3
    c.weight_decay = 1e-4
    c.dropout = 0.1
    c.out = ""  # "" = WORKDIR/classifier.npz
    return c
