"""The systemd service notification protocol (``sd_notify(3)``), implemented directly.

systemd passes a ``Type=notify`` service the address of a datagram socket in
``$NOTIFY_SOCKET``. The service reports its state by sending newline-separated
``KEY=VALUE`` assignments to it: ``READY=1`` once it serves, ``RELOADING=1`` and
then ``READY=1`` around a configuration reload, ``STOPPING=1`` on shutdown,
``STATUS=…`` for ``systemctl status``, and ``WATCHDOG=1`` keep-alives when the unit
sets ``WatchdogSec=``. An address starting with ``@`` names a socket in the Linux
abstract namespace (sent with a leading NUL byte).

Without ``$NOTIFY_SOCKET`` (not started by systemd, or not ``Type=notify``) the
notifier is disabled and every call is a cheap no-op. Sending never raises and
never blocks: systemd going away (or its queue filling up) must not take the
daemon down, so failures are logged at debug level and reported as ``False``.

Typical use::

    notifier = SystemdNotifier.from_env()
    notifier.ready("3 jobs, all tokens valid")
    interval = notifier.watchdog_interval()   # ping this often, or None
    ...
    notifier.reloading(); reload(); notifier.ready()
    notifier.stopping()
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType

import anyio
import structlog

__all__ = ["SystemdNotifier"]

log = structlog.get_logger(__name__)

# Keys systemd understands are upper-case ASCII letters, digits and underscores.
_KEY = re.compile(r"[A-Z][A-Z0-9_]*")
_DIGITS = re.compile(r"[0-9]+")
# systemd's manager reads notifications into a PIPE_BUF (4096-byte) buffer and
# ignores longer datagrams; STATUS= text is cut (in UTF-8 bytes) well below that.
_STATUS_MAX_BYTES = 1024


def _one_line(text: str) -> str:
    """Collapse line breaks so a value can never smuggle in extra assignments."""
    return " ".join(text.splitlines())


def _monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, the clock systemd compares against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotifier:
    """Sends state notifications to systemd over ``$NOTIFY_SOCKET``.

    Build one with `from_env`. A notifier without an address is disabled: every
    method returns ``False`` without doing anything. The datagram socket is
    created on first use, non-blocking and close-on-exec, and kept until
    `close` (the notifier is also a context manager). Safe to share between
    threads.
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
    ) -> None:
        """Target `address` (a path, or ``@name`` for an abstract socket; ``None``
        disables), plus the raw ``WATCHDOG_USEC`` / ``WATCHDOG_PID`` values."""
        self._address = address or None
        self._sockaddr: str | None = None
        if self._address is not None:
            if self._address.startswith("@"):
                self._sockaddr = "\0" + self._address[1:]
            elif self._address.startswith("/"):
                self._sockaddr = self._address
            else:
                # e.g. systemd >= 254 "vsock:CID:PORT", which AF_UNIX cannot reach.
                log.debug(
                    "sd_notify address not supported, notifications disabled",
                    notify_socket=self._address,
                )
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """Notifier for ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``.

        Reads `environ` (default: ``os.environ``). The result is disabled when
        ``NOTIFY_SOCKET`` is unset or empty.
        """
        env = os.environ if environ is None else environ
        return cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_usec=env.get("WATCHDOG_USEC"),
            watchdog_pid=env.get("WATCHDOG_PID"),
        )

    @property
    def address(self) -> str | None:
        """The ``NOTIFY_SOCKET`` value as given (``@name`` for abstract sockets)."""
        return self._address

    @property
    def enabled(self) -> bool:
        """Whether notifications are actually sent anywhere."""
        return self._sockaddr is not None

    def __repr__(self) -> str:
        return f"SystemdNotifier(address={self._address!r}, enabled={self.enabled})"

    # ------------------------------------------------------------------ sending

    def send(self, *lines: str) -> bool:
        """Send `lines` (each one ``KEY=VALUE`` assignment) as a single datagram.

        Line breaks inside a line are replaced by spaces. Returns ``True`` when
        the datagram was handed to the kernel, ``False`` when disabled, when
        there is nothing to send, or when sending failed (logged at debug
        level; never raised, never blocks).
        """
        if self._sockaddr is None or not lines:
            return False
        payload = "\n".join(_one_line(line) for line in lines).encode(errors="replace")
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX,
                        socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                    )
                self._sock.sendto(payload, socket.MSG_NOSIGNAL, self._sockaddr)
        except OSError as exc:
            log.debug(
                "sd_notify send failed",
                notify_socket=self._address,
                keys=[line.partition("=")[0] for line in lines],
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        return True

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` assignments, e.g. ``notify(READY=1, STATUS="ok")``.

        Booleans become ``1``/``0``. Keys must be upper case (``ValueError``
        otherwise: systemd would silently ignore them). Returns like `send`.
        """
        lines = []
        for key, value in fields.items():
            if not _KEY.fullmatch(key):
                raise ValueError(f"invalid sd_notify key {key!r}: use upper case, e.g. STATUS")
            text = str(int(value)) if isinstance(value, bool) else str(value)
            lines.append(f"{key}={text}")
        return self.send(*lines)

    # -------------------------------------------------------------- conveniences

    @staticmethod
    def _status_line(text: str) -> str:
        data = _one_line(text).encode(errors="replace")[:_STATUS_MAX_BYTES]
        return "STATUS=" + data.decode(errors="ignore")

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up (or a reload) finished; optionally with a status."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(self._status_line(status))
        return self.send(*lines)

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status`` (cut at 1 KiB)."""
        return self.send(self._status_line(text))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC=`` (as ``Type=notify-reload`` requires).

        Send `ready` when the reload is done.
        """
        lines = ["RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}"]
        if status is not None:
            lines.append(self._status_line(status))
        return self.send(*lines)

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(self._status_line(status))
        return self.send(*lines)

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: ask for `seconds` more before the current
        start/reload/stop timeout fires (for a slow start-up or shutdown)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the keep-alive ping for ``WatchdogSec=``."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between `watchdog` pings, or ``None`` when no watchdog applies.

        Half of ``WATCHDOG_USEC`` (as ``sd_watchdog_enabled(3)`` recommends),
        provided it is a positive integer and ``WATCHDOG_PID`` is unset or names
        this process. A malformed value means no watchdog. The PID is compared
        at call time, so a forked child never inherits the duty.
        """
        raw = self._watchdog_usec
        if raw is None or not _DIGITS.fullmatch(raw):
            return None
        usec = int(raw)
        if usec <= 0:
            return None
        pid = self._watchdog_pid
        if pid is not None and (not _DIGITS.fullmatch(pid) or int(pid) != os.getpid()):
            return None
        return usec / 2 / 1_000_000

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def keep_informed(
    notifier: SystemdNotifier,
    settled: anyio.Event,
    status: Callable[[], str],
    *,
    ready_at_latest: float,
) -> None:
    """READY=1 once `settled` is set (or after `ready_at_latest` seconds at most), then
    WATCHDOG=1 and STATUS=`status()` every watchdog interval, until cancelled."""
    if not notifier.enabled:
        return
    with anyio.move_on_after(ready_at_latest):
        await settled.wait()
    notifier.ready(status())
    interval = notifier.watchdog_interval() or 10.0
    while True:
        await anyio.sleep(interval)
        notifier.watchdog()
        notifier.status(status())
