"""Checkpoints: one small wrapper around orbax's ``CheckpointManager`` (the V0 API).

Each step directory ``<directory>/<step>/`` holds three items:

* ``state``: the train state pytree (``ocp.args.StandardSave``), stored sharded, so it
  restores onto any mesh given an abstract state that carries the target shardings;
* ``data``: the data iterator's state as JSON (e.g. grain's ``{"next_index": 12}``);
* ``config``: the run's config as JSON (e.g. ``config.to_dict()``).

Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-save leaves a ``<step>.orbax-checkpoint-tmp-*`` directory that is never
listed as a step. A finalized step can still be unreadable or corrupt (a truncated
file, a half-synced copy, bytes garbled in place): every step carries a SHA-256 manifest
(:mod:`jaxdiff.training.integrity`) and restored arrays must be finite, and
:meth:`Checkpointer.restore` warns and falls back to the previous step when a step fails.
Existing steps are never overwritten; a writer (``quarantine=True``) moves unreadable
steps aside to ``<directory>/corrupt/`` once it has restored an older one, so they
neither occupy a kept slot nor block the next saves.

Every process calls :meth:`Checkpointer.save` and :meth:`Checkpointer.restore`; orbax
decides who writes what. The ``data`` and ``config`` items are written once (by the
primary process), so the data state must be the same on every process, which holds
for grain iterators that consume the same number of batches on every host.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxdiff.training.integrity import (
    CheckpointCorruptError,
    RestoreInfo,
    check_finite,
    verify_manifest,
    write_manifest,
)
from jaxdiff.utils import storage

PyTree = Any

logger = logging.getLogger(__name__)

_STATE, _DATA, _CONFIG = "state", "data", "config"
QUARANTINE = "corrupt"
"""Subdirectory that unreadable steps are moved to (never listed as a step, never kept)."""


def _normalize_directory(directory: str | os.PathLike) -> str:
    # Remote paths (gs://...) go to orbax untouched; local ones are made absolute so
    # error messages name the real location.
    return storage.to_str(directory)


def _check_json(name: str, value: Any) -> None:
    # Orbax serialises JSON items in a background thread; checking here turns a late,
    # hard-to-trace failure into an immediate error that names the item.
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{name} must be JSON-serialisable (dicts, lists, str, int, float, bool, None), "
            f"but json.dumps failed: {e}. Convert a ConfigDict with .to_dict(), numpy "
            "scalars with .item() and arrays with .tolist()."
        ) from e


def _check_abstract_state(abstract_state: PyTree) -> None:
    # Without a target sharding orbax would fall back to the sharding stored at save
    # time, which names devices that may not exist on this mesh or host.
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            raise ValueError(
                f"abstract_state leaf {jax.tree_util.keystr(path)} has no sharding. "
                "Give every leaf a target sharding, e.g. "
                "jax.tree.map(ocp.utils.to_shape_dtype_struct, state) or "
                "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))."
            )


class Checkpointer:
    """Saves and restores train state, data-iterator state and config with orbax.

    Args:
        directory: where step directories live (local path or ``gs://...``). It is
            created on the first save, not here, so pointing a reader at a wrong path
            leaves no empty directory behind.
        max_to_keep: how many of the newest steps to keep; older ones are deleted
            after each successful save.
        async_save: write in a background thread (orbax's default). Device arrays are
            copied to host before :meth:`save` returns, so the state may be donated
            right after. Call :meth:`wait_until_finished` or :meth:`close` before exit.

    Example:
        >>> ckpt = Checkpointer(workdir + "/checkpoints")  # doctest: +SKIP
        >>> ckpt.save(step, state, data_state=it.get_state(), config=cfg)  # doctest: +SKIP
        >>> state, data_state, step = ckpt.restore(abstract_state)  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        verify: bool = True,
        quarantine: bool = False,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = _normalize_directory(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=False,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._verify, self._quarantine = verify, quarantine
        self._unsealed: list[int] = []
        self.last_restore: RestoreInfo | None = None

    def _step_dir(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def _seal(self) -> None:
        # Checksum every step whose save has finished. Orbax waits for the previous save
        # before starting a new one anyway, so this adds no extra synchronisation.
        if not self._unsealed:
            return
        self._manager.wait_until_finished()
        done = set(self._manager.all_steps())
        if jax.process_index() == 0 and self._verify:
            for step in self._unsealed:
                if step in done:
                    write_manifest(self._step_dir(step))
        self._unsealed = []

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        data_state: dict | None = None,
        config: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving ``state`` (and the JSON items) as ``step``.

        Args:
            step: the step number; names the directory ``<directory>/<step>``.
            state: pytree of ``jax.Array`` (e.g. a ``TrainState``).
            data_state: JSON-serialisable data-iterator state, e.g. grain's
                ``iterator.get_state()``; restored as the second item of :meth:`restore`.
            config: JSON-serialisable run config, read back by :func:`load_config`.
            force: save even if orbax's policy would skip this step (e.g. it is not
                newer than the last saved step).

        Returns:
            True (a save was started). After it finishes, the next :meth:`save`,
            :meth:`wait_until_finished` or :meth:`close` writes its checksum manifest.

        Raises:
            TypeError: if ``data_state`` or ``config`` is not JSON-serialisable.
            FileExistsError: if anything already occupies ``<directory>/<step>`` or a
                newer step exists (an existing step is never overwritten, and orbax
                would silently skip the save); the message names the entry.
        """
        step = int(step)
        _check_json("data_state", data_state)
        _check_json("config", config)
        self._seal()
        self.check_can_save(step - 1)
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _DATA: ocp.args.JsonSave(data_state),
                _CONFIG: ocp.args.JsonSave(config),
            }
        )
        if not self._manager.save(step, args=args, force=force):
            raise FileExistsError(
                f"orbax declined to save step {step} in {self.directory} (steps there: "
                f"{self.all_steps()}): move the newer steps away, or use another workdir"
            )
        self._unsealed.append(step)
        return True

    def check_can_save(self, after: int) -> None:
        """Raises if an entry in the directory would block saving the steps after ``after``.

        A numbered file or directory above ``after`` (a stray copy, a step of another run)
        would make orbax skip or fail later saves, so a run checks this before its first
        step.

        Raises:
            FileExistsError: naming the blocking entries and how to clear them.
        """
        root = epath.Path(self.directory)
        if not root.exists():
            return
        blocking = sorted(
            (p for p in root.iterdir() if p.name.isdigit() and int(p.name) > after),
            key=lambda p: int(p.name),
        )
        if blocking:
            names = ", ".join(os.fspath(p) for p in blocking)
            raise FileExistsError(
                f"{names} would block saving steps after {after} (existing steps are never "
                f"overwritten): move them out of {self.directory}, or use another workdir"
            )

    def latest_step(self) -> int | None:
        """The newest finalized step on disk (possibly unreadable), or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All finalized steps on disk, oldest first (in-progress saves excluded)."""
        return sorted(self._manager.all_steps())

    def _verified(self, step: int) -> bool:
        return verify_manifest(self._step_dir(step)) if self._verify else False

    def _restore_step(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict | None]:
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(abstract_state), _DATA: ocp.args.JsonRestore()}
        )
        restored = self._manager.restore(step, args=args)
        check_finite(restored[_STATE], self._step_dir(step))
        return restored[_STATE], restored[_DATA]

    def _restore_subtree_step(self, step: int, item: PyTree) -> PyTree:
        def arg(a):
            return ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)

        restore_args = jax.tree.map(arg, item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: args}))[_STATE]
        check_finite(restored, self._step_dir(step))
        return restored

    def restore(
        self, abstract_state: PyTree, step: int | None = None
    ) -> tuple[PyTree, dict | None, int]:
        """Restores a step onto the shardings given by ``abstract_state``.

        With ``step=None`` steps are tried newest first; a step that fails to restore
        is logged as a warning (path and error) and the previous one is tried. (On
        several hosts, a step must be unreadable for all of them alike, as it is on a
        shared file system or bucket, or the hosts would pick different steps.)

        Args:
            abstract_state: pytree matching the saved state, of ``jax.ShapeDtypeStruct``
                with ``.sharding`` set (e.g. ``jax.eval_shape(init)`` plus shardings, or
                ``jax.tree.map(ocp.utils.to_shape_dtype_struct, state)``). Arrays come
                back with exactly these shardings, whatever mesh they were saved from.
            step: a specific step to restore, without fallback; ``None`` for the newest
                readable one.

        Returns:
            ``(state, data_state, step)``; ``data_state`` is what was passed to
            :meth:`save` (``None`` if nothing was).

        Raises:
            FileNotFoundError: if there is no checkpoint at all, or ``step`` is missing.
            ValueError: if a leaf of ``abstract_state`` has no sharding.
            RuntimeError: if no step (or the requested ``step``) could be restored.
        """
        _check_abstract_state(abstract_state)
        (state, data_state), found = self._first_readable(
            lambda s: self._restore_step(s, abstract_state), step
        )
        return state, data_state, found

    def restore_subtree(self, item: PyTree, step: int | None = None) -> tuple[PyTree, int]:
        """Restores only part of the saved state, e.g. one EMA copy of the params.

        Nothing outside ``item`` is read, so sampling a run never loads its optimizer
        state. Falls back to older steps like :meth:`restore`.

        Args:
            item: a nested dict naming the wanted part of the saved state by its keys
                (a dataclass state is stored as a dict of its fields), with
                ``jax.ShapeDtypeStruct`` leaves carrying target shardings, e.g.
                ``{"ema": {"0.999": abstract_params}}``.
            step: a specific step, without fallback; ``None`` for the newest readable.

        Returns:
            ``(subtree, step)``.

        Raises:
            FileNotFoundError, ValueError, RuntimeError: as :meth:`restore`.
        """
        _check_abstract_state(item)
        return self._first_readable(lambda s: self._restore_subtree_step(s, item), step)

    def _first_readable(self, restore_fn, step: int | None):
        # Finish our own pending saves, then pick up steps written since construction
        # (e.g. by another Checkpointer on the same directory).
        self._seal()
        self._manager.wait_until_finished()
        self._manager.reload()

        def checked(candidate):
            verified = self._verified(candidate)  # before trusting any byte of it
            return restore_fn(candidate), verified

        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoint found in {self.directory}. Train first, e.g. "
                f"`python -m train --config=... --workdir=...`, and point at the "
                "workdir's checkpoint directory."
            )
        if step is not None:
            step = int(step)
            if step not in steps:
                raise FileNotFoundError(
                    f"no checkpoint for step {step} in {self.directory}; available steps: {steps}"
                )
            try:
                restored, verified = checked(step)
            except Exception as e:
                path = storage.join(self.directory, str(step))
                raise RuntimeError(f"could not restore checkpoint {path}: {e}") from e
            self._record(RestoreInfo(step, verified))
            return restored, step

        errors, skipped = [], []
        for candidate in reversed(steps):
            path = storage.join(self.directory, str(candidate))
            try:
                restored, verified = checked(candidate)
            except Exception as e:  # Any failure means "unreadable": try an older step.
                logger.warning(
                    "could not restore checkpoint %s (%s: %s); trying the previous step",
                    path,
                    type(e).__name__,
                    e,
                )
                errors.append(f"{path}: {type(e).__name__}: {e}")
                skipped.append(candidate)
                continue
            self._record(RestoreInfo(candidate, verified, tuple(skipped)))
            return restored, candidate
        # Nothing readable: keep every step where it is, for inspection.
        raise CheckpointCorruptError(
            f"none of the {len(steps)} checkpoints in {self.directory} could be restored and "
            "nothing there was changed. Errors, newest first:\n" + "\n".join(errors) + "\n"
            "If the files are corrupt, restore them from a copy or move the directory aside "
            "to start over; if the state changed shape, the config differs from the run's."
        )

    def _record(self, info: RestoreInfo) -> None:
        self.last_restore = info
        if not info.verified and self._verify:
            logger.warning(
                "restored %s from %s: it has no checksum manifest (written by an older "
                "version, or the writer stopped right after saving); its arrays are finite",
                info.describe(),
                self.directory,
            )
        if self._quarantine and info.skipped and jax.process_index() == 0:
            # Unreadable newer steps must not occupy kept slots or block the next saves.
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for bad in info.skipped:
                dest = epath.Path(self.directory) / QUARANTINE / f"{bad}-{stamp}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                epath.Path(self._step_dir(bad)).rename(dest)
                logger.warning("moved unreadable step %d aside to %s", bad, dest)
            self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True once a preemption notice reached this job (orbax's multi-host sync point).

        On TPU the distributed runtime turns the preemption signal into a notice that every
        process sees at the same ``step``, so all of them save together.
        """
        return bool(self._manager.reached_preemption(step))

    def wait_until_finished(self) -> None:
        """Blocks until all pending async saves are written, finalized and checksummed."""
        self._manager.wait_until_finished()
        self._seal()

    def close(self) -> None:
        """Waits for pending saves (and their checksums) and releases orbax's resources."""
        self.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_config(directory: str | os.PathLike, step: int | None = None) -> dict | None:
    """Reads the config stored with the newest step whose config is readable.

    Args:
        directory: the checkpoint directory given to :class:`Checkpointer`.
        step: read this step's config only (no fallback); None for the newest readable.

    Returns:
        The config dict, or ``None`` if the directory holds no checkpoint (or the
        config saved with the newest readable step was ``None``).

    Raises:
        RuntimeError: if checkpoints exist but no step's config can be read.
    """
    path = _normalize_directory(directory)
    if not storage.isdir(path):
        return None
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
    try:
        steps = sorted(manager.all_steps())
        if step is not None:
            steps = [s for s in steps if s == int(step)]
        errors = []
        for step in reversed(steps):
            try:
                args = ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
                return manager.restore(step, args=args)[_CONFIG]
            except Exception as e:  # Unreadable step: fall back as restore() does.
                step_path = storage.join(path, str(step))
                logger.warning("could not read the config of %s (%s); trying older", step_path, e)
                errors.append(f"{step_path}: {type(e).__name__}: {e}")
        if errors:
            raise RuntimeError(f"no readable config in {path}:\n" + "\n".join(errors))
        return None
    finally:
        manager.close()
