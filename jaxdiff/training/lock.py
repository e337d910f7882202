"""One writer per workdir: a lock file naming its holder.

Two trainers on one workdir would interleave ``metrics.jsonl``, delete each other's
checkpoints and end in orbax errors or a hang. :class:`WorkdirLock` creates
``<workdir>/.jaxdiff.lock`` atomically (``O_CREAT | O_EXCL``) with the holder's host, pid,
start time and command, and removes it on exit. A second writer fails at once with a
message naming the holder. A lock left by a process that died without cleaning up (kill -9,
a crash) is detected when its host is this host and its pid is gone: the lock is reported
as stale and taken over. A lock from another host cannot be checked from here; the error
gives the command that clears it. Readers (``python -m sample``) take no lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

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

    Remote workdirs (``gs://...``) are not locked: object stores have no atomic create.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.fspath(workdir)
        self.path = None if "://" in self.workdir else Path(self.workdir) / LOCK_NAME
        self._held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return True

    def acquire(self) -> WorkdirLock:
        """Takes the lock, or raises at once if a live process holds it.

        Raises:
            WorkdirLockedError: naming the holder (host, pid, start, command) and the fix.
        """
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
                self.path.unlink(missing_ok=True)
                continue
            break
        who = f"pid {pid} on {host}" if host else "an unknown process"
        raise WorkdirLockedError(
            f"workdir {self.workdir} is in use by {who} (started "
            f"{holder.get('started', '?')}: {holder.get('command', '?')}). Wait for it to "
            f"finish or use another --workdir; if that process is gone, clear the lock "
            f"with: rm {self.path}"
        )

    def release(self) -> None:
        """Removes the lock if this process holds it."""
        if self._held and self.path is not None:
            if self._holder().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


__all__ = ["LOCK_NAME", "WorkdirLock", "WorkdirLockedError"]
