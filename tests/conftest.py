"""Test-wide JAX set-up.

Eight CPU devices are forced *before* jax is imported anywhere, so every test run
exercises the sharded code paths (meshes, global arrays) that users hit on a TPU pod.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep per-test-process memory small; two xdist workers share 24 GiB in CI.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

NUM_DEVICES = 8


def pytest_configure(config):
    """Fail loudly if the forced device count did not take effect."""
    if jax.device_count() != NUM_DEVICES:
        raise pytest.UsageError(
            f"expected {NUM_DEVICES} CPU devices, got {jax.device_count()}: "
            "jax was imported before tests/conftest.py set XLA_FLAGS"
        )
