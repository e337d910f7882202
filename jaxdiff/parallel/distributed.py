"""Multi-process start-up: JAX's distributed runtime, its timeouts, and the main process."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """How long a multi-process job waits for a slow process before giving up (seconds).

    On a pod a slow host is normal (a long compile, a busy disk, a preempted VM coming
    back); these bound how slow it may be. JAX's coordination service aborts the whole job
    (SIGABRT) when one fires, so they are generous by default.

    Attributes:
        init: every process must connect to the coordinator within this (JAX default 300).
        heartbeat: a process whose heartbeats stop this long is declared dead and the job
            aborts (JAX default 100). Heartbeats come from a background thread, so only a
            stopped, swapping or starved process misses them.
        shutdown: at exit every process waits this long for the others to reach the
            shutdown barrier (JAX default 300): a process still training, saving or
            writing a grid when another finishes needs this much slack.
    """

    init: int = 600
    heartbeat: int = 300
    shutdown: int = 900

    @classmethod
    def from_env(cls, **overrides: int | None) -> Timeouts:
        """Defaults, then ``JAXDIFF_{INIT,HEARTBEAT,SHUTDOWN}_TIMEOUT``, then ``overrides``."""
        values = {}
        for field in dataclasses.fields(cls):
            env = os.environ.get(f"JAXDIFF_{field.name.upper()}_TIMEOUT")
            value = overrides.get(field.name)
            value = value if value is not None else (int(env) if env else field.default)
            if value < 1:
                raise ValueError(f"timeout {field.name}={value} must be >= 1 second")
            values[field.name] = value
        return cls(**values)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeouts: Timeouts | None = None,
) -> bool:
    """Starts JAX's distributed runtime when this is (or may be) a multi-process job.

    On Cloud TPU VMs (one host or a pod slice, found by their TPU chips), GKE TPU pods,
    multislice jobs and SLURM, ``jax.distributed.initialize()`` detects everything itself;
    elsewhere pass the coordinator explicitly (or set ``JAXDIFF_COORDINATOR``,
    ``JAXDIFF_NUM_PROCESSES`` and ``JAXDIFF_PROCESS_ID``). Must run before any other JAX
    call. A single process with nothing to detect is left alone.

    Args:
        coordinator_address: ``host:port`` of process 0.
        num_processes: processes in the job.
        process_id: this process's index.
        timeouts: how long to wait for slow processes (default :meth:`Timeouts.from_env`).

    Returns:
        True if the distributed runtime was started.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAXDIFF_COORDINATOR")
    if num_processes is None and "JAXDIFF_NUM_PROCESSES" in env:
        num_processes = int(env["JAXDIFF_NUM_PROCESSES"])
    if process_id is None and "JAXDIFF_PROCESS_ID" in env:
        process_id = int(env["JAXDIFF_PROCESS_ID"])
    t = Timeouts.from_env() if timeouts is None else timeouts
    kwargs = dict(
        initialization_timeout=t.init,
        heartbeat_timeout_seconds=t.heartbeat,
        shutdown_timeout_seconds=t.shutdown,
    )
    if coordinator_address is not None:
        # CPU processes need a collectives backend to talk to each other; the setting only
        # affects CPU devices (asking for the backend here would start it too early).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
        return True
    if any(
        k in env for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
    ):
        jax.distributed.initialize(**kwargs)
        return True
    if on_cloud_tpu_vm():
        # A plain Cloud TPU VM (a `gcloud ... ssh --worker=all` shell) has none of the
        # variables above: JAX finds the slice's workers through the metadata server. The
        # TPU runtime would connect the hosts without this call, but the coordination
        # service it starts is what carries the timeouts and orbax's preemption notice.
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as err:  # TPU chips, but no Cloud TPU metadata to find a slice
            log.warning("TPU chips found but no Cloud TPU slice (%s): one process", err)
            return False
        return True
    return False


def on_cloud_tpu_vm() -> bool:
    """Whether this host has TPU chips that JAX will treat as a Cloud TPU VM.

    Uses JAX's own PCI scan (the check JAX makes before it loads the TPU runtime); no
    backend is started. False where the scan is unavailable or metadata queries are off
    (``TPU_SKIP_MDS_QUERY``).
    """
    if "TPU_SKIP_MDS_QUERY" in os.environ:
        return False
    try:
        from jax._src import hardware_utils  # private: JAX has no public pre-backend probe

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # noqa: BLE001 - a moved private helper must not break start-up
        return False
    return chips > 0


def is_main_process() -> bool:
    """True on process 0: the only one that logs, writes images and shows progress."""
    return jax.process_index() == 0
