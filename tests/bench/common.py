"""Helpers shared by the benchmark parts: the server subprocess, stats, logging."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from tests.bench.server import API_KEY, CLIENT_ID, CLIENT_SECRET

__all__ = [
    "API_KEY",
    "CLIENT_ID",
    "CLIENT_SECRET",
    "ServerProcess",
    "percentile",
    "process_cpu",
    "quiet_logging",
    "rss_mb",
    "sink_root",
]

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """A token server (`tests.bench.server`) in its own process; stopped on exit."""

    def __init__(self, kind: str = "fast", lifetime: float = 3600.0) -> None:
        self.kind = kind
        self.lifetime = lifetime
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self._ps: psutil.Process | None = None

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.server", self.kind, str(self.lifetime)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.__exit__()
            raise RuntimeError(f"benchmark server did not start: {line!r}")
        self.port = int(line.split()[1])
        self._ps = psutil.Process(self.proc.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        """CPU seconds (user + system) the server process has used so far."""
        assert self._ps is not None
        times = self._ps.cpu_times()
        return times.user + times.system

    def stats(self) -> dict[str, Any]:
        """Request counts of the fast server (the OAuth2Emulator has none: {})."""
        if self.kind != "fast":
            return {}
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=10) as response:
            return dict(json.loads(response.read()))

    def configure(self, **settings: Any) -> None:
        request = urllib.request.Request(
            f"{self.url}/_config",
            data=json.dumps(settings).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):
            pass


def nodelay(emulator: Any) -> None:
    """Set TCP_NODELAY on a started emulator's listening socket (accepted connections
    inherit it). Current emulators do this themselves; revisions before 4c80e17 did
    not, and every kept-alive response then waited ~40 ms for a delayed ACK, which
    made the simulated-time part take minutes. Harmless when already set."""
    import socket

    server = emulator._server
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def process_cpu() -> float:
    """CPU seconds (user + system, all threads) of this process."""
    times = os.times()
    return times.user + times.system


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / (1 << 20)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def sink_root() -> str:
    """Where sink files go: tmpfs (/dev/shm) when available, as the issue allows."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return str(shm)
    return tempfile.gettempdir()


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    """refresher's real log pipeline (JSON, info, redaction), written to /dev/null."""
    from refresher.logging import Redactor, configure_logging

    with open(os.devnull, "w") as devnull:
        configure_logging(Redactor(), level="info", fmt="json", stream=devnull)
        yield


@contextlib.contextmanager
def wrapped_providers(wrap: Callable[[Any, Any, Any], Any]) -> Iterator[None]:
    """Pass every provider the daemon's job set builds through ``wrap(provider, job, clock)``."""
    import refresher.jobset as jobset

    original = jobset.build_provider

    def build(job: Any, *, clients: Any, clock: Any) -> Any:
        return wrap(original(job, clients=clients, clock=clock), job, clock)

    jobset.build_provider = build  # type: ignore[assignment]
    try:
        yield
    finally:
        jobset.build_provider = original


def emit(result: dict[str, Any]) -> None:
    """Child processes report one JSON line prefixed RESULT on stdout."""
    print("RESULT " + json.dumps(result), flush=True)


def run_child(module: str, args: Sequence[str], *, timeout: float) -> dict[str, Any]:
    """Run ``python -m module args`` and return its RESULT line (stderr passes through)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{module} {' '.join(args)} timed out after {timeout:.0f}s") from None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"{module} {' '.join(args)} exited {proc.returncode} without a RESULT")


class DelegatingProvider:
    """Wraps the real provider (everything delegated) so a subclass's `fetch` can
    record what the benchmark measures before calling the real one."""

    def __init__(self, inner: Any, job: str, clock: Any, recorder: Any) -> None:
        self._inner = inner
        self._job = job
        self._clock = clock
        self._rec = recorder
        self.kind = inner.kind

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def rate_limit(self) -> Any:
        return self._inner.rate_limit

    @property
    def max_concurrency(self) -> Any:
        return self._inner.max_concurrency
