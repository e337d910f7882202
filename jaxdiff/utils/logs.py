"""Logging set-up for the command-line tools."""

from __future__ import annotations

import logging


def quiet_library_logs(level: int = logging.WARNING) -> None:
    """Keeps jaxdiff's INFO lines and raises orbax/jax/absl chatter to ``level``.

    Orbax logs every checkpoint phase at INFO through absl's logger; at the default level
    those lines bury the training metrics.
    """
    for name in ("absl", "jax", "orbax", "tensorflow_datasets"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("jaxdiff").setLevel(logging.INFO)
