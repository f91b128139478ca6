"""One writer per file-sink directory: an exclusive ``flock`` on the directory itself.

Two refreshers configured on the same directory would each mint and silently
overwrite the other's files. So a process takes an exclusive, non-blocking
``flock`` on every directory its file sinks write into and holds it as long as it
writes there. The kernel drops the lock when the process exits, even on SIGKILL:
a crash never leaves a stale lock behind. The directory's own descriptor is
locked (Linux allows ``flock`` on an ``O_RDONLY | O_DIRECTORY`` descriptor), so
nothing is created in a directory that consumers read.

``flock`` locks belong to an open file description, not to a process: two
`DirectoryLocks` in one process conflict exactly as two processes would.

Where the lock cannot be taken it is not enforced, with one warning: a directory
this process cannot open for reading, a filesystem that refuses ``flock`` on a
directory (NFS emulates ``flock`` with a byte-range lock, which needs a descriptor
open for writing), and directories beyond a quarter of the open-file limit (one
descriptor each; per-tenant directories must not starve sockets and temp files).
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import threading
from collections.abc import Iterable

import structlog

from refresher.errors import Refusal, SinkError, SinkOwnedError

log = structlog.get_logger("refresher.sinks.lock")

_HELD_ELSEWHERE = frozenset({errno.EWOULDBLOCK, errno.EAGAIN})


class DirectoryLocks:
    """The file-sink directories this process owns, each held under ``flock``.

    `acquire` takes a set of directories up front and reports the ones another
    process holds; `claim` is the write path's check, which also locks a directory
    that did not exist yet when `acquire` ran. `release_all` gives every lock back
    and makes `claim` refuse until the next `acquire` (a replica that stopped
    leading must not write). Thread-safe: file sinks write from worker threads.
    """

    def __init__(self, *, max_locks: int | None = None) -> None:
        if max_locks is None:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            max_locks = 1 << 16 if soft == resource.RLIM_INFINITY else max(soft // 4, 1)
        #: Descriptors this may hold at most; further directories go unenforced.
        self.max_locks = max_locks
        #: Directory (as the sinks spell it) -> its locked descriptor.
        self._fds: dict[str, int] = {}
        #: (st_dev, st_ino) -> locked descriptor: a second spelling of a held
        #: directory must not take a second lock, which would conflict with the first.
        self._inodes: dict[tuple[int, int], int] = {}
        #: Directories that cannot be locked at all (warned once, written anyway).
        self._unenforced: set[str] = set()
        #: Directories another process holds now, with what is known of the holder.
        self._refused: dict[str, Refusal] = {}
        #: Reasons already warned about (one line per reason, not per directory).
        self._warned: set[str] = set()
        self._owning = False
        self._mutex = threading.Lock()

    def holds(self, directory: str) -> bool:
        """True if this process may write into `directory` (locked, or not lockable)."""
        return directory in self._fds or directory in self._unenforced

    def acquire(self, directories: Iterable[str]) -> list[Refusal]:
        """Lock every directory not held yet; return those another process holds.

        A directory that does not exist is skipped: `claim` locks it at the first
        write into it.
        """
        with self._mutex:
            self._owning = True
            refusals = []
            for directory in dict.fromkeys(directories):
                refusal = self._lock(directory, known=None)
                if refusal is not None:
                    refusals.append(refusal)
            return refusals

    def claim(self, directory: str) -> None:
        """Make sure this process owns `directory` before writing into it.

        Raises `SinkOwnedError` naming the holder when another process has the lock,
        and `SinkError` while this process owns nothing (after `release_all`).
        """
        if directory in self._fds or directory in self._unenforced:
            return
        with self._mutex:
            if not self._owning:
                raise SinkError(
                    f"not writing into {directory}: this replica does not own it (not leading)",
                    sink="file",
                )
            # Retried writes reuse what is known of the holder: /proc/locks is read
            # once per refusal, not once per tenant and retry.
            known = self._refused.get(directory)
            refusal = self._lock(directory, known=known)
        if refusal is None:
            if known is not None and self.holds(directory):
                log.info("sink directory lock acquired", directory=directory)
            return
        if known is None:
            log.warning(
                "sink directory owned by another process: not writing there",
                directory=directory,
                holder_pid=refusal.pid,
            )
        raise SinkOwnedError([refusal])

    def release_all(self) -> None:
        """Give every lock back (closing its descriptor releases it)."""
        with self._mutex:
            self._owning = False
            for fd in set(self._fds.values()):
                os.close(fd)
            self._fds.clear()
            self._inodes.clear()
            self._unenforced.clear()
            self._refused.clear()
            self._warned.clear()

    def _lock(self, directory: str, *, known: Refusal | None) -> Refusal | None:
        """Lock one directory (under the mutex); a `Refusal` if another process holds it."""
        if directory in self._fds or directory in self._unenforced:
            return None
        if len(self._inodes) >= self.max_locks:
            self._unenforce(directory, f"more than {self.max_locks} directories")
            return None
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None  # nothing to lock yet: the next `claim` tries again
        except OSError as exc:
            self._unenforce(directory, exc.strerror or str(exc))
            return None
        stat = os.fstat(fd)
        key = (stat.st_dev, stat.st_ino)
        held = self._inodes.get(key)
        if held is not None:
            os.close(fd)
            self._fds[directory] = held
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _HELD_ELSEWHERE:
                self._unenforce(directory, exc.strerror or str(exc))
                return None
            refusal = known or Refusal(directory, pid=holder_pid(stat))
            self._refused[directory] = refusal
            return refusal
        self._fds[directory] = fd
        self._inodes[key] = fd
        self._refused.pop(directory, None)
        return None

    def _unenforce(self, directory: str, reason: str) -> None:
        self._unenforced.add(directory)
        if reason in self._warned:
            return
        self._warned.add(reason)
        log.warning(
            "cannot lock sink directory: a second refresher writing there would go unnoticed",
            directory=directory,
            reason=reason,
        )


def holder_pid(stat: os.stat_result) -> int | None:
    """The pid holding a ``flock`` on the file `stat` describes, per /proc/locks.

    None when unknown: no procfs, or a holder in another pid namespace (shown as 0).
    """
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146491 0 EOF"; waiters have "->".
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                    pid = int(fields[4])
                    return pid if pid > 0 else None
    except (OSError, ValueError):
        return None
    return None
