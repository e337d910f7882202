"""Checkpoint integrity: a SHA-256 manifest per step, verified before a step is trusted.

Orbax's own format catches missing or truncated files, but not bytes garbled in place: a
same-size corruption of an array file restores silently (NaN samples, or a run that goes
NaN ten steps later). So after a step is finalized, :func:`write_manifest` records the
SHA-256 of every file in it in ``<step>/jaxdiff_checksums.json`` (written to a temporary
name, then renamed), and :func:`verify_manifest` re-hashes them before a restore. A step
that fails is treated exactly like an unreadable one: the restore falls back to the
previous step with a warning naming the step and the file.

A step without a manifest (written by an older jaxdiff, or by a process killed between
finalizing and hashing) restores as *unverified*, with a warning; its restored arrays are
still checked to be finite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import numpy as np
from etils import epath

MANIFEST = "jaxdiff_checksums.json"


@dataclasses.dataclass(frozen=True)
class RestoreInfo:
    """Which step a restore used and whether its checksums were verified.

    Attributes:
        step: the restored step.
        verified: True if every file matched the step's checksum manifest; False for a
            step written without one (its arrays were still checked to be finite).
        skipped: the newer steps that were unreadable or corrupt, newest first.
    """

    step: int
    verified: bool
    skipped: tuple[int, ...] = ()

    def describe(self) -> str:
        """E.g. ``"step 400 (integrity verified)"``."""
        return f"step {self.step} (integrity {'verified' if self.verified else 'NOT verified'})"


class CheckpointCorruptError(RuntimeError):
    """A checkpoint step whose files or arrays fail verification (the message names them)."""


def _files(root: epath.Path) -> list[epath.Path]:
    out: list[epath.Path] = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            out.extend(_files(entry))
        elif entry.name != MANIFEST and not entry.name.startswith(MANIFEST):
            out.append(entry)
    return out


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(step_dir: str | epath.PathLike) -> None:
    """Hashes every file of a finalized step into its manifest (atomically)."""
    root = epath.Path(step_dir)
    sums = {str(p.relative_to(root)): _sha256(p) for p in _files(root)}
    tmp = root / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"sha256": sums}, indent=1, sort_keys=True))
    tmp.rename(root / MANIFEST)


def verify_manifest(step_dir: str | epath.PathLike) -> bool:
    """Re-hashes a step's files against its manifest.

    Returns:
        True if verified, False if the step has no manifest (unverified).

    Raises:
        CheckpointCorruptError: naming the first file that is missing or differs.
    """
    root = epath.Path(step_dir)
    manifest = root / MANIFEST
    if not manifest.exists():
        return False
    try:
        sums = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError) as e:
        raise CheckpointCorruptError(f"checksum manifest {manifest} is unreadable: {e}") from e
    for rel, expected in sorted(sums.items()):
        path = root / rel
        if not path.exists():
            raise CheckpointCorruptError(f"{path} is missing (listed in {MANIFEST})")
        if _sha256(path) != expected:
            raise CheckpointCorruptError(
                f"{path} does not match its SHA-256 in {MANIFEST}: the file was changed or "
                "corrupted after it was written"
            )
    return True


def check_finite(tree: Any, where: str) -> None:
    """Raises :class:`CheckpointCorruptError` if a floating-point leaf holds NaN or inf."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not hasattr(leaf, "dtype") or not np.issubdtype(leaf.dtype, np.floating):
            continue
        ok = jax.numpy.isfinite(leaf).all()
        # The result is replicated: read this process's copy (works on multi-host meshes).
        if not bool(np.asarray(ok.addressable_data(0) if isinstance(ok, jax.Array) else ok)):
            raise CheckpointCorruptError(
                f"{where}: {jax.tree_util.keystr(path)} holds NaN or inf values"
            )


__all__ = [
    "MANIFEST",
    "CheckpointCorruptError",
    "RestoreInfo",
    "check_finite",
    "verify_manifest",
    "write_manifest",
]
