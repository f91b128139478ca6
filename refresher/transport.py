"""The network backend under every provider's `httpx2.AsyncClient`.

httpcore2 asks each idle keep-alive connection whether its socket is readable
(a server-side close) before every request it routes, and its anyio stream
answers by building anyio's whole extra-attribute map (with a `getpeername`
call) per question. A refresher keeps many idle connections and sends one
request per refresh, so that probe alone cost more than the request's own
parsing. The stream below looks the socket up once, when the connection opens.

It also sends a request's head and body together: httpcore2 writes them in two
calls, which costs a second `send` and wakes the server twice. A small write is
held until the next write (then both leave in one `send`) or the next read (the
response cannot come before the request is out), never while another task reads.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import anyio.abc
import anyio.streams.tls
import httpcore2
import httpx2
from httpcore2._backends.anyio import AnyIOBackend, AnyIOStream
from httpcore2._backends.base import AsyncNetworkStream
from httpcore2._exceptions import WriteError
from httpcore2._utils import is_socket_readable

__all__ = ["SocketCachingBackend", "use_socket_caching_backend"]

#: Writes up to this size may wait for the next one (a request head, a token form).
HOLD_LIMIT = 16 * 1024


class SocketCachingStream(AnyIOStream):
    """An `AnyIOStream` that keeps its raw socket for the readability probe and sends
    a request's head and body in one write."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        super().__init__(stream)
        raw_socket = anyio.abc.SocketAttribute.raw_socket
        self._socket: socket.socket | None = stream.extra(raw_socket, None)  # noqa: S610
        ssl_object = stream.extra(anyio.streams.tls.TLSAttribute.ssl_object, None)  # noqa: S610
        # HTTP/2 reads in one task while others write: nothing may wait there.
        self._may_hold = ssl_object is None or ssl_object.selected_alpn_protocol() != "h2"
        self._held = b""
        self._held_timeout: float | None = None
        self._readers = 0

    async def write(
        self,
        buffer: bytes,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's signature
    ) -> None:
        if not buffer:
            return
        if self._held:
            buffer, self._held = self._held + buffer, b""
        elif self._may_hold and not self._readers and len(buffer) <= HOLD_LIMIT:
            self._held, self._held_timeout = buffer, timeout
            return
        await super().write(buffer, timeout)

    async def read(
        self,
        max_bytes: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's signature
    ) -> bytes:
        # As httpcore2 does for a failed request write: the server may have answered
        # (e.g. 413) before closing, so read what it sent.
        with contextlib.suppress(WriteError):
            await self._flush()
        self._readers += 1
        try:
            return await super().read(max_bytes, timeout)
        finally:
            self._readers -= 1

    async def _flush(self) -> None:
        if self._held:
            held, self._held = self._held, b""
            await super().write(held, self._held_timeout)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return is_socket_readable(self._socket)
        if info == "socket":
            return self._socket
        return super().get_extra_info(info)

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's signature
    ) -> AsyncNetworkStream:
        await self._flush()  # nothing held may cross into the TLS session
        return _caching(await super().start_tls(ssl_context, server_hostname, timeout))


class SocketCachingBackend(AnyIOBackend):
    """httpcore2's anyio backend, handing out `SocketCachingStream`s."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's signature
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        stream = await super().connect_tcp(host, port, timeout, local_address, socket_options)
        return _caching(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's signature
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        return _caching(await super().connect_unix_socket(path, timeout, socket_options))


def _caching(stream: AsyncNetworkStream) -> AsyncNetworkStream:
    # AnyIOStream keeps the anyio stream it wraps as `_stream` (httpcore2 2.x).
    inner = getattr(stream, "_stream", None)
    if isinstance(stream, AnyIOStream) and isinstance(inner, anyio.abc.ByteStream):
        return SocketCachingStream(inner)
    return stream


def use_socket_caching_backend(client: httpx2.AsyncClient) -> int:
    """Put `SocketCachingBackend` under every connection pool of `client` (its own
    transport and any proxy mounts from the environment); returns how many pools
    now use it, so a test notices when an httpx2 release moves the pool."""
    transports = [client._transport, *client._mounts.values()]
    swapped = 0
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if isinstance(transport, httpx2.AsyncHTTPTransport) and isinstance(
            pool, httpcore2.AsyncConnectionPool
        ):
            pool._network_backend = SocketCachingBackend()
            swapped += 1
    return swapped
