"""The network backend under the providers' HTTP clients: it is really used (plain,
TLS and HTTP/2), and its cheap readability probe still notices a server that closed an idle
keep-alive connection, which is the probe's whole purpose."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import httpcore2
import httpx2
import pytest

from refresher.providers.base import HTTPClients
from refresher.transport import SocketCachingStream, use_socket_caching_backend
from tests.conftest import CLIENT_ID, CLIENT_SECRET, LeakGuard
from tests.emulators.h2server import HypercornServer
from tests.emulators.oauth2 import OAuth2Emulator

pytestmark = pytest.mark.anyio


def _streams(client: httpx2.AsyncClient) -> list[Any]:
    pool = client._transport._pool  # type: ignore[attr-defined]
    assert isinstance(pool, httpcore2.AsyncConnectionPool)
    return [connection._connection._network_stream for connection in pool.connections]


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_provider_clients_keep_alive_on_the_socket_caching_stream(
    make_emulator: Any, tls: bool
) -> None:
    emulator = make_emulator(OAuth2Emulator, clients={CLIENT_ID: CLIENT_SECRET}, tls=tls)
    clients = HTTPClients()
    try:
        client = clients.get(emulator.url, ca_file=emulator.ca_file)
        form = {"grant_type": "client_credentials", "client_id": CLIENT_ID}
        for _ in range(3):
            answer = await client.post(
                emulator.token_url, data={**form, "client_secret": CLIENT_SECRET}
            )
            assert answer.status_code == 200
        (stream,) = _streams(client)  # three requests, one kept-alive connection
        assert isinstance(stream, SocketCachingStream)
        assert stream.get_extra_info("is_readable") is False
        assert stream.get_extra_info("socket").fileno() > 0
        assert (stream.get_extra_info("ssl_object") is not None) is tls
    finally:
        await clients.aclose()


async def test_http2_clients_multiplex_on_the_socket_caching_stream(leak_guard: LeakGuard) -> None:
    emulator = OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET})
    leak_guard.emulators.append(emulator)
    clients = HTTPClients()
    with HypercornServer(emulator.app()) as server:
        try:
            client = clients.get(server.url, ca_file=server.ca_file, http2=True)
            form = {"grant_type": "client_credentials", "client_id": CLIENT_ID}
            for _ in range(3):
                answer = await client.post(
                    "/oauth/token", data={**form, "client_secret": CLIENT_SECRET}
                )
                assert (answer.status_code, answer.http_version) == (200, "HTTP/2")
            (stream,) = _streams(client)
            assert isinstance(stream, SocketCachingStream)
            assert stream.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
            assert stream._may_hold is False  # HTTP/2 frames are never held back
            assert stream.get_extra_info("socket").fileno() > 0
        finally:
            await clients.aclose()
    assert len(server.connections()) == 1


@pytest.fixture
def closing_server() -> Iterator[tuple[str, list[int]]]:
    """An HTTP/1.1 server that answers each connection once with keep-alive promised,
    then closes it: the client must notice the close before reusing the connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    closed: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
                )
            closed.append(1)

    thread = threading.Thread(target=serve, name="closing-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", closed
    finally:
        stop.set()
        thread.join(5)
        listener.close()


async def test_an_idle_connection_the_server_closed_is_not_reused(
    closing_server: tuple[str, list[int]],
) -> None:
    url, closed = closing_server
    async with httpx2.AsyncClient() as client:
        assert use_socket_caching_backend(client) == 1
        for served in (1, 2, 3):
            answer = await client.get(url)
            assert answer.text == "ok"
            with anyio.fail_after(5):  # the server has closed its side before the next request
                while len(closed) < served:
                    await anyio.sleep(0.005)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_a_request_head_and_body_leave_in_one_send(make_emulator: Any, tls: bool) -> None:
    emulator = make_emulator(OAuth2Emulator, clients={CLIENT_ID: CLIENT_SECRET}, tls=tls)
    form = {"grant_type": "client_credentials", "client_id": CLIENT_ID}
    clients = HTTPClients()
    try:
        client = clients.get(emulator.url, ca_file=emulator.ca_file)
        await client.post(emulator.token_url, data={**form, "client_secret": CLIENT_SECRET})
        (stream,) = _streams(client)
        inner = stream._stream
        sends: list[int] = []
        send = inner.send

        async def counting_send(item: bytes) -> None:
            sends.append(len(item))
            await send(item)

        inner.send = counting_send
        for _ in range(3):
            answer = await client.post(
                emulator.token_url, data={**form, "client_secret": CLIENT_SECRET}
            )
            assert answer.status_code == 200
        assert len(sends) == 3  # one per request: head and form body together
        assert all(size > len(CLIENT_SECRET) for size in sends)
    finally:
        await clients.aclose()


async def test_a_write_while_another_task_reads_is_sent_at_once() -> None:
    """HTTP/2 reads in one task while others write: a held write would never leave."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            if connection.recv(16) == b"ping":
                received.set()
                connection.sendall(b"pong")

    thread = threading.Thread(target=serve, name="pong-server", daemon=True)
    thread.start()
    try:
        stream = SocketCachingStream(await anyio.connect_tcp("127.0.0.1", port))
        answers: list[bytes] = []

        async def read() -> None:
            answers.append(await stream.read(16))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                while not stream._readers:
                    await anyio.sleep(0.001)
                await stream.write(b"ping")
        assert received.is_set() and answers == [b"pong"]
        await stream.aclose()
    finally:
        thread.join(5)
        listener.close()
