"""HTTP/2 per provider (``http2: true``): negotiated by ALPN over TLS against a real
h2 server (hypercorn), every tenant's mint multiplexed on one connection; the default
stays HTTP/1.1 keep-alive, and an https partner that only speaks HTTP/1.1 still works."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpcore2
import jwt
import pytest

from refresher.clock import ManualClock
from refresher.config import load_settings
from refresher.demo.debitura import DebituraEmulator
from refresher.errors import ConfigError
from refresher.providers.base import HTTPClients
from tests.conftest import CLIENT_ID, CLIENT_SECRET, DEB_KEY, LeakGuard, deb_job, wait_for
from tests.emulators.h2server import HypercornServer
from tests.emulators.oauth2 import OAuth2Emulator
from tests.emulators.tls import ServesTLS

pytestmark = pytest.mark.anyio

TENANTS = [f"t-{n:03d}" for n in range(200)]
PARTNER = SimpleNamespace(url="https://referral-api.debitura.example")


@pytest.fixture
def debitura_h2(
    leak_guard: LeakGuard, clock: ManualClock
) -> Iterator[tuple[HypercornServer, DebituraEmulator]]:
    """The Debitura emulator's app served by hypercorn (h2 and http/1.1 over TLS)."""
    emulator = DebituraEmulator(api_keys={DEB_KEY}, clock=clock)
    leak_guard.secrets.add(DEB_KEY)
    leak_guard.emulators.append(emulator)
    with HypercornServer(emulator.app()) as server:
        yield server, emulator


def h2_job(server: HypercornServer, tmp_path: Path, **provider: Any) -> dict[str, Any]:
    return deb_job(server, tmp_path, TENANTS, ca_file=str(server.ca_file), **provider)


def all_minted(daemon: Any) -> Callable[[], bool]:
    runtimes = list(daemon.scheduler.jobs.values())
    return lambda: all(r.token is not None and r.refreshing is None for r in runtimes)


async def test_http2_mints_every_tenant_over_one_multiplexed_connection(
    start_daemon: Any, debitura_h2: tuple[HypercornServer, DebituraEmulator], tmp_path: Path
) -> None:
    server, emulator = debitura_h2
    # 200 in flight at once: more than the server's 100 concurrent streams.
    job = h2_job(server, tmp_path, http2=True, max_concurrency=200)
    async with start_daemon({"jobs": [job]}) as daemon:
        await wait_for(all_minted(daemon), timeout=30)
    for tenant in TENANTS[::50]:
        doc = json.loads((tmp_path / f"{tenant}.json").read_text())
        claims = jwt.decode(
            doc["value"],
            emulator.hmac_key,
            algorithms=["HS256"],
            options={"verify_exp": False, "verify_iat": False},
        )
        assert claims["externalTenantId"] == tenant
    tokens = [seen for seen in server.seen if seen.path == "/oauth/token"]
    assert len(tokens) == len(TENANTS)
    assert server.http_versions() == {"2"}
    assert len(server.connections()) == 1


async def test_http2_is_off_by_default_and_http11_opens_a_connection_per_request_in_flight(
    start_daemon: Any, debitura_h2: tuple[HypercornServer, DebituraEmulator], tmp_path: Path
) -> None:
    server, _ = debitura_h2
    async with start_daemon({"jobs": [h2_job(server, tmp_path)]}) as daemon:
        await wait_for(all_minted(daemon), timeout=30)
    assert server.http_versions() == {"1.1"}
    # max_concurrency 16: the pool holds several keep-alive connections, not one.
    assert 1 < len(server.connections()) <= 16


class TLSDebituraEmulator(ServesTLS, DebituraEmulator):
    """The Debitura emulator on uvicorn over TLS: an https partner without HTTP/2."""


async def test_http2_against_an_https_server_without_h2_falls_back_to_http11(
    start_daemon: Any, make_emulator: Any, leak_guard: LeakGuard, clock: ManualClock, tmp_path: Path
) -> None:
    emulator = make_emulator(TLSDebituraEmulator, api_keys={DEB_KEY}, tls=True, clock=clock)
    leak_guard.secrets.add(DEB_KEY)
    job = deb_job(emulator, tmp_path, ["t-1", "t-2"], ca_file=str(emulator.ca_file), http2=True)
    async with start_daemon({"jobs": [job]}) as daemon:
        await wait_for(all_minted(daemon))
    assert emulator.count(status=200) == 2
    assert (tmp_path / "t-2.json").exists()


async def test_the_generic_oauth2_provider_speaks_http2_when_asked(
    start_daemon: Any, leak_guard: LeakGuard, clock: ManualClock, tmp_path: Path
) -> None:
    emulator = OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, clock=clock)
    leak_guard.emulators.append(emulator)
    with HypercornServer(emulator.app()) as server:
        provider = {
            "kind": "oauth2",
            "token_url": f"{server.url}/oauth/token",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "ca_file": str(server.ca_file),
            "http2": True,
        }
        sink = {"kind": "file", "path": str(tmp_path / "api.token")}
        async with start_daemon({"jobs": [{"name": "api", "provider": provider, "sinks": [sink]}]}):
            await wait_for(lambda: (tmp_path / "api.token").exists())
        assert server.http_versions() == {"2"}


async def test_http2_and_http11_clients_for_one_host_are_kept_apart(
    debitura_h2: tuple[HypercornServer, DebituraEmulator],
) -> None:
    server, _ = debitura_h2
    clients = HTTPClients()
    try:
        h1 = clients.get(server.url, ca_file=server.ca_file)
        h2 = clients.get(server.url, ca_file=server.ca_file, http2=True)
        assert h1 is not h2
        assert clients.get(server.url, ca_file=server.ca_file, http2=True) is h2
        answers = [await client.get("/_emulator/requests") for client in (h1, h2)]
        assert [a.http_version for a in answers] == ["HTTP/1.1", "HTTP/2"]
        pool = h2._transport._pool  # type: ignore[attr-defined]
        assert isinstance(pool, httpcore2.AsyncConnectionPool)
    finally:
        await clients.aclose()


@pytest.mark.parametrize("value", ["yes", "true", 1, "on"])
def test_http2_must_be_a_boolean(tmp_path: Path, value: object) -> None:
    job = deb_job(PARTNER, tmp_path, http2=value)
    with pytest.raises(ConfigError) as raised:
        load_settings(data={"jobs": [job]})
    assert any(
        e.startswith("jobs[0].provider.http2: Input should be a valid boolean")
        for e in raised.value.errors
    ), raised.value.errors


def test_http2_accepts_true_and_defaults_to_false(tmp_path: Path) -> None:
    on = load_settings(data={"jobs": [deb_job(PARTNER, tmp_path, http2=True)]})
    off = load_settings(data={"jobs": [deb_job(PARTNER, tmp_path)]})
    assert on.jobs[0].provider.http2 is True
    assert off.jobs[0].provider.http2 is False
