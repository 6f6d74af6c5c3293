"""The training workdir lock: one trainer per workdir.

A training run holds an exclusive `fcntl.flock` on WORKDIR/.lock for its
whole life; the file records who holds it (`{"pid", "host", "since"}`, one
JSON line) and is removed when the run ends. The kernel drops the lock when
the process ends, however it ends (kill -9 included), so a lock is never
stale: a file left behind by a killed run is only a record of its last holder,
and the next run takes it over.

A second trainer on the same workdir fails at once, before it compiles or
writes anything, with `WorkdirBusy` (exit code 9) naming the PID and host of
the holder.

Multi-process runs: every process writes into the workdir (its shards of each
checkpoint and its data-iterator state), so every process locks its own file:
process 0 WORKDIR/.lock, process k WORKDIR/.lock.process-<k>. The processes of
one run never contend (each has its own index); a second run of any process
count fails on process 0's lock at the latest (on a shared filesystem), or on
each host's own files (local disks at the same path).

Readers (evaluation, export, `load_workdir_model`, `init_from`) never take the
lock: Orbax writes a step into a temporary directory and renames it when it is
complete, and readers list finished step directories only.

On a filesystem without flock support (some FUSE mounts) the run warns once and
goes on unlocked.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Optional

from msit_jax.errors import WorkdirBusy

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
PROCESS_LOCK_FILE = ".lock.process-{index}"
_READ_RETRY_S = 1.0  # the holder writes its record just after taking the lock


def lock_path(workdir: str, process_index: int = 0) -> str:
    """The lock file of one process of a run (process 0: WORKDIR/.lock)."""
    name = LOCK_FILE if process_index == 0 else PROCESS_LOCK_FILE.format(index=process_index)
    return os.path.join(workdir, name)


def read_holder(path: str) -> dict:
    """What a lock file records ({} when empty or unreadable)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process (its PID and host are not recorded yet)"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"PID {holder['pid']} on host {holder.get('host', '?')}{since}"


class WorkdirLock:
    """An exclusive flock on a workdir's lock file, held from `acquire` to `release`
    (or the end of the process). Also a context manager."""

    def __init__(self, workdir: str, process_index: int = 0):
        self.workdir = workdir
        self.path = lock_path(workdir, process_index)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "WorkdirLock":
        """Take the lock or raise WorkdirBusy (never waits). Writes nothing but the lock
        file's own record."""
        if self._fd is not None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy() from None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    log.warning("%s: the filesystem does not support file locks (%s): "
                                "training unlocked; make sure no other run uses this workdir",
                                self.path, e.strerror)
                    return self
                raise
            # The holder removes the file when it releases: a lock taken on a file that
            # was removed (or replaced) meanwhile guards nothing; take the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _busy(self) -> WorkdirBusy:
        holder, t0 = read_holder(self.path), time.monotonic()
        while not holder.get("pid") and time.monotonic() - t0 < _READ_RETRY_S:
            time.sleep(0.05)
            holder = read_holder(self.path)
        return WorkdirBusy(
            f"workdir {self.workdir} is in use by another training run: {self.path} is "
            f"locked by {describe_holder(holder)}; nothing was written. Wait for that run "
            "to end (or stop it), or use another --workdir", path=self.path, holder=holder)

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed while still held, so no
        other run can have taken it in between)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            try:  # explicitly: a forked child sharing the descriptor would keep it
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
