"""Test-only network peers for the fault matrix.

* `nodelay`: TCP_NODELAY for an emulator's listener (test speed, see its docstring).
* `RawServer`: a raw-socket HTTP/1.1 peer, one request per connection, that either
  relays to an upstream emulator or misbehaves at the byte level (connection reset
  or FIN in the middle of the body, an endless body streamed from one reused buffer).
* `WebhookReceiver`: records notifier payloads so they can be searched for secrets.
* `closed_port()`: a bound, never-listening port (connection refused).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from refresher.clock import Clock


def nodelay(emulator: Any) -> Any:
    """Set TCP_NODELAY on a started emulator's listening socket (accepted sockets inherit it).

    `Emulator.start` creates its socket with proto 0, so asyncio's automatic
    TCP_NODELAY (which checks ``proto == IPPROTO_TCP``) never applies: every response
    on a reused connection then waits ~40 ms for a delayed ACK (Nagle). Test speed only.
    """
    server = emulator._server
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return emulator


# ------------------------------------------------------------------ raw socket peer

HUGE_CHUNK = b"x" * (64 << 10)


class RawServer:
    """One request per connection; `plan(now)` picks what happens to it:

    ``pass``      relay to the upstream emulator and back, in full (``Connection: close``);
    ``reset``     relay, send the headers and half the body, then RST (SO_LINGER 0);
    ``truncate``  relay, send the headers and half the body, then a clean FIN;
    ``huge``      answer 200 with a `huge_size` body streamed from one reused 64 KiB
                  buffer (no memory grows on this side), until the client hangs up.
    """

    def __init__(
        self,
        upstream_port: int | None,
        clock: Clock,
        plan: Callable[[float], str],
        *,
        huge_size: int = 64 << 20,
    ) -> None:
        self.upstream_port = upstream_port
        self.clock = clock
        self.plan = plan
        self.huge_size = huge_size
        self.modes: list[str] = []
        self.huge_bytes_sent = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, name="raw-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RawServer:
        self._accept.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._accept.join(5)
        for thread in self._threads:
            thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _read_message(sock: socket.socket) -> tuple[bytes, bytes] | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head, body

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.closing(conn):
            conn.settimeout(10)
            try:
                request = self._read_message(conn)
            except OSError:
                return
            if request is None:
                return
            mode = self.plan(self.clock.now())
            self.modes.append(mode)
            if mode == "huge":
                self._stream_huge(conn)
                return
            head, body = request
            lines = [
                line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")
            ]
            lines.append(b"Connection: close")
            assert self.upstream_port is not None
            with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10) as up:
                up.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
                response = self._read_message(up)
            if response is None:
                return
            rhead, rbody = response
            try:
                if mode == "pass":
                    conn.sendall(rhead + b"\r\n\r\n" + rbody)
                    return
                conn.sendall(rhead + b"\r\n\r\n" + rbody[: len(rbody) // 2])
                if mode == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                return

    def _stream_huge(self, conn: socket.socket) -> None:
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {self.huge_size}\r\nConnection: close\r\n\r\n"
        ).encode()
        view = memoryview(HUGE_CHUNK)
        try:
            conn.sendall(head)
            sent = 0
            while sent < self.huge_size:
                conn.sendall(view)
                sent += len(view)
                self.huge_bytes_sent = sent
        except OSError:
            return


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port that is bound but never listens: connecting to it is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


# ------------------------------------------------------------------ webhook receiver


class WebhookReceiver:
    """Accepts notifier webhooks (204; 500 for the first `fail_first` calls) and keeps
    every header and body."""

    def __init__(self, *, fail_first: int = 0) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if len(receiver.calls) <= fail_first else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def text(self) -> str:
        return "\n".join(f"{h!r} {b.decode(errors='replace')}" for h, b in self.calls)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
