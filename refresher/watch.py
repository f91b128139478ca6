"""Watching credential and tenant files for changes.

Kubernetes updates a mounted Secret by swapping the ``..data`` symlink in its
directory, and editors save by writing a new file and renaming it over the old one:
in both cases the watched *path* never sees a write. So we watch the parent
directories (watchfiles / inotify) and, on any event there, compare each watched
file's content hash: a callback fires only when what the path resolves to really
changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import structlog
import watchfiles

log = structlog.get_logger("refresher.watch")

Callback = Callable[[Path], Awaitable[None]]


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class FileWatcher:
    """Calls back when the content behind a watched path changes."""

    def __init__(
        self,
        *,
        debounce_ms: int = 50,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self._callbacks: dict[Path, list[Callback]] = {}
        #: A failing callback is reported here and the watch goes on.
        self.on_error = on_error
        self._digests: dict[Path, str | None] = {}
        self.debounce_ms = debounce_ms
        self._stop = anyio.Event()
        self.ready = anyio.Event()

    def watch(self, path: Path, callback: Callback) -> None:
        path = Path(path).absolute()
        self._callbacks.setdefault(path, []).append(callback)
        self._digests[path] = _digest(path)

    @property
    def paths(self) -> list[Path]:
        return list(self._callbacks)

    async def check(self) -> None:
        """Compare every watched file with its last known content; fire callbacks."""
        for path, callbacks in list(self._callbacks.items()):
            digest = _digest(path)
            if digest is None or digest == self._digests.get(path):
                # A vanished file is mid-swap or deleted: keep the old credential.
                continue
            self._digests[path] = digest
            log.info("watched file changed", path=str(path))
            for callback in callbacks:
                try:
                    await callback(path)
                except Exception as exc:
                    if self.on_error is None:
                        raise
                    self.on_error(exc)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch until cancelled or `stop()`."""
        directories = sorted({str(p.parent) for p in self._callbacks if p.parent.is_dir()})
        if not directories:
            task_status.started()
            self.ready.set()
            await self._stop.wait()
            return
        task_status.started()
        async for _changes in watchfiles.awatch(
            *directories,
            watch_filter=None,
            debounce=self.debounce_ms,
            step=20,
            recursive=False,
            stop_event=self._stop,
            yield_on_timeout=True,
            rust_timeout=200,
        ):
            self.ready.set()
            await self.check()

    def stop(self) -> None:
        self._stop.set()
