"""Shared fixtures: injected clock, loopback emulators, daemons, and the leak guard.

Every test's log output is captured through refresher's real structlog pipeline;
at teardown the leak guard asserts that no secret configured in the test and no
token any emulator issued during it appears in that output.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from refresher.clock import ManualClock
from refresher.config import load_settings
from refresher.daemon import Daemon
from refresher.demo.base import Emulator
from refresher.logging import Redactor, configure_logging, secret_forms
from refresher.providers.base import HTTPClients

#: Kubernetes emulator fixtures (kube, kubeconfig, clients, make_token) for every test.
pytest_plugins = ["tests.kube_support"]

CLIENT_ID = "demo-client"
CLIENT_SECRET = "s3cr3t-client-secret-value"
DEB_KEY = "debitura-api-key-value-123"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class LeakGuard:
    """Collects secrets and emulators of a test and checks captured output."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.redactor = Redactor()
        self.secrets: set[str] = {CLIENT_SECRET}
        self.emulators: list[Emulator] = []
        self.extra_outputs: list[str] = []

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.buffer.getvalue().splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def values(self) -> set[str]:
        """Every secret in every form it travels in (as is, percent-encoded, base64,
        HTTP Basic's ``id:secret``), and every token an emulator issued."""
        values: set[str] = set()
        for secret in self.secrets:
            values.update(secret_forms(secret))
            values.update(secret_forms(f"{CLIENT_ID}:{secret}"))
        for emulator in self.emulators:
            values.update(emulator.issued)
        return values

    def check(self, text: str) -> None:
        for value in self.values():
            assert value not in text, f"secret or token (fingerprint {value[:4]}…) leaked"


@pytest.fixture(autouse=True)
def leak_guard() -> Iterator[LeakGuard]:
    guard = LeakGuard()
    configure_logging(guard.redactor, level="debug", fmt="json", stream=guard.buffer)
    yield guard
    guard.check(guard.buffer.getvalue())
    for text in guard.extra_outputs:
        guard.check(text)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1_800_000_000.0)


@pytest.fixture
async def http_clients() -> AsyncIterator[HTTPClients]:
    """The HTTP client pool a provider built by hand uses (closed after the test)."""
    shared = HTTPClients()
    yield shared
    await shared.aclose()


@pytest.fixture
def make_emulator(leak_guard: LeakGuard) -> Iterator[Callable[..., Any]]:
    started: list[Emulator] = []

    def make(cls: type[Emulator], **kwargs: Any) -> Any:
        emulator = cls(**kwargs).start()
        started.append(emulator)
        leak_guard.emulators.append(emulator)
        return emulator

    yield make
    for emulator in started:
        emulator.stop()


@pytest.fixture
def oauth2_emulator(make_emulator: Callable[..., Any], clock: ManualClock) -> Any:
    from tests.emulators.oauth2 import OAuth2Emulator

    return make_emulator(
        OAuth2Emulator, clients={CLIENT_ID: CLIENT_SECRET}, clock=clock, token_lifetime=3600
    )


def oauth2_job(emulator: Any, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "name": "api",
        "provider": {
            "kind": "oauth2",
            "token_url": emulator.token_url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        "sinks": [{"kind": "file", "path": str(tmp_path / "api.token")}],
    }
    job.update(overrides)
    return job


@pytest.fixture
def start_daemon(clock: ManualClock, leak_guard: LeakGuard) -> Callable[..., Any]:
    """``async with start_daemon(config_dict) as daemon:`` on the manual clock, port 0."""

    @asynccontextmanager
    async def start(config: dict[str, Any], **kwargs: Any) -> AsyncIterator[Daemon]:
        config = {"server": {"listen": "127.0.0.1:0"}, **config}
        settings = load_settings(data=config)
        daemon = Daemon(
            settings,
            clock=kwargs.pop("clock", clock),
            redactor=leak_guard.redactor,
            rng=random.Random(7),
            **kwargs,
        )
        async with daemon.running():
            yield daemon

    return start


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll (in real time, briefly) until `predicate()` holds."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def get_json(
    daemon: Daemon, path: str, leak_guard: LeakGuard | None = None
) -> tuple[int, Any]:
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{daemon.port}") as client:
        response = await client.get(path)
    if leak_guard is not None:
        leak_guard.extra_outputs.append(response.text)
    return response.status_code, response.json() if "json" in response.headers.get(
        "content-type", ""
    ) else response.text


async def settle(scheduler: Any) -> None:
    """Wait (real time, briefly) until no provider request or sink write is in flight
    and the refreshes stopped moving: jobs handed a slot or a rate grant between two looks
    would otherwise be taken for jobs waiting on the clock."""

    def signature() -> tuple[int, int, int]:
        runtimes = list(scheduler.jobs.values())
        return (
            scheduler.requests_in_flight,
            sum(r.refreshing is not None for r in runtimes),
            sum(r.token is not None for r in runtimes),
        )

    def busy() -> bool:
        # Work already handed to the event loop (a woken scheduler or limiter head
        # takes several loop passes to act): on a loaded machine three 2 ms polls can
        # be three passes, so stillness alone is not proof. (`_ready` is asyncio's
        # private queue of callbacks due in the next pass.)
        loop = asyncio.get_running_loop()
        heap = scheduler._heap
        due = bool(heap) and heap[0][0] <= scheduler.clock.now() and scheduler.is_active()
        return bool(loop._ready) or due  # type: ignore[attr-defined]

    await anyio.sleep(0)
    with anyio.fail_after(30):
        last, same = signature(), 0
        while same < 3 or last[0] != 0 or scheduler.publisher.writes_in_flight:
            await anyio.sleep(0.002)
            current = signature()
            same = same + 1 if current == last and not busy() else 0
            last = current


async def drive(clock: ManualClock, scheduler: Any, until: Callable[[], bool], *, horizon: float) -> None:
    """Advance the manual clock from deadline to deadline until `until()` holds.

    Between steps it lets in-flight HTTP requests finish, so every request is
    stamped with the simulated moment it was sent at.
    """
    while True:
        await settle(scheduler)
        if until():
            return
        # The scheduler re-arms its timer a few loop iterations after a refresh, and a
        # task woken just now (a rate limiter's next head) may be about to register an
        # earlier deadline: jump only to a deadline that survives another settle.
        deadline = None
        # Real-time bound generous for a loaded machine: only a hung test reaches it.
        with anyio.move_on_after(60):
            while True:
                while (deadline := clock.next_deadline()) is None:
                    await anyio.sleep(0.002)
                await settle(scheduler)
                if clock.next_deadline() == deadline:
                    break
        if deadline is None or deadline > horizon:
            raise AssertionError(
                f"condition not reached {horizon - clock.now():.0f}s before the horizon "
                f"(next deadline {deadline}, timer heap {len(scheduler._heap)}, "
                f"in flight {sum(r.refreshing is not None for r in scheduler.jobs.values())})"
            )
        await clock.set(deadline)


def metric(daemon: Daemon, name: str, **labels: str) -> float | None:
    """The value of one sample of the daemon's registry (None when absent)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(daemon.metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


@pytest.fixture
def debitura(make_emulator: Callable[..., Any], clock: ManualClock, leak_guard: LeakGuard) -> Any:
    from refresher.demo.debitura import DebituraEmulator

    leak_guard.secrets.add(DEB_KEY)
    return make_emulator(DebituraEmulator, api_keys={DEB_KEY}, clock=clock)


def deb_job(emu: Any, tmp_path: Path, tenants: list[str] | None = None, **provider: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"kind": "debitura", "base_url": emu.url, "api_key": DEB_KEY, **provider}
    if "tenants_file" not in provider:
        p["tenants"] = tenants or ["t-001", "t-002", "t-003"]
    return {
        "name": "debitura",
        "provider": p,
        "sinks": [{"kind": "file", "path": str(tmp_path / "{tenant}.json"), "format": "json"}],
    }
