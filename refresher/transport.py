"""The network backend under every provider's `httpx2.AsyncClient`.

httpcore2 asks each idle keep-alive connection whether its socket is readable
(a server-side close) before every request it routes, and its anyio stream
answers by building anyio's whole extra-attribute map (with a `getpeername`
call) per question. A refresher keeps many idle connections and sends one
request per refresh, so that probe alone cost more than the request's own
parsing. The stream below looks the socket up once, when the connection opens.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from typing import Any

import anyio.abc
import httpcore2
import httpx2
from httpcore2._backends.anyio import AnyIOBackend, AnyIOStream
from httpcore2._backends.base import AsyncNetworkStream
from httpcore2._utils import is_socket_readable

__all__ = ["SocketCachingBackend", "use_socket_caching_backend"]


class SocketCachingStream(AnyIOStream):
    """An `AnyIOStream` that keeps its raw socket for the readability probe."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        super().__init__(stream)
        raw_socket = anyio.abc.SocketAttribute.raw_socket
        self._socket: socket.socket | None = stream.extra(raw_socket, None)  # noqa: S610

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
