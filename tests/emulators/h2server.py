"""An ASGI app served by hypercorn over TLS, its ALPN offering ``h2`` and ``http/1.1``:
the server HTTP/2 is tested against (uvicorn speaks HTTP/1.1 only). It runs in a thread
on port 0 with a throw-away trustme CA, and records which HTTP version and which
connection (the client's address) carried each request."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import trustme
from hypercorn.asyncio import serve
from hypercorn.config import Config

from tests.emulators.tls import ASGIApp


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    http_version: str
    peer: tuple[str, int]
    path: str


def hypercorn_config(
    certfile: Path, keyfile: Path, listener: socket.socket, *, streams: int = 100
) -> Config:
    """hypercorn serving TLS on `listener` (whose ownership passes to hypercorn), with
    neither idle timeouts nor request caps that would close a connection mid-test."""
    config = Config()
    config.certfile, config.keyfile = str(certfile), str(keyfile)
    listener.listen(1024)
    config.bind = [f"fd://{listener.detach()}"]
    config.keep_alive_timeout = 300
    config.keep_alive_max_requests = 1 << 40
    config.h2_max_concurrent_streams = streams
    config.graceful_timeout = 1
    config.backlog = 1024
    config.loglevel = "WARNING"
    config.accesslog = None
    return config


def issue_certificate(host: str, directory: Path) -> tuple[Path, Path, Path]:
    """A fresh CA and a certificate for `host` and localhost: (CA file, cert, key)."""
    ca = trustme.CA()
    issued = ca.issue_cert(host, "localhost")
    ca_file, cert, key = directory / "ca.crt", directory / "tls.crt", directory / "tls.key"
    ca.cert_pem.write_to_path(str(ca_file))
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return ca_file, cert, key


class HypercornServer:
    """``with HypercornServer(app) as server:`` `server.url` (https), `server.ca_file`;
    `server.seen` lists every HTTP request in arrival order."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.port = 0
        self.seen: list[Seen] = []
        self.ca_file: Path | None = None
        self._dir: Path | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failed: BaseException | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def http_versions(self) -> set[str]:
        return {seen.http_version for seen in self.seen}

    def connections(self) -> set[tuple[str, int]]:
        return {seen.peer for seen in self.seen}

    async def _recording(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            client = scope.get("client") or ("", 0)
            self.seen.append(Seen(scope["http_version"], tuple(client), scope["path"]))  # type: ignore[arg-type]
        await self.app(scope, receive, send)

    def start(self) -> Self:
        self._dir = Path(tempfile.mkdtemp(prefix="hypercorn-tls-"))
        self.ca_file, cert, key = issue_certificate(self.host, self._dir)
        listener = socket.create_server((self.host, 0))
        self.port = listener.getsockname()[1]
        config = hypercorn_config(cert, key, listener)
        ready = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            ready.set()
            await serve(self._recording, config, shutdown_trigger=self._stop.wait, mode="asgi")  # type: ignore[arg-type]

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:
                self._failed = exc
                ready.set()

        self._thread = threading.Thread(target=run, name="hypercorn", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._failed is not None:
            raise RuntimeError(f"hypercorn did not start: {self._failed!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = self._loop = self._stop = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
