"""One writer per workdir: a lock file naming its holder.

Two trainers on one workdir would interleave ``metrics.jsonl``, delete each other's
checkpoints and end in orbax errors or a hang. :class:`WorkdirLock` creates
``<workdir>/.jaxdiff.lock`` atomically (``O_CREAT | O_EXCL``) with the holder's host, pid,
start time and command, and removes it on exit. A second writer fails at once with a
message naming the holder. A lock left by a process that died without cleaning up (kill -9,
a crash) is detected when its host is this host and its pid is gone: the lock is reported
as stale and taken over. A lock from another host cannot be checked from here; the error
gives the command that clears it. Readers (``python -m sample``) take no lock.

Object stores (``gs://`` workdirs) have no exclusive create, so there the lock is written
only if absent and read back to check that this process won; two runs started within the
same moment could both pass, but a second run started later -- the usual mistake --
fails exactly as on local disk.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid

from jaxdiff.utils import storage

log = logging.getLogger(__name__)

LOCK_NAME = ".jaxdiff.lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir (the message names it and the fix)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """Holds ``<workdir>/.jaxdiff.lock`` while a run writes to ``workdir``.

    Example:
        >>> with WorkdirLock("runs/digits"):  # doctest: +SKIP
        ...     train(...)

    Remote workdirs (``gs://...``) are locked on a best-effort basis (see the module doc).
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = storage.to_str(workdir)
        self.path = storage.join(self.workdir, LOCK_NAME)
        self._remote = storage.is_remote(self.path)
        self._held = False
        self._token = uuid.uuid4().hex

    def _holder(self) -> dict:
        try:
            return json.loads(storage.read_text(self.path))
        except (OSError, ValueError):
            return {}

    def _create(self) -> bool:
        info = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv),
                "token": self._token,
            }
        )
        if self._remote:
            if storage.exists(self.path):
                return False
            storage.write_text(self.path, info)
            return self._holder().get("token") == self._token
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(info)
        return True

    def acquire(self) -> WorkdirLock:
        """Takes the lock, or raises at once if a live process holds it.

        Raises:
            WorkdirLockedError: naming the holder (host, pid, start, command) and the fix.
        """
        storage.makedirs(self.workdir)
        for _ in range(2):
            if self._create():
                self._held = True
                return self
            holder = self._holder()
            host, pid = holder.get("host"), holder.get("pid")
            if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
                log.warning(
                    "stale lock %s: pid %d on %s (started %s) is no longer running; taking it over",
                    self.path,
                    pid,
                    host,
                    holder.get("started", "?"),
                )
                storage.remove(self.path)
                continue
            break
        who = f"pid {pid} on {host}" if host else "an unknown process"
        raise WorkdirLockedError(
            f"workdir {self.workdir} is in use by {who} (started "
            f"{holder.get('started', '?')}: {holder.get('command', '?')}). Wait for it to "
            f"finish or use another --workdir; if that process is gone, clear the lock "
            f"with: {'gsutil rm' if self._remote else 'rm'} {self.path}"
        )

    def release(self) -> None:
        """Removes the lock if this process holds it."""
        if self._held:
            if self._holder().get("token") == self._token:
                storage.remove(self.path)
            self._held = False

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


__all__ = ["LOCK_NAME", "WorkdirLock", "WorkdirLockedError"]
