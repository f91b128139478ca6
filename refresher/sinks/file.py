"""File sink: temp file in the same directory → write → fsync → chmod/chown →
rename over the target → fsync the directory. A reader sees the old file or the
new one, never a torn or empty one, and a crash leaves at most a stray temp file
(named ``.<name>.tmp-*``, swept at the next start). On tmpfs/ramfs, where nothing
survives a reboot anyway, both fsyncs are skipped and the write runs on the event
loop (it cannot block there).

`AtomicFile` is that writer; `FileSink` puts one token in it in a format, and
bundles and rendered templates (`refresher.sinks.bundle`, `.template`) use it too.
A writer given `DirectoryLocks` (the daemon's) writes, removes and sweeps only in a
directory this process holds the lock of, and locks it at the first write if it
did not exist when the daemon started (see `refresher.sinks.lock`).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import random
import re
import stat
import threading
from pathlib import Path
from typing import Any

import anyio
import structlog

from refresher.config import FileSinkConfig
from refresher.errors import SinkError
from refresher.sinks.lock import DirectoryLocks
from refresher.token import Token, parse_rfc3339, rfc3339

log = structlog.get_logger("refresher.sinks.file")


def render(token: Token, config: FileSinkConfig) -> bytes:
    """The file content for `token` in the configured format."""
    if config.format == "raw":
        return token.value.encode() + b"\n"
    if config.format == "header":
        header = header_name(token, config)
        if header.lower() == "authorization":
            return f"{header}: {token.token_type} {token.value}\n".encode()
        return f"{header}: {token.value}\n".encode()
    if config.format == "env":
        name = config.env_name
        lines = [f"{name}={token.value}", f"{name}_TYPE={token.token_type}"]
        if token.expires_at is not None:
            lines.append(f"{name}_EXPIRES_AT={rfc3339(token.expires_at)}")
        return ("\n".join(lines) + "\n").encode()
    document: dict[str, Any] = {
        "value": token.value,
        "token_type": token.token_type,
        "expires_at": rfc3339(token.expires_at),
        "obtained_at": rfc3339(token.obtained_at),
        "scope": token.scope,
        "fingerprint": token.fingerprint(),
        "metadata": dict(token.extra),
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def header_name(token: Token, config: FileSinkConfig) -> str:
    """The header a ``format: header`` file uses for `token`."""
    if config.header_name:
        return config.header_name
    chosen = token.extra.get("header")
    return chosen if isinstance(chosen, str) else "Authorization"


def parse(content: bytes, config: FileSinkConfig) -> Token | None:
    """Recover the token a file holds (for restart); None if it cannot be trusted."""
    try:
        text = content.decode()
    except UnicodeDecodeError:
        return None
    value: str | None = None
    token_type = "Bearer"
    expires_at: float | None = None
    obtained_at: float | None = None
    scope = None
    extra: dict[str, Any] = {}
    if config.format == "json":
        try:
            doc = json.loads(text)
            value = doc["value"]
            token_type = doc.get("token_type") or "Bearer"
            expires_at = parse_rfc3339(doc["expires_at"]) if doc.get("expires_at") else None
            obtained_at = parse_rfc3339(doc["obtained_at"]) if doc.get("obtained_at") else None
            scope = doc.get("scope")
            extra = dict(doc.get("metadata") or {})
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
    elif config.format == "raw":
        value = text.strip()
    elif config.format == "header":
        name, _, rest = text.strip().partition(": ")
        parts = rest.split(" ", 1)
        if len(parts) == 2 and name.lower() == "authorization":
            token_type, value = parts
        else:
            value = rest
    else:
        env = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        value = env.get(config.env_name)
        token_type = env.get(f"{config.env_name}_TYPE", "Bearer")
        if env.get(f"{config.env_name}_EXPIRES_AT"):
            with contextlib.suppress(ValueError):
                expires_at = parse_rfc3339(env[f"{config.env_name}_EXPIRES_AT"])
    if not isinstance(value, str) or not value:
        return None
    return Token.recovered(
        value,
        token_type=token_type,
        expires_at=expires_at,
        obtained_at=obtained_at,
        scope=scope,
        extra=extra,
    )


class AtomicFile:
    """A file replaced atomically with `mode` and optional `group`: what a file sink,
    a bundle and a rendered template are written with (an `Output`)."""

    def __init__(
        self, path: Path, *, mode: int = 0o600, group: str | int | None = None, kind: str = "file"
    ) -> None:
        self.path = path
        self.target = str(path)
        self.mode = mode
        self.group = group
        #: The sink kind errors name.
        self.kind = kind
        # Plain strings: pathlib costs more than the syscalls on this path.
        self.directory = str(path.parent)
        self._temp_prefix = os.path.join(self.directory, f".{path.name}.tmp-")
        #: Set by the daemon: the locks that make it the only writer of `directory`.
        self.locks: DirectoryLocks | None = None
        self._swept = False
        self._memory: bool | None = None

    async def put(self, content: bytes) -> None:
        """Replace the file's content (see the module docstring)."""
        if self._inline():
            self._write_sync(content)
        else:
            await anyio.to_thread.run_sync(self._write_sync, content)

    async def get(self) -> bytes | None:
        """The file's content; None when it cannot be read. The first call sweeps what
        a crash mid-write left (possibly half a token)."""
        try:
            if self._inline():
                return self._read_sync()
            return await anyio.to_thread.run_sync(self._read_sync)
        except OSError:
            return None

    def _read_sync(self) -> bytes:
        self._first_use()
        return self.path.read_bytes()

    def stamp(self) -> object | None:
        """The file's identity and change time: every write renames a new inode in."""
        try:
            info = os.stat(self.target)
        except OSError:
            return None
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    def _inline(self) -> bool:
        """Do the I/O on the event loop when nothing can block: the directory is on
        a memory filesystem (tmpfs/ramfs, where fsync is a no-op) and no group name
        needs an NSS lookup. A thread hop costs more than the write there."""
        if self._memory is None:
            self._memory = memory_backed(self.directory)
        return self._memory and not isinstance(self.group, str)

    async def remove(self) -> None:
        try:
            await anyio.to_thread.run_sync(self._remove_sync)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SinkError(f"cannot remove {self.path}: {exc.strerror}", sink=self.kind) from None

    def _remove_sync(self) -> None:
        if self.locks is not None:
            self.locks.claim(self.directory)
        self.path.unlink()

    def _write_sync(self, content: bytes) -> None:
        if self.locks is not None:
            self.locks.claim(self.directory)
        self._first_use()
        # Unpredictability is not needed (O_EXCL, private directory), so no syscall.
        tmp = f"{self._temp_prefix}{random.getrandbits(32):08x}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(content)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if not self._memory:  # tmpfs/ramfs: fsync is a no-op syscall
                    os.fsync(fd)
                os.fchmod(fd, self.mode)
                if self.group is not None:
                    os.fchown(fd, -1, _gid(self.group))
            finally:
                os.close(fd)
            # rename() replaces a symlink at `path` itself; it never writes through it.
            os.rename(tmp, self.target)
            if not self._memory:  # on tmpfs/ramfs there is nothing to make durable
                dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if exc.errno == errno.ENOENT and not os.path.isdir(self.directory):
                raise SinkError(
                    f"cannot write {self.path}: directory does not exist", sink=self.kind
                ) from None
            reason = errno.errorcode.get(exc.errno or 0, "error")
            raise SinkError(
                f"cannot write {self.path}: {exc.strerror or exc} ({reason})", sink=self.kind
            ) from None

    def _first_use(self) -> None:
        """Once per sink: sweep crash leftovers and check the directory is private."""
        if self._swept:
            return
        if self.locks is not None and not self.locks.holds(self.directory):
            return  # the temp files there may be another live writer's, not leftovers
        self._swept = True
        self._clean_stale_temps()
        try:
            mode = self.path.parent.stat().st_mode
        except OSError:
            return
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            log.warning(
                "sink directory is world-writable: anyone can replace the token file",
                directory=str(self.path.parent),
            )

    def _clean_stale_temps(self) -> None:
        # Leftovers of a crash mid-write; ours only (same target name). One listing
        # per directory, shared by its sinks: N tenants must not list N x N entries.
        for path in _stale_temps(self.path.parent).pop(self.path.name, []):
            with contextlib.suppress(OSError):
                os.unlink(path)


class FileSink(AtomicFile):
    """Writes a token to `path` in the configured format."""

    def __init__(self, config: FileSinkConfig, path: Path) -> None:
        super().__init__(path, mode=config.mode, group=config.group)
        self.config = config

    async def write(self, token: Token) -> None:
        await self.put(render(token, self.config))

    async def read_back(self) -> Token | None:
        content = await self.get()
        return None if content is None else parse(content, self.config)


_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-[0-9a-f]{8}$")
#: A cache, not state: one directory listing per (directory, mtime), shared by the
#: sinks of that directory, each taking its own entries out.
_stale: dict[str, tuple[int, dict[str, list[str]]]] = {}
_stale_lock = threading.Lock()


def _stale_temps(directory: Path) -> dict[str, list[str]]:
    """Crash leftovers in `directory` by target name (listed once while unchanged)."""
    try:
        mtime = os.stat(directory).st_mtime_ns
    except OSError:
        return {}
    key = str(directory)
    with _stale_lock:
        cached = _stale.get(key)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        found: dict[str, list[str]] = {}
        try:
            for entry in os.scandir(directory):
                match = _TEMP_NAME.match(entry.name)
                if match:
                    found.setdefault(match["target"], []).append(entry.path)
        except OSError:
            pass
        _stale[key] = (mtime, found)
        return found


#: Filesystems whose writes and fsyncs never wait for a device.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
_memory_backed: dict[str, bool] = {}


def memory_backed(directory: str) -> bool:
    """True if `directory` lives on tmpfs/ramfs (per /proc/self/mounts; a cache by
    directory, so 10,000 sinks in one directory read the mount table once)."""
    found = _memory_backed.get(directory)
    if found is None:
        found = _fstype(os.path.realpath(directory)) in MEMORY_FILESYSTEMS
        _memory_backed[directory] = found
    return found


def _fstype(path: str) -> str | None:
    try:
        with open("/proc/self/mounts") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


def _gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SinkError(f"unknown group {group!r}", sink="file") from None
