"""sd_notify protocol against real AF_UNIX datagram sockets (path and abstract)."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from refresher import sdnotify
from refresher.sdnotify import SystemdNotifier

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


def _receiver(address: str) -> socket.socket:
    """A datagram socket like systemd's notify socket: bound, SO_PASSCRED on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(address)
        sock.settimeout(2.0)
    except BaseException:
        sock.close()
        raise
    return sock


def receive(sock: socket.socket) -> tuple[bytes, int]:
    """One datagram and the sender's pid (kernel-attested, as systemd checks it)."""
    data, ancdata, flags, _ = sock.recvmsg(8192, socket.CMSG_SPACE(_UCRED.size))
    assert not flags & socket.MSG_TRUNC
    pid = -1
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = _UCRED.unpack(payload[: _UCRED.size])[0]
    return data, pid


def assert_nothing_pending(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(8192)
    finally:
        sock.settimeout(2.0)


def _open_sockets() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the fd listdir itself used
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


@pytest.fixture(autouse=True)
def no_leaked_sockets() -> Iterator[None]:
    before = _open_sockets()
    yield
    assert _open_sockets() - before == set(), "a test left a socket open"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Not tmp_path: sun_path holds at most 107 bytes and pytest's paths get long.
    with tempfile.TemporaryDirectory(prefix="sdn-") as name:
        yield Path(name)


@pytest.fixture
def notifiers() -> Iterator[Callable[[dict[str, str]], SystemdNotifier]]:
    made: list[SystemdNotifier] = []

    def make(env: dict[str, str]) -> SystemdNotifier:
        notifier = SystemdNotifier.from_env(env)
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close()


@pytest.fixture
def path_socket(sock_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    address = str(sock_dir / "notify")
    sock = _receiver(address)
    yield address, sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"refresher-test-{uuid.uuid4().hex}"
    sock = _receiver("\0" + name)
    yield "@" + name, sock
    sock.close()


# ---------------------------------------------------------------------------- wire format


def test_ready_arrives_as_one_datagram_from_this_pid(path_socket, notifiers):
    address, receiver = path_socket
    notifier = notifiers({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready("serving 3 jobs") is True
    data, pid = receive(receiver)
    assert data == b"READY=1\nSTATUS=serving 3 jobs"
    # NotifyAccess=main: systemd trusts the datagram only from the main pid.
    assert pid == os.getpid()
    assert_nothing_pending(receiver)


def test_abstract_socket_address_gets_a_leading_nul(abstract_socket, notifiers):
    address, receiver = abstract_socket
    assert address.startswith("@")
    notifier = notifiers({"NOTIFY_SOCKET": address})
    assert notifier.address == address
    assert notifier.status("warming up") is True
    assert receive(receiver) == (b"STATUS=warming up", os.getpid())
    # Nothing was created on disk under the literal "@..." name.
    assert not Path(address).exists()


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.status("2/3 tokens valid"), b"STATUS=2/3 tokens valid"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.stopping("draining"), b"STOPPING=1\nSTATUS=draining"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.extend_timeout(1.5), b"EXTEND_TIMEOUT_USEC=1500000"),
        (lambda n: n.send("STATUS=a", "ERRNO=5"), b"STATUS=a\nERRNO=5"),
        (
            lambda n: n.notify(READY=True, STATUS="x=y", ERRNO=0),
            b"READY=1\nSTATUS=x=y\nERRNO=0",
        ),
    ],
    ids=["ready", "status", "stopping", "stopping-status", "watchdog", "extend", "send", "notify"],
)
def test_messages_exactly(call, expected, abstract_socket, notifiers):
    address, receiver = abstract_socket
    notifier = notifiers({"NOTIFY_SOCKET": address})
    assert call(notifier) is True
    assert receive(receiver)[0] == expected


def test_reloading_carries_monotonic_usec(path_socket, notifiers):
    address, receiver = path_socket
    notifier = notifiers({"NOTIFY_SOCKET": address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    data, _ = receive(receiver)
    first, second = data.split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_values_cannot_inject_extra_assignments(path_socket, notifiers):
    address, receiver = path_socket
    notifier = notifiers({"NOTIFY_SOCKET": address})
    notifier.status("partner said:\nREADY=1\r\nbye")
    assert receive(receiver)[0] == b"STATUS=partner said: READY=1 bye"
    notifier.send("STATUS=a\nSTOPPING=1")
    assert receive(receiver)[0] == b"STATUS=a STOPPING=1"


def test_long_status_is_cut_on_a_character_boundary(path_socket, notifiers):
    address, receiver = path_socket
    notifier = notifiers({"NOTIFY_SOCKET": address})
    notifier.status("é" * 5000)  # 2 bytes each in UTF-8
    data = receive(receiver)[0]
    assert data.startswith(b"STATUS=")
    text = data[len(b"STATUS=") :].decode()  # must still be valid UTF-8
    assert text == "é" * 512


def test_lower_case_keys_are_rejected(notifiers):
    notifier = notifiers({"NOTIFY_SOCKET": "@unused"})
    with pytest.raises(ValueError, match="invalid sd_notify key"):
        notifier.notify(ready=1)


# ---------------------------------------------------------------------------- disabled


@pytest.mark.parametrize(
    "env",
    [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}, {"NOTIFY_SOCKET": "vsock:2:9"}],
    ids=["unset", "empty", "relative", "vsock"],
)
def test_disabled_is_a_no_op_without_a_socket(env, notifiers, monkeypatch):
    def no_socket(*args, **kwargs):
        raise AssertionError("a disabled notifier must not create a socket")

    monkeypatch.setattr(sdnotify.socket, "socket", no_socket)
    notifier = notifiers(env)
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.status("x") is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False
    assert notifier.notify(READY=1) is False
    assert notifier.send("READY=1") is False


def test_from_env_defaults_to_os_environ(path_socket, monkeypatch):
    address, receiver = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with SystemdNotifier.from_env() as notifier:
        assert notifier.watchdog_interval() == 2.0
        assert notifier.watchdog() is True
    assert receive(receiver)[0] == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not SystemdNotifier.from_env().enabled


def test_nothing_to_send_sends_nothing(path_socket, notifiers):
    address, receiver = path_socket
    notifier = notifiers({"NOTIFY_SOCKET": address})
    assert notifier.send() is False
    assert_nothing_pending(receiver)


# ---------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("1", None, 0.0000005),
        ("3000000", None, 1.5),
        (None, None, None),
        (None, "self", None),
        ("0", None, None),
        ("-30000000", None, None),
        ("30s", None, None),
        ("", None, None),
        ("²", None, None),
        ("30000000", "", None),
        ("30000000", "not-a-pid", None),
    ],
)
def test_watchdog_interval(usec, pid, expected):
    env = {}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid == "self":
        env["WATCHDOG_PID"] = str(os.getpid())
    elif pid == "other":
        env["WATCHDOG_PID"] = str(os.getpid() + 1)
    elif pid is not None:
        env["WATCHDOG_PID"] = pid
    # NOTIFY_SOCKET plays no part in the arithmetic.
    assert SystemdNotifier.from_env(env).watchdog_interval() == expected


def test_watchdog_pid_is_checked_at_call_time(monkeypatch):
    notifier = SystemdNotifier.from_env(
        {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert notifier.watchdog_interval() == 5.0
    # As in a forked child: the watchdog duty stays with the original pid.
    monkeypatch.setattr(sdnotify.os, "getpid", lambda: os.getppid())
    assert notifier.watchdog_interval() is None


# ---------------------------------------------------------------------------- failures


def test_vanished_socket_does_not_raise_and_recovers(sock_dir, notifiers):
    address = str(sock_dir / "notify")
    notifier = notifiers({"NOTIFY_SOCKET": address})
    receiver = _receiver(address)
    try:
        assert notifier.ready() is True
        assert receive(receiver)[0] == b"READY=1"
    finally:
        receiver.close()
    # Bound but nobody listening any more: ECONNREFUSED.
    with capture_logs() as logs:
        assert notifier.watchdog() is False
    assert [e["event"] for e in logs] == ["sd_notify send failed"]
    assert logs[0]["log_level"] == "debug"
    assert "ConnectionRefusedError" in logs[0]["error"]
    assert logs[0]["keys"] == ["WATCHDOG"]
    # Gone altogether: ENOENT.
    os.unlink(address)
    with capture_logs() as logs:
        assert notifier.stopping("bye") is False
    assert "FileNotFoundError" in logs[0]["error"]
    # systemd came back (re-executed): the same notifier reaches it again.
    receiver = _receiver(address)
    try:
        assert notifier.status("back") is True
        assert receive(receiver)[0] == b"STATUS=back"
    finally:
        receiver.close()


def test_abstract_socket_nobody_listens_on(notifiers):
    notifier = notifiers({"NOTIFY_SOCKET": f"@refresher-test-{uuid.uuid4().hex}"})
    with capture_logs() as logs:
        assert notifier.ready() is False
    assert logs and logs[0]["event"] == "sd_notify send failed"


@pytest.mark.timeout(10)
def test_full_queue_never_blocks(path_socket, notifiers):
    # The receiver never reads: once its queue is full a blocking socket would
    # hang here forever; ours must report False and carry on.
    address, receiver = path_socket
    notifier = notifiers({"NOTIFY_SOCKET": address})
    started = time.monotonic()
    with capture_logs() as logs:
        results = [notifier.watchdog() for _ in range(2000)]
    assert time.monotonic() - started < 5
    assert results[0] is True
    assert False in results
    assert any("BlockingIOError" in entry["error"] for entry in logs)
    # What was queued is intact.
    assert receive(receiver)[0] == b"WATCHDOG=1"


def test_close_then_send_reopens(path_socket, notifiers):
    address, receiver = path_socket
    notifier = notifiers({"NOTIFY_SOCKET": address})
    assert notifier.ready() is True
    notifier.close()
    notifier.close()  # idempotent
    assert notifier.watchdog() is True
    assert [receive(receiver)[0] for _ in range(2)] == [b"READY=1", b"WATCHDOG=1"]
