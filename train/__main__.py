"""Runs an experiment config: ``python -m train [--config=train/configs/NAME.py] [--workdir=DIR]``.

This file is intentionally short; the runs live in :mod:`jaxdiff.experiment`, so
notebooks can call ``train_and_evaluate(config, workdir)`` directly. ``config.method``
picks the run: diffusion training (default), a distillation method (``fdistill``, ``cd``,
``ct``, ``scm``, ``meanflow``, ``progressive``, ``guidance_distill``) or ``"classifier"``. With no
flags it trains the class-conditional digits model into ``runs/digits``. A bad flag,
config value or workdir is one line on stderr and exit code 2 (``--debug`` shows the
traceback).
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from jaxdiff.utils import cli, storage

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "digits.py")
try:
    _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Experiment config file.")
except (AttributeError, KeyError) as err:  # an override names a key the config lacks
    if cli.debug_requested():
        raise
    text = str(err.args[0] if err.args else err).replace("\\n", " ").replace("\\'", "'")
    key, _, hint = text.lstrip("'").partition("'")
    cli.fail(f"unknown config key {key!r}:{hint.rstrip(chr(39))}")
_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "Checkpoints, metrics and samples.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs off TPU/SLURM."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0-based).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "init_timeout", None, "Seconds for all processes to connect (default 600)."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", None, "Seconds of missed heartbeats before the job aborts (default 300)."
)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout", None, "Seconds to wait for the slowest process at exit (default 900)."
)


def main(argv):
    """Runs the command; ``argv`` holds no positional arguments."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxdiff.parallel import Timeouts, initialize_distributed

    timeouts = Timeouts.from_env(
        init=_INIT_TIMEOUT.value,
        heartbeat=_HEARTBEAT_TIMEOUT.value,
        shutdown=_SHUTDOWN_TIMEOUT.value,
    )
    # Before any other JAX call: on TPU pods and SLURM everything is auto-detected.
    initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, timeouts=timeouts
    )
    import jax

    from jaxdiff.experiment import run_experiment
    from jaxdiff.utils.logs import quiet_library_logs

    quiet_library_logs()
    logging.getLogger("jaxdiff").info(
        "process %d of %d: %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    run_experiment(_CONFIG.value, _WORKDIR.value)
    print(f"done: results in {storage.to_str(_WORKDIR.value)}")


if __name__ == "__main__":
    cli.run(main)
