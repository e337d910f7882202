"""A fake ``gs://`` bucket for tests: no network, no credentials, the real cloud code path.

:func:`install` makes every ``gs://BUCKET/KEY`` URL resolve to ``ROOT/BUCKET/KEY`` on local
disk, at the lowest layer each library uses, so jaxdiff and orbax run exactly the code they
run against a real bucket:

* ``etils.epath`` (jaxdiff's :mod:`jaxdiff.utils.storage`, orbax's metadata, grain's
  iterator state) dispatches ``gs://`` to fsspec's ``gcs`` protocol, which is registered
  here as a :class:`FakeGCSFileSystem` (an fsspec filesystem rooted at ``ROOT``);
* orbax writes arrays with TensorStore's ``gcs`` driver; its kvstore spec is redirected to
  TensorStore's ``file`` driver under ``ROOT``, and orbax's bucket-API calls (hierarchical
  namespace checks) answer "plain bucket".

Nothing else is patched: orbax still takes its GCS branches (commit-file atomicity, GCS
deletion), and a path that lost its scheme (``gs:/bucket/...``) would land in the working
directory, where the tests look for it.

Use in-process through the ``fake_gcs`` fixture (tests/conftest.py), or in a subprocess
with ``python tests/fakegcs.py ROOT MODULE [ARGS...]``, which installs the fake and runs
``python -m MODULE ARGS...``.
"""

from __future__ import annotations

import os
import runpy
import sys

from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import register_implementation

BUCKET = "jaxdiff-test-bucket"


class FakeGCSFileSystem(DirFileSystem):
    """fsspec filesystem for ``gs://`` URLs, stored under :attr:`root` on local disk."""

    protocol = ("gs", "gcs")
    root = ""  # set by install()

    def __init__(self, *args, **kwargs):
        # epath passes gcsfs options (finalize_on_close=...) that a local store ignores.
        if not self.root:
            raise RuntimeError("FakeGCSFileSystem.root is unset: call tests.fakegcs.install()")
        super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return path[len(prefix) :].rstrip("/")
        return path.rstrip("/")

    def _join(self, path):
        if isinstance(path, str):
            path = self._strip_protocol(path)
        return super()._join(path)


def patches(root: str | os.PathLike) -> list[tuple[object, str, object]]:
    """The ``(object, attribute, value)`` replacements that route ``gs://`` under ``root``.

    Also registers :class:`FakeGCSFileSystem` with fsspec (harmless to other tests: the
    real ``gcsfs`` is not installed in the test environment).
    """
    from etils.epath import backend as epath_backend
    from orbax.checkpoint._src.path import gcs_utils

    root = os.path.abspath(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    FakeGCSFileSystem.root = root
    FakeGCSFileSystem.clear_instance_cache()
    for protocol in ("gs", "gcs"):
        register_implementation(protocol, FakeGCSFileSystem, clobber=True)
    # epath caches one filesystem per protocol; drop any created for another root.
    epath_backend.fsspec_backend._get_filesystem.cache_clear()

    def kvstore(ckpt_path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(ckpt_path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(root, bucket, key)}

    return [
        (gcs_utils, "get_kvstore_for_gcs", kvstore),
        (gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False),
    ]


def install(root: str | os.PathLike) -> None:
    """Routes every ``gs://`` access of this process to folders under ``root``, for good."""
    for obj, name, value in patches(root):
        setattr(obj, name, value)


def local_path(root: str | os.PathLike, url: str) -> str:
    """Where ``url`` (``gs://bucket/key``) is stored under ``root``."""
    if not url.startswith("gs://"):
        raise ValueError(f"not a gs:// URL: {url!r}")
    return os.path.join(os.fspath(root), url.removeprefix("gs://"))


if __name__ == "__main__":
    # python tests/fakegcs.py ROOT MODULE [ARGS...]: `python -m MODULE ARGS...` on the fake.
    install(sys.argv[1])
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
