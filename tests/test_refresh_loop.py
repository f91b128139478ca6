"""The daemon end to end on the injected clock: real HTTP to the emulator, real files."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from refresher.demo.base import Fault
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    deb_job,
    drive,
    get_json,
    metric,
    oauth2_job,
    wait_for,
)

pytestmark = pytest.mark.anyio




def runtime(daemon):
    return daemon.scheduler.jobs[("api", None)]


async def test_token_is_refreshed_before_expiry_and_file_swapped_atomically(
    start_daemon, oauth2_emulator, clock, tmp_path: Path
) -> None:
    target = tmp_path / "api.token"
    config = {"jobs": [oauth2_job(oauth2_emulator, tmp_path)]}
    seen: set[str] = set()
    bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                data = target.read_text()
            except FileNotFoundError:
                continue
            if not data.startswith("eyJ") or not data.endswith("\n") or data.count(".") != 2:
                bad.append(data[:10])
            seen.add(data)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        async with start_daemon(config) as daemon:
            rt = runtime(daemon)
            await wait_for(lambda: rt.token is not None and rt.refreshing is None)
            first = rt.token
            start = clock.now()
            for cycle in range(1, 4):
                due = rt.next_refresh_at
                lifetime = rt.token.expires_at - rt.token.obtained_at
                # 0.75 of the lifetime ± 10 % jitter, never within min_remaining (5 min) of expiry.
                assert rt.token.obtained_at + 0.675 * lifetime <= due <= rt.token.expires_at - 300
                await clock.set(due)
                await wait_for(
                    lambda c=cycle: (
                        oauth2_emulator.count(status=200) == c + 1 and rt.refreshing is None
                    )
                )
                assert target.read_text().strip() == rt.token.value
                assert rt.token.expires_at > clock.now() + 300
            assert rt.token.value != first.value
            assert clock.now() - start > 2 * 3600, "three refreshes span several token lifetimes"
            assert oauth2_emulator.count() == 4
    finally:
        stop.set()
        thread.join()
    assert bad == []
    assert len(seen) >= 2


async def test_429_waits_exactly_retry_after(
    start_daemon, oauth2_emulator, clock, tmp_path
) -> None:
    oauth2_emulator.inject(Fault.rate_limited("7"))
    async with start_daemon({"jobs": [oauth2_job(oauth2_emulator, tmp_path)]}) as daemon:
        rt = runtime(daemon)
        await wait_for(lambda: rt.failures == 1)
        first = oauth2_emulator.requests[0]
        assert first.status == 429
        assert rt.next_refresh_at == pytest.approx(first.at + 7, abs=1e-6)
        await clock.advance(6.99)
        await wait_for(lambda: True)
        assert oauth2_emulator.count() == 1, "retried before Retry-After"
        await clock.advance(0.01)
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        second = oauth2_emulator.requests[1]
        assert second.at - first.at == pytest.approx(7.0, abs=1e-6)
        assert metric(daemon, "refresher_rate_limited_total", token_job="api") == 1
        assert (
            metric(daemon, "refresher_refresh_failures_total", token_job="api", reason="rate_limited")
            == 1
        )
        assert metric(daemon, "refresher_retry_after_seconds_sum", token_job="api") == 7


async def test_429_with_http_date(start_daemon, oauth2_emulator, clock, tmp_path) -> None:
    from email.utils import formatdate

    oauth2_emulator.inject(Fault.rate_limited(formatdate(clock.now() + 30, usegmt=True)))
    async with start_daemon({"jobs": [oauth2_job(oauth2_emulator, tmp_path)]}) as daemon:
        rt = runtime(daemon)
        await wait_for(lambda: rt.failures == 1)
        assert rt.next_refresh_at - oauth2_emulator.requests[0].at == pytest.approx(30, abs=1.0)


async def test_5xx_storm_backs_off_keeps_old_token_then_expires(
    start_daemon, oauth2_emulator, clock, tmp_path, leak_guard
) -> None:
    oauth2_emulator.token_lifetime = 600
    target = tmp_path / "api.token"
    config = {
        "refresh": {"backoff": {"initial": "1s", "max": "60s"}},
        "jobs": [oauth2_job(oauth2_emulator, tmp_path)],
    }
    async with start_daemon(config) as daemon:
        rt = runtime(daemon)
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        old = rt.token
        oauth2_emulator.inject(Fault.server_error(count=10_000))
        delays: list[float] = []
        while clock.now() < old.expires_at + 600:
            n = rt.failures
            await clock.set(rt.next_refresh_at)
            await wait_for(lambda n=n: rt.failures == n + 1)
            delays.append(rt.backoff)
            if clock.now() < old.expires_at:
                # A failure never replaces or removes the still-valid token.
                assert target.read_text().strip() == old.value
                assert metric(daemon, "refresher_token_valid", token_job="api") == 1
                if old.expires_at - clock.now() > 1:
                    assert rt.next_refresh_at < old.expires_at, (
                        "retry planned to land before expiry"
                    )
        # Exponential growth with full jitter, capped at max.
        assert all(d <= 60 for d in delays)
        assert max(delays) > 10, "backoff grew"
        assert len({round(d, 3) for d in delays}) > len(delays) // 2, "delays are jittered"
        assert clock.now() > old.expires_at
        assert metric(daemon, "refresher_token_valid", token_job="api") == 0
        assert target.read_text().strip() == old.value, "on_expiry: keep leaves the last value"
        assert metric(
            daemon, "refresher_refresh_failures_total", token_job="api", reason="server_error"
        ) == len(delays)
        status, body = await get_json(daemon, "/v1/tokens", leak_guard)
        assert (
            body["jobs"][0]["state"] == "expired"
            and body["jobs"][0]["last_error"] == "server_error"
        )
        # Provider comes back: recovery.
        oauth2_emulator.clear_faults()
        await clock.set(rt.next_refresh_at)
        await wait_for(lambda: rt.token is not old and rt.refreshing is None)
        assert metric(daemon, "refresher_token_valid", token_job="api") == 1
        assert metric(daemon, "refresher_backoff_seconds", token_job="api") == 0


async def test_backoff_delays_respect_exponential_caps(
    start_daemon, oauth2_emulator, clock, tmp_path
) -> None:
    config = {
        "refresh": {"backoff": {"initial": "1s", "max": "30s"}},
        "jobs": [oauth2_job(oauth2_emulator, tmp_path)],
    }
    oauth2_emulator.inject(Fault.server_error(count=10_000))
    async with start_daemon(config) as daemon:
        rt = runtime(daemon)
        for attempt in range(1, 12):
            await wait_for(lambda a=attempt: rt.failures == a)
            assert 0.1 <= rt.backoff <= min(30, 2 ** (attempt - 1)) + 1e-9
            await clock.set(rt.next_refresh_at)


async def test_401_is_not_retried_in_a_loop(
    start_daemon, oauth2_emulator, clock, tmp_path, leak_guard
) -> None:
    job = oauth2_job(oauth2_emulator, tmp_path)
    job["provider"]["client_secret"] = "wrong-secret-value"
    leak_guard.secrets.add("wrong-secret-value")
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = runtime(daemon)
        await wait_for(lambda: rt.failures == 1)
        for _ in range(60):  # one simulated hour, minute by minute
            await clock.advance(60)
            await wait_for(lambda: rt.refreshing is None)
        # Backoff starts at max (5 min): at most 1 + 60/5 requests in the hour.
        assert oauth2_emulator.count() <= 13
        assert oauth2_emulator.count(status=401) == oauth2_emulator.count()
        assert rt.display_state(clock.now()) == "failing"
        failed = leak_guard.events("refresh failed")
        assert failed and failed[0]["reason"] == "unauthorized"
        assert failed[0]["problem_detail"] == "invalid client credentials"
        assert failed[0]["job"] == "api"


async def test_readyz_flips_after_first_successful_write(
    start_daemon, oauth2_emulator, clock, tmp_path
) -> None:
    oauth2_emulator.inject(Fault.server_error(count=1))
    async with start_daemon({"jobs": [oauth2_job(oauth2_emulator, tmp_path)]}) as daemon:
        rt = runtime(daemon)
        await wait_for(lambda: rt.failures == 1)
        status, body = await get_json(daemon, "/readyz")
        assert status == 503 and body["jobs"][0]["state"] == "failing"
        assert (await get_json(daemon, "/healthz"))[0] == 200
        await clock.set(rt.next_refresh_at)
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        status, body = await get_json(daemon, "/readyz")
        assert status == 200


async def test_status_and_metrics_never_contain_the_token(
    start_daemon, oauth2_emulator, tmp_path, leak_guard
) -> None:
    async with start_daemon({"jobs": [oauth2_job(oauth2_emulator, tmp_path)]}) as daemon:
        rt = runtime(daemon)
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        status, body = await get_json(daemon, "/v1/tokens", leak_guard)
        entry = body["jobs"][0]
        assert entry["fingerprint"] == rt.token.fingerprint()
        assert entry["state"] == "valid" and entry["provider"] == "oauth2"
        assert rt.token.value not in str(body)
        status, text = await get_json(daemon, "/metrics", leak_guard)
        assert 'refresher_token_valid{provider="oauth2",token_job="api"} 1.0' in text
        assert "refresher_build_info" in text
        # the request carried the secret in the body, as configured (form, client auth in body)
        request = oauth2_emulator.requests[0]
        assert b"client_id=" + CLIENT_ID.encode() in request.body
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"


async def test_restart_with_valid_token_on_disk_does_not_mint(
    start_daemon, oauth2_emulator, clock, tmp_path
) -> None:
    config = {
        "jobs": [
            oauth2_job(
                oauth2_emulator,
                tmp_path,
                sinks=[{"kind": "file", "path": str(tmp_path / "api.json"), "format": "json"}],
            )
        ]
    }
    async with start_daemon(config) as daemon:
        await wait_for(lambda: runtime(daemon).token is not None)
        fp = runtime(daemon).token.fingerprint()
    assert oauth2_emulator.count() == 1
    async with start_daemon(config) as daemon:
        assert runtime(daemon).token.fingerprint() == fp
        assert (await get_json(daemon, "/readyz"))[0] == 200
        assert oauth2_emulator.count() == 1, "restart re-minted a valid token"


@pytest.mark.parametrize(("body", "client_auth"), [("json", "body"), ("form", "basic")])
async def test_oauth2_json_body_and_basic_auth(start_daemon, oauth2_emulator, tmp_path, body, client_auth) -> None:
    import base64
    import json

    job = oauth2_job(oauth2_emulator, tmp_path)
    job["provider"].update(body=body, client_auth=client_auth, scopes=["read", "write"], audience="aud-1",
                           headers={"X-Tenant": "acme"})
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = runtime(daemon)
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
    request = oauth2_emulator.requests[0]
    assert request.headers["x-tenant"] == "acme"
    if body == "json":
        assert request.headers["content-type"] == "application/json"
        sent = json.loads(request.body)
        assert sent == {"grant_type": "client_credentials", "scope": "read write", "audience": "aud-1",
                        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    else:
        expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        assert request.headers["authorization"] == f"Basic {expected}"
        assert b"client_secret" not in request.body and b"scope=read+write" in request.body


async def test_sink_failure_retries_the_write_without_re_minting(start_daemon, oauth2_emulator, clock, tmp_path) -> None:
    target_dir = tmp_path / "later"
    job = oauth2_job(oauth2_emulator, tmp_path, sinks=[{"kind": "file", "path": str(target_dir / "api.token")}])
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = runtime(daemon)
        await wait_for(lambda: rt.failures == 1 and rt.refreshing is None)
        assert rt.failure_reason == "sink" and "directory does not exist" in rt.failure_message
        assert metric(daemon, "refresher_sink_failures_total", token_job="api", sink="file") == 1
        assert (await get_json(daemon, "/readyz"))[0] == 503
        target_dir.mkdir()
        await clock.set(rt.next_refresh_at)
        await wait_for(lambda: (target_dir / "api.token").exists() and rt.refreshing is None)
        assert oauth2_emulator.count() == 1, "the minted token was re-used, not re-minted"
        assert (target_dir / "api.token").read_text().strip() == rt.token.value
        assert (await get_json(daemon, "/readyz"))[0] == 200


async def test_tenant_labels_only_when_enabled(start_daemon, make_emulator, clock, tmp_path, leak_guard) -> None:
    from refresher.demo.debitura import DebituraEmulator

    emu = make_emulator(DebituraEmulator, api_keys={"label-test-key"}, clock=clock)
    leak_guard.secrets.add("label-test-key")
    job = {"name": "deb", "provider": {"kind": "debitura", "base_url": emu.url, "api_key": "label-test-key",
                                       "tenants": ["a", "b"]},
           "sinks": [{"kind": "file", "path": str(tmp_path / "{tenant}.jwt")}]}
    for enabled in (False, True):
        async with start_daemon({"jobs": [job], "metrics": {"tenant_labels": enabled}}) as daemon:
            await wait_for(lambda: all(r.token and r.refreshing is None for r in daemon.scheduler.jobs.values()))
            text = (await get_json(daemon, "/metrics"))[1]
            has_tenant = 'tenant="a"' in text
            assert has_tenant is enabled
            assert 'refresher_tenants_valid{provider="debitura",token_job="deb"} 2.0' in text


@pytest.mark.parametrize("on_expiry", ["keep", "remove"])
async def test_on_expiry_keep_or_remove(start_daemon, oauth2_emulator, clock, tmp_path, leak_guard, on_expiry) -> None:
    oauth2_emulator.token_lifetime = 600
    target = tmp_path / "api.token"
    config = {"refresh": {"backoff": {"initial": "1s", "max": "60s"}},
              "jobs": [oauth2_job(oauth2_emulator, tmp_path, on_expiry=on_expiry)]}
    async with start_daemon(config) as daemon:
        rt = runtime(daemon)
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        expires_at = rt.token.expires_at
        oauth2_emulator.inject(Fault.server_error(count=10_000))
        await clock.set(expires_at - 1)
        await wait_for(lambda: rt.refreshing is None)
        assert target.exists() and not leak_guard.events("token expired without a replacement")
        await clock.set(expires_at)
        await wait_for(lambda: len(leak_guard.events("token expired without a replacement")) == 1)
        await wait_for(lambda: target.exists() is (on_expiry == "keep"))
        assert metric(daemon, "refresher_token_valid", token_job="api") == 0


async def second_round(
    start_daemon, debitura, clock, tmp_path, refresh, **provider
) -> tuple[dict[str, float], dict[str, float]]:
    """40 Debitura tenants minted, then refreshed once each: (planned moment, moment
    sent) per tenant."""
    tenants = [f"t-{i:02d}" for i in range(40)]
    job = deb_job(debitura, tmp_path, tenants, **provider)
    async with start_daemon({"refresh": refresh, "jobs": [job]}) as daemon:
        sched = daemon.scheduler
        await drive(clock, sched, lambda: all(r.token for r in sched.jobs.values()), horizon=clock.now() + 60)
        planned = {r.tenant: r.next_refresh_at for r in sched.jobs.values()}
        first = len(debitura.requests)
        await drive(clock, sched, lambda: len(debitura.requests) >= first + 40, horizon=clock.now() + 1800)
        return planned, {r.client: r.at for r in debitura.requests[first:]}


@pytest.mark.parametrize("coalesce", [0.01, 0.0])
async def test_planned_refreshes_leave_in_batches_a_little_early_never_late(
    start_daemon, debitura, clock, tmp_path, coalesce
) -> None:
    refresh = {"coalesce": coalesce}
    planned, sent = await second_round(start_daemon, debitura, clock, tmp_path, refresh)
    slack = coalesce * 1800  # Debitura tokens live 30 min
    for tenant, moment in sent.items():
        assert planned[tenant] - slack - 1e-6 <= moment <= planned[tenant] + 1e-6, tenant
    # 40 refreshes spread by jitter over ±135 s: with 18 s of slack they leave in a
    # few batches; without, each at its own moment.
    batches = len(set(sent.values()))
    assert batches <= 16 if coalesce else batches == 40


async def test_a_rate_limited_providers_refreshes_never_leave_early(
    start_daemon, debitura, clock, tmp_path
) -> None:
    """Its limiter serves the earliest expiry first among those waiting: a refresh
    dispatched early could take a grant a more urgent one, not yet due, needs."""
    planned, sent = await second_round(
        start_daemon, debitura, clock, tmp_path, {"coalesce": 0.05}, requests_per_minute=600
    )
    assert sent and all(at >= planned[tenant] - 1e-6 for tenant, at in sent.items())
