"""Test-wide JAX set-up.

Eight CPU devices are forced *before* jax is imported anywhere, so every test run
exercises the sharded code paths (meshes, global arrays) that users hit on a TPU pod.
"""

import atexit
import os
import shutil
import tempfile

# The tests' tiny programs spend far more time compiling than running: XLA's backend
# optimisation level 0 compiles them about 20% faster (measured on tests/test_training.py)
# and changes no test's outcome (every comparison runs both sides under the same flags).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep per-test-process memory small; two xdist workers share 24 GiB in CI.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Many tests compile the same tiny programs (model init, train step, sampler); a
# persistent compilation cache turns every repeat into a load. The directory is fresh for
# each test session (a compilation cache is trusted code, never shared across users or
# runs), created by the first process and inherited through the environment by xdist
# workers and by the CLI subprocesses the tests start.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxdiff-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import pytest  # noqa: E402

NUM_DEVICES = 8


# Expensive fixtures in test modules are session-scoped, not module-scoped: xdist may
# interleave a module's tests with other modules' on one worker, and pytest tears a module
# fixture down whenever the next test comes from another module, then builds it again.


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny digits run (5 steps, checkpoints at 5), trained once per test process.

    Shared read-only by the CLI, sampling, evaluation and bad-input tests: a test that
    needs to change a run trains its own.
    """
    from tiny import tiny_config

    from jaxdiff.experiment import train_and_evaluate

    workdir = tmp_path_factory.mktemp("trained_run")
    train_and_evaluate(tiny_config(5), workdir)
    return workdir


def _unbound_getitems(record_keys, generator, serialized=False):
    assert not serialized  # jaxdiff reads decoded examples
    return [generator[int(k)] for k in record_keys]


@pytest.fixture
def mock_tfds(monkeypatch):
    # USE_CODE: fake examples generated from the builders' feature specs; needs no
    # metadata files, no TensorFlow and no network.
    # tfds 4.9's mock assigns `__getitems__ = partial(_getitems, generator=...)` on a
    # MagicMock, which (unlike __getitem__) does not bind `self`, so every batched read
    # fails with a TypeError; real ArrayRecord sources are fine. Swap in a function
    # without `self` so the mock serves `__getitems__` as ArrayRecord does.
    import tensorflow_datasets as tfds
    from tensorflow_datasets.testing import mocking

    monkeypatch.setattr(mocking, "_getitems", _unbound_getitems)
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """A fake ``gs://`` bucket store (tests/fakegcs.py); yields the folder holding it.

    The test runs in an empty working directory, so a URL mistaken for a local path
    (``gs:/bucket/...``) shows up as a folder there.
    """
    import fakegcs

    root = tmp_path / "gcs"
    for obj, name, value in fakegcs.patches(root):
        monkeypatch.setattr(obj, name, value)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root


def pytest_configure(config):
    """Fail loudly if the forced device count did not take effect."""
    if jax.device_count() != NUM_DEVICES:
        raise pytest.UsageError(
            f"expected {NUM_DEVICES} CPU devices, got {jax.device_count()}: "
            "jax was imported before tests/conftest.py set XLA_FLAGS"
        )
