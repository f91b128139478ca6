"""The daemon's HTTP listener under hostile clients, in real ``refresher run`` processes.

Idle and half-open connections must never cost the daemon the file descriptors it
needs to read its secrets and write its tokens: the listener holds at most
``server.max_connections`` (derived down from RLIMIT_NOFILE), drops connections whose
request head does not arrive within ``server.header_timeout``, logs accept failures
without tracebacks, and a busy port is a one-line error with exit code 2.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from refresher.errors import ListenError
from refresher.server import (
    BASE_RESERVE,
    RESERVE_PER_REFRESH,
    Listener,
    bind,
    connection_cap,
    fd_reserve,
    nofile_needed,
)
from tests.conftest import CLIENT_ID, CLIENT_SECRET, LeakGuard
from tests.emulators.oauth2 import OAuth2Emulator

# Runs its arguments as a command under the given RLIMIT_NOFILE (soft = hard): set
# before exec, so the daemon never holds more, and without preexec_fn in a threaded test.
UNDER_LIMIT = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: refresher\r\n\r\n"


def until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [line for line in self.log().splitlines() if line.startswith("{")]
        return [e for e in map(json.loads, lines) if e.get("event") == name]

    @property
    def port(self) -> int:
        return int(self.events("listening")[0]["address"].rpartition(":")[2])

    def sockets(self) -> int:
        """Sockets the daemon process holds open now (listener, clients, provider pool)."""
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        count = 0
        for fd in fd_dir.iterdir():
            with suppress(FileNotFoundError):  # closed while we looked
                count += os.readlink(fd).startswith("socket:")
        return count


def config_file(
    tmp_path: Path, emulator: OAuth2Emulator, *, name: str = "api", **sections: Any
) -> Path:
    secret = tmp_path / "secret"
    secret.write_text(CLIENT_SECRET + "\n")
    config = {
        "server": {"listen": "127.0.0.1:0"},
        "logging": {"format": "json"},
        **sections,
        "jobs": [
            {
                "name": name,
                "provider": {
                    "kind": "oauth2",
                    "token_url": emulator.token_url,
                    "client_id": CLIENT_ID,
                    # Read from disk at every refresh: the read that EMFILE used to break.
                    "client_secret_file": str(secret),
                },
                "sinks": [{"kind": "file", "path": str(tmp_path / f"{name}.token")}],
            }
        ],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def daemon_process(config: Path, *, nofile: int | None = None) -> Iterator[DaemonProcess]:
    """``refresher run`` in its own process; SIGTERM (exit 0 expected) on the way out."""
    stderr = config.with_suffix(".stderr")
    command = [sys.executable, "-m", "refresher", "run", "--config", str(config)]
    if nofile is not None:
        command = [sys.executable, "-c", UNDER_LIMIT, str(nofile), *command[1:]]
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(command, stdout=err, stderr=err)
    daemon = DaemonProcess(proc, stderr)
    try:
        until(
            lambda: daemon.events("listening") or proc.poll() is not None,
            30,
            "the daemon to listen",
        )
        assert proc.poll() is None, daemon.log()
        yield daemon
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                assert proc.wait(timeout=15) == 0, daemon.log()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server closed (FIN or RST) a non-blocking client socket."""
    try:
        return sock.recv(4096) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError:  # ENOTCONN: the handshake has not completed yet
        return False


def connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    return sock


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """What the server sent within `timeout` (b"" if nothing)."""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        if not sel.select(timeout):
            return b""
    try:
        return sock.recv(65536)
    except (BlockingIOError, ConnectionResetError):
        return b""


@pytest.fixture
def own_nofile() -> Iterator[None]:
    """Enough descriptors in this process for 5,000 client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs RLIMIT_NOFILE hard limit >= {wanted}, have {hard}")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_daemon_keeps_refreshing_while_5000_idle_connections_are_held(
    tmp_path: Path, leak_guard: LeakGuard, own_nofile: None
) -> None:
    """The incident: 20,000 half-open connections exhausted the daemon's descriptors,
    the secret read failed with EMFILE, the token expired, stderr grew 176 MB in 35 s."""
    with OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=2) as emulator:
        leak_guard.emulators.append(emulator)
        config = config_file(
            tmp_path,
            emulator,
            server={"listen": "127.0.0.1:0", "header_timeout": "1s"},
            refresh={"refresh_at": 0.5, "min_remaining": 0, "jitter": 0},
        )
        token = tmp_path / "api.token"
        with daemon_process(config, nofile=1024) as daemon:
            cap = daemon.events("listening")[0]["max_connections"]
            assert cap == connection_cap(256, 1024, fd_reserve(32)) == 256
            until(token.exists, what="the first token")
            clients: list[socket.socket] = []
            try:
                most_sockets = 0
                started = time.monotonic()
                # Tokens written once all 5,000 connections were open.
                seen: set[str] = set()

                def refreshed_twice() -> bool:
                    nonlocal most_sockets
                    # ~1,700 connections a second, as a flood arrives: all at once, most
                    # SYNs would be dropped and retried later, never reaching the daemon.
                    wanted = min(5000, int((time.monotonic() - started) * 1700))
                    clients.extend(connect(daemon.port) for _ in range(wanted - len(clients)))
                    most_sockets = max(most_sockets, daemon.sockets())
                    if len(clients) == 5000:
                        seen.add(token.read_text())
                    return len(seen) >= 3 and time.monotonic() - started > 5

                until(refreshed_twice, 15, "two refreshes under the flood")
                # Slots were recycled by the header timeout, never exceeded.
                dropped = sum(closed_by_peer(c) for c in clients)
                assert dropped > cap, f"only {dropped} idle connections were timed out"
                assert most_sockets <= cap + 16, most_sockets
                assert daemon.proc.poll() is None
            finally:
                for client in clients:
                    client.close()

            def healthy() -> bool:
                try:
                    return (
                        httpx2.get(f"http://127.0.0.1:{daemon.port}/healthz", timeout=2).status_code
                        == 200
                    )
                except httpx2.HTTPError:
                    return False

            until(healthy, 10, "/healthz after the flood")
        output = daemon.log()
    leak_guard.extra_outputs.append(output)
    assert (
        "Traceback" not in output and "EMFILE" not in output and "Too many open files" not in output
    )
    assert len(output) < 32_000, f"stderr grew to {len(output)} bytes"
    assert daemon.events("token refreshed")
    assert not daemon.events("refresh failed")


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the cap, timeout and busy-port tests: 4 connections, 3 s heads."""
    tmp_path = tmp_path_factory.mktemp("bounded")
    with OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=3600) as emulator:
        config = config_file(
            tmp_path,
            emulator,
            server={"listen": "127.0.0.1:0", "max_connections": 4, "header_timeout": "3s"},
        )
        with daemon_process(config) as daemon:
            until((tmp_path / "api.token").exists, what="the first token")
            yield daemon
        guard = LeakGuard()
        guard.emulators.append(emulator)
        guard.check(daemon.log())


def quiet(daemon: DaemonProcess) -> int:
    """The daemon's socket count once it stopped changing (no client left over)."""
    counts = [daemon.sockets()]

    def settled() -> bool:
        counts.append(daemon.sockets())
        return len(counts) > 10 and len(set(counts[-10:])) == 1

    until(settled, 10, "the daemon's sockets to settle")
    return counts[-1]


def test_connections_beyond_the_cap_wait_in_the_backlog(bounded: DaemonProcess) -> None:
    base = quiet(bounded)
    idle = [connect(bounded.port) for _ in range(4)]
    waiting = connect(bounded.port)
    try:
        until(lambda: bounded.sockets() == base + 4, 5, "the 4 idle connections to be accepted")
        waiting.sendall(REQUEST)
        # The 5th is not accepted: no answer, and no descriptor spent on it.
        assert read_response(waiting, 0.6) == b""
        assert bounded.sockets() == base + 4
        opened_at = time.monotonic()
        idle.pop().close()
        answer = read_response(waiting, 2.0)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert time.monotonic() - opened_at < 2.0
        assert bounded.sockets() <= base + 4
    finally:
        for sock in [*idle, waiting]:
            sock.close()


def test_request_heads_that_never_complete_are_dropped(bounded: DaemonProcess) -> None:
    quiet(bounded)
    timeout = 3.0
    silent = connect(bounded.port)
    partial = connect(bounded.port)
    dripping = connect(bounded.port)
    kept_alive = connect(bounded.port)
    clients = {"silent": silent, "partial": partial, "dripping": dripping, "kept_alive": kept_alive}
    opened = time.monotonic()
    try:
        partial.sendall(b"GET /heal")
        kept_alive.sendall(REQUEST)
        assert read_response(kept_alive, 2.0).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        closed: dict[str, float] = {}
        # A valid request head that never ends: a header value one byte every 50 ms.
        drip = iter(b"GET /healthz HTTP/1.1\r\nHost: refresher\r\nX-Slow: " + b"a" * 1000)
        while len(closed) < len(clients) and time.monotonic() - opened < timeout + 4:
            for name, sock in clients.items():
                if name not in closed and closed_by_peer(sock):
                    closed[name] = time.monotonic()
            if "dripping" not in closed:
                try:
                    dripping.send(bytes([next(drip)]))
                except (BrokenPipeError, ConnectionResetError):
                    closed.setdefault("dripping", time.monotonic())
            time.sleep(0.05)
    finally:
        for sock in clients.values():
            sock.close()
    assert set(closed) == set(clients), f"still open: {set(clients) - set(closed)}"
    for name in ("silent", "partial", "dripping"):
        assert timeout - 0.5 < closed[name] - opened < timeout + 2, (name, closed[name] - opened)
    # A kept-alive connection gets the same time for its next request head.
    assert timeout - 0.5 < closed["kept_alive"] - answered < timeout + 2


def test_a_second_daemon_on_a_busy_port_exits_2_with_one_line(
    bounded: DaemonProcess, tmp_path: Path
) -> None:
    with OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}) as emulator:
        config = config_file(
            tmp_path, emulator, name="second", server={"listen": f"127.0.0.1:{bounded.port}"}
        )
        result = subprocess.run(
            [sys.executable, "-m", "refresher", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert emulator.count() == 0
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{bounded.port}: address already in use" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    # It stopped before minting or writing anything.
    assert not (tmp_path / "second.token").exists()
    assert bounded.proc.poll() is None


# ------------------------------------------------------------------ the listener in process

BIG = 4 * 1024 * 1024


def small_app() -> Starlette:
    async def big(request: Request) -> Response:
        return Response(b"x" * BIG, media_type="application/octet-stream")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/big", big), Route("/healthz", healthz)])


@contextmanager
def small_buffers() -> Iterator[socket.socket]:
    """A listening socket whose connections have 16 KiB send buffers, so a response
    waits in the server's own buffer until the client reads it."""
    sock = bind("127.0.0.1", 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    with sock:
        yield sock


def fetch_big(port: int, *, pause: float | None) -> int:
    """GET /big reading 16 KiB at a time with `pause` between reads (None: read nothing
    and wait for the server to drop us); return the bytes received."""
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        client.settimeout(10)
        client.connect(("127.0.0.1", port))
        client.sendall(b"GET /big HTTP/1.1\r\nHost: refresher\r\n\r\n")
        if pause is None:
            time.sleep(1.5)
        received = 0
        while chunk := client.recv(16384):
            received += len(chunk)
            if pause and received < BIG:
                time.sleep(pause)
            if received >= BIG:  # headers + body: all there
                break
        return received


@pytest.mark.anyio
async def test_a_client_that_stops_reading_is_dropped_a_slow_one_is_not() -> None:
    with small_buffers() as sock:
        # The timeout leaves room for a reader thread starved by a busy machine.
        listener = Listener(sock, small_app(), max_connections=4, header_timeout=0.5)
        async with anyio.create_task_group() as tg:
            await tg.start(listener.serve)
            started = time.monotonic()
            # ~4 MiB at 16 KiB per 6 ms: well over the 0.5 s timeout, but always reading.
            slow = await anyio.to_thread.run_sync(lambda: fetch_big(listener.port, pause=0.006))
            assert time.monotonic() - started > 1.0
            assert slow > BIG and listener.timed_out == 0
            # Asks for 4 MiB and reads none of it: dropped, its slot and descriptor freed.
            stalled = await anyio.to_thread.run_sync(lambda: fetch_big(listener.port, pause=None))
            assert stalled < BIG
            assert listener.timed_out == 1 and listener.open == 0
            listener.close()


@pytest.mark.anyio
async def test_accept_failing_for_want_of_descriptors_is_logged_once_and_retried(
    leak_guard: LeakGuard,
) -> None:
    listener = Listener(bind("127.0.0.1", 0), small_app(), max_connections=4, header_timeout=5)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with anyio.create_task_group() as tg:
        await tg.start(listener.serve)
        with socket.socket() as client:
            client.settimeout(5)
            lowest_free = os.dup(0)
            os.close(lowest_free)
            # No new descriptor from here on: accept() fails with EMFILE.
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                client.connect(("127.0.0.1", listener.port))  # queued by the kernel
                await anyio.sleep(0.6)  # the listener fails accept() about six times
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            client.sendall(REQUEST)
            answer = await anyio.to_thread.run_sync(client.recv, 4096)
        assert answer.startswith(b"HTTP/1.1 200")
        listener.close()
    failures = leak_guard.events("cannot accept connections")
    assert len(failures) == 1, failures
    assert failures[0]["error"] == "Too many open files"
    assert "Traceback" not in leak_guard.buffer.getvalue()


def test_bind_errors_name_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError) as busy:
            bind("127.0.0.1", port)
    assert str(busy.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"
    with pytest.raises(ListenError) as foreign:
        bind("192.0.2.1", 9464)  # TEST-NET-1: not an address of this machine
    assert str(foreign.value) == "cannot listen on 192.0.2.1:9464: cannot assign requested address"
    with pytest.raises(ListenError) as unknown:
        bind("refresher.invalid", 9464)
    assert str(unknown.value).startswith("cannot listen on refresher.invalid:9464: ")


# ------------------------------------------------------------------ the descriptor budget


def test_reserve_grows_with_refresh_concurrency() -> None:
    assert fd_reserve(1) == BASE_RESERVE + RESERVE_PER_REFRESH
    assert fd_reserve(32) == BASE_RESERVE + 32 * RESERVE_PER_REFRESH == 256


@pytest.mark.parametrize(
    ("wanted", "nofile", "reserve", "cap"),
    [
        pytest.param(256, 1024, 256, 256, id="sidecar-default"),
        pytest.param(256, 1_048_576, 256, 256, id="huge-limit-keeps-wanted"),
        pytest.param(2000, 1024, 256, 512, id="never-more-than-half-the-limit"),
        pytest.param(256, 400, 256, 144, id="never-into-the-reserve"),
        pytest.param(256, 256, 256, 1, id="no-room-still-serves-one"),
        pytest.param(256, 64, 256, 1, id="limit-below-reserve"),
    ],
)
def test_connection_cap_from_the_open_files_limit(
    wanted: int, nofile: int, reserve: int, cap: int
) -> None:
    assert connection_cap(wanted, nofile, reserve) == cap


def test_limit_needed_for_the_wanted_cap_gives_that_cap() -> None:
    for wanted in (4, 256, 1000, 65536):
        for reserve in (132, 256, 1000):
            needed = nofile_needed(wanted, reserve)
            assert connection_cap(wanted, needed, reserve) == wanted
            assert connection_cap(wanted, needed - 1, reserve) < wanted


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        pytest.param((256, 4096), 512, id="raised-as-far-as-needed"),
        pytest.param((256, 300), 300, id="never-past-the-hard-limit"),
        pytest.param((2048, 4096), 2048, id="never-lowered"),
    ],
)
def test_soft_limit_is_raised_only_as_far_as_needed(limits: tuple[int, int], expected: int) -> None:
    soft, hard = limits
    script = (
        "import resource; from refresher.server import raise_nofile_limit; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "got = raise_nofile_limit(512); "
        "assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0], got; print(got)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == expected
