"""The three partner providers on their real wire formats, against their emulators.

Each test names the contract rule (docs/contracts.md: DutyClaims, Debitura, Gooclaim)
it covers.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import jwt
import pytest

from refresher.cli import main
from refresher.demo.base import Fault
from refresher.demo.debitura import DebituraEmulator
from refresher.demo.dutyclaims import DutyClaimsEmulator
from refresher.demo.gooclaim import GooclaimEmulator
from tests.conftest import DEB_KEY, deb_job, drive, get_json, metric, settle, wait_for

pytestmark = pytest.mark.anyio

DC_SECRET = "dc-sandbox-secret-value"
GOO_SECRET = "gooclaim-client-secret-value"




# ------------------------------------------------------------------ DutyClaims


@pytest.fixture
def dutyclaims(make_emulator, clock, leak_guard):
    leak_guard.secrets.update({DC_SECRET, "dcp_live_managed_credential_abc"})
    return make_emulator(
        DutyClaimsEmulator,
        clients={"dc_client": DC_SECRET},
        granted_scopes={"dc_client": {"clients.read", "webhooks.read"}},
        managed_credentials={"dcp_live_managed_credential_abc"},
        clock=clock,
        token_lifetime=3600,
    )


def dc_job(emu, tmp_path: Path, **provider: Any) -> dict[str, Any]:
    return {
        "name": "dutyclaims",
        "provider": {
            "kind": "dutyclaims",
            "mode": "sandbox",
            "base_url": emu.url,
            "client_id": "dc_client",
            "client_secret": DC_SECRET,
            **provider,
        },
        "sinks": [{"kind": "file", "path": str(tmp_path / "dc.json"), "format": "json"}],
    }


async def test_dutyclaims_sandbox_form_grant_and_opaque_token(start_daemon, dutyclaims, clock, tmp_path) -> None:
    config = {"jobs": [dc_job(dutyclaims, tmp_path, scopes=["clients.read", "webhooks.read"])]}
    async with start_daemon(config) as daemon:
        rt = daemon.scheduler.jobs[("dutyclaims", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
    request = dutyclaims.requests[0]
    assert request.path == "/v1/oauth/token"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    from urllib.parse import parse_qs

    form = parse_qs(request.body.decode())
    assert form == {
        "grant_type": ["client_credentials"],
        "client_id": ["dc_client"],
        "client_secret": [DC_SECRET],
        "scope": ["clients.read webhooks.read"],
    }
    assert request.query == ""
    doc = json.loads((tmp_path / "dc.json").read_text())
    assert doc["value"].startswith("dcs_sbx_")
    # Opaque token: expiry from expires_in only.
    assert rt.token.expires_at == pytest.approx(rt.token.obtained_at + 3600)


@pytest.mark.parametrize(
    ("fault", "reason", "title"),
    [
        (Fault.unauthorized(), "unauthorized", "Unauthorized"),
        (Fault.forbidden(), "forbidden", "Forbidden"),
        (Fault.rate_limited("30"), "rate_limited", "Too Many Requests"),
    ],
)
async def test_dutyclaims_problem_responses_are_parsed_and_not_retried_blindly(
    start_daemon, dutyclaims, clock, tmp_path, leak_guard, fault, reason, title
) -> None:
    dutyclaims.inject(fault)
    async with start_daemon({"jobs": [dc_job(dutyclaims, tmp_path)]}) as daemon:
        rt = daemon.scheduler.jobs[("dutyclaims", None)]
        await wait_for(lambda: rt.failures == 1)
        await clock.advance(29)
        await settle(daemon.scheduler)
        assert dutyclaims.count() == 1, "retried blindly"
        event = leak_guard.events("refresh failed")[0]
        assert event["reason"] == reason
        assert event["problem_title"] == title and "injected fault" in event["problem_detail"]
        assert metric(daemon, "refresher_refresh_failures_total", token_job="dutyclaims", reason=reason) == 1


async def test_dutyclaims_capability_gated_scope_is_a_403(start_daemon, dutyclaims, tmp_path, leak_guard) -> None:
    async with start_daemon({"jobs": [dc_job(dutyclaims, tmp_path, scopes=["financing.request"])]}) as daemon:
        rt = daemon.scheduler.jobs[("dutyclaims", None)]
        await wait_for(lambda: rt.failures == 1)
        assert rt.failure_reason == "forbidden"
        assert "financing.request" in leak_guard.events("refresh failed")[0]["problem_detail"]
        assert rt.backoff == 300, "403 backs off at max, no tight loop"


async def test_dutyclaims_managed_credential_published_as_x_api_key_and_rotated(
    start_daemon, dutyclaims, tmp_path, leak_guard
) -> None:
    import httpx2

    leak_guard.secrets.add("dcp_live_rotated_credential_xyz")

    cred = tmp_path / "cred"
    cred.write_text("dcp_live_managed_credential_abc\n")
    job = {
        "name": "dc-prod",
        "provider": {"kind": "dutyclaims", "mode": "managed", "base_url": dutyclaims.url,
                     "credential_file": str(cred), "header": "x-api-key"},
        "sinks": [{"kind": "file", "path": str(tmp_path / "dc.header"), "format": "header"}],
    }
    from refresher.clock import SystemClock

    async with start_daemon({"jobs": [job]}, clock=SystemClock()) as daemon:
        rt = daemon.scheduler.jobs[("dc-prod", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        header = (tmp_path / "dc.header").read_text()
        assert header == "X-API-Key: dcp_live_managed_credential_abc\n"
        name, _, value = header.strip().partition(": ")
        async with httpx2.AsyncClient() as client:  # the published header works where documented
            status_url = dutyclaims.url + "/v1/claims/status?claimId=clm_123"
            assert (await client.get(status_url, headers={name: value})).status_code == 200
        assert rt.token.expires_at is None
        assert metric(daemon, "refresher_token_valid", token_job="dc-prod") == 1
        assert dutyclaims.count(dutyclaims.token_path) == 0, "managed mode calls no token endpoint"
        await wait_for(lambda: daemon.watcher.ready.is_set())
        # Rotation: the credential file changes → probed, re-published.
        dutyclaims.managed_credentials.add("dcp_live_rotated_credential_xyz")
        cred.write_text("dcp_live_rotated_credential_xyz\n")
        await wait_for(lambda: "rotated" in (tmp_path / "dc.header").read_text())


def test_dutyclaims_config_rules(tmp_path, capsys) -> None:
    import yaml

    def check(provider: dict[str, Any]) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"jobs": [{"name": "dc", "provider": {"kind": "dutyclaims", **provider},
                                                  "sinks": [{"kind": "file", "path": str(tmp_path / "t")}]}]}))
        assert main(["check", "--config", str(path)]) == 2
        return capsys.readouterr().err

    sandbox = {"mode": "sandbox", "client_id": "c", "client_secret": "s"}  # base_url: the default
    assert "jobs[0].provider.scopes: unknown DutyClaims scope(s) 'claims.fly'" in check({**sandbox, "scopes": ["clients.read", "claims.fly"]})
    assert "production managed credential (dcp_live_...)" in check({**sandbox, "client_secret": "dcp_live_abc"})
    assert "credential" in check({"mode": "managed"})


# ------------------------------------------------------------------ Debitura


async def test_debitura_mints_per_tenant_with_xapikey(start_daemon, debitura, clock, tmp_path) -> None:
    async with start_daemon({"jobs": [deb_job(debitura, tmp_path)]}) as daemon:
        await wait_for(lambda: all(r.token and r.refreshing is None for r in daemon.scheduler.jobs.values()))
        status, body = await get_json(daemon, "/metrics")
    for tenant in ("t-001", "t-002", "t-003"):
        doc = json.loads((tmp_path / f"{tenant}.json").read_text())
        claims = jwt.decode(doc["value"], debitura.hmac_key, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False})
        assert claims["externalTenantId"] == tenant
        assert doc["metadata"]["creditorId"] == DebituraEmulator.creditor_id(tenant)
        assert claims["exp"] - claims["iat"] == 1800
    request = debitura.requests[0]
    assert request.path == "/oauth/token" and request.headers["xapikey"] == DEB_KEY
    assert request.headers["content-type"] == "application/json"
    assert set(json.loads(request.body)) == {"externalTenantId"}
    assert "authorization" not in request.headers
    assert 'refresher_tenants_valid{provider="debitura",token_job="debitura"} 3.0' in body
    assert 'refresher_tenants_configured{provider="debitura",token_job="debitura"} 3.0' in body


async def test_debitura_always_re_mints_before_30_minutes(start_daemon, debitura, clock, tmp_path) -> None:
    async with start_daemon({"jobs": [deb_job(debitura, tmp_path, ["t-1"])]}) as daemon:
        rt = daemon.scheduler.jobs[("debitura", "t-1")]
        await drive(clock, daemon.scheduler, lambda: debitura.count(status=200) >= 4, horizon=clock.now() + 7200)
        # 30-minute tokens refreshed at ~75 %: no expired window across 4 mints.
        assert rt.token.expires_at > clock.now()


async def test_debitura_mint_401_is_one_failure_for_the_whole_key(
    start_daemon, debitura, clock, tmp_path, leak_guard
) -> None:
    """A 401 from the mint: the XApiKey is rejected. Every tenant on it pauses, one
    probe per backoff.max, nobody is marked invalid_link, one log line for the key;
    a rotated key file re-mints at once."""
    key_file = tmp_path / "api-key"
    key_file.write_text("revoked-debitura-key\n")
    leak_guard.secrets.add("revoked-debitura-key")
    tenants = [f"t-{i:02d}" for i in range(20)]
    job = deb_job(debitura, tmp_path, tenants)
    del job["provider"]["api_key"]
    job["provider"]["api_key_file"] = str(key_file)
    async with start_daemon({"jobs": [job]}) as daemon:
        sched = daemon.scheduler
        await settle(sched)
        assert debitura.count() == 1, "the first 401 pauses the other 19 before they ask"
        assert all(r.state != "invalid_link" for r in sched.jobs.values())
        states = {r.display_state(clock.now()) for r in sched.jobs.values()}
        assert states == {"paused", "failing"}
        assert len(leak_guard.events("credential rejected: pausing every token that uses it")) == 1
        # An hour: one probe per backoff.max (300 s), rotating over the tenants.
        t0 = clock.now()
        await drive(clock, sched, lambda: clock.now() >= t0 + 3600, horizon=t0 + 4000)
        assert 12 <= debitura.count() <= 14
        assert len({r.client for r in debitura.requests}) > 1, "the probe rotates"
        assert metric(daemon, "refresher_refresh_failures_total", token_job="debitura", reason="unauthorized") == debitura.count()
        # The key is rotated in the file (no watcher on the manual clock: say so).
        key_file.write_text(DEB_KEY + "\n")
        daemon.scheduler.credential_changed(list(sched.jobs))
        await drive(clock, sched, lambda: all(r.token for r in sched.jobs.values()), horizon=clock.now() + 5)
        assert all(r.failures == 0 and r.parked_at is None for r in sched.jobs.values())


async def test_debitura_one_tenant_refused_at_the_mint_backs_off_alone(
    start_daemon, debitura, clock, tmp_path
) -> None:
    async with start_daemon({"jobs": [deb_job(debitura, tmp_path, ["t-good", "t-bad"])]}) as daemon:
        sched = daemon.scheduler
        bad, good = sched.jobs[("debitura", "t-bad")], sched.jobs[("debitura", "t-good")]
        await wait_for(lambda: bad.token and good.token and bad.refreshing is None)
        debitura.mint_refused.add("t-bad")
        await sched.refresh(bad, force=True)  # t-good minted just now: this 401 is t-bad's
        assert bad.failure_reason == "unauthorized" and bad.backoff == 300 and bad.parked_at is None
        assert good.parked_at is None and sched.gates[bad.provider.credential].closed is False
        # An hour: t-bad asks once per backoff.max, never halving toward expiry; t-good
        # goes on undisturbed.
        t0, mints = clock.now(), debitura.count(client="t-bad")
        await drive(clock, sched, lambda: clock.now() >= t0 + 3600, horizon=t0 + 4000)
        assert debitura.count(client="t-bad") - mints <= 3600 // 300 + 1
        assert good.token.is_valid(clock.now()) and good.display_state(clock.now()) == "valid"
        assert bad.state != "invalid_link"


async def test_debitura_token_for_another_tenant_is_never_written(
    start_daemon, debitura, tmp_path
) -> None:
    async with start_daemon({"jobs": [deb_job(debitura, tmp_path, ["t-1"])]}) as daemon:
        rt = daemon.scheduler.jobs[("debitura", "t-1")]
        await wait_for(lambda: rt.token and rt.refreshing is None)
        before = (tmp_path / "t-1.json").read_bytes()
        other = debitura.sign_hs256({"externalTenantId": "t-2", "exp": 2_000_000_000})
        debitura.inject(Fault.body_json(
            {"accessToken": other, "tokenType": "Bearer", "expiresIn": 1800, "externalTenantId": "t-2"}
        ))
        await daemon.scheduler.refresh(rt, force=True)
        assert rt.failure_reason == "tenant_mismatch" and (tmp_path / "t-1.json").read_bytes() == before
        assert metric(daemon, "refresher_refresh_failures_total", token_job="debitura", reason="tenant_mismatch") == 1


async def test_401_with_a_valid_token_is_retried_no_more_often_than_backoff_max(
    start_daemon, oauth2_emulator, clock, tmp_path
) -> None:
    from tests.conftest import oauth2_job

    async with start_daemon({"jobs": [oauth2_job(oauth2_emulator, tmp_path)]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.token and rt.refreshing is None)
        oauth2_emulator.inject(Fault.unauthorized(count=1000))
        expires = rt.token.expires_at
        await drive(clock, daemon.scheduler, lambda: clock.now() >= expires + 600, horizon=expires + 1000)
        times = [r.at for r in oauth2_emulator.requests if r.status == 401]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert times and min(gaps) >= 300 - 1e-6, gaps


async def test_429_pauses_every_job_sharing_the_credential(
    start_daemon, oauth2_emulator, clock, tmp_path
) -> None:
    from tests.conftest import oauth2_job

    (tmp_path / "b").mkdir()
    jobs = [oauth2_job(oauth2_emulator, tmp_path), oauth2_job(oauth2_emulator, tmp_path / "b", name="b")]
    async with start_daemon({"jobs": jobs}) as daemon:
        sched = daemon.scheduler
        a, b = sched.jobs[("api", None)], sched.jobs[("b", None)]
        await wait_for(lambda: a.token and b.token and a.refreshing is None and b.refreshing is None)
        oauth2_emulator.inject(Fault.rate_limited("7"))
        await sched.refresh(a, force=True)
        throttled_at = oauth2_emulator.requests[-1].at
        before = oauth2_emulator.count()
        await sched.refresh(b)  # due now, but the credential is paused: no request
        assert oauth2_emulator.count() == before and b.display_state(clock.now()) == "paused"
        await drive(clock, sched, lambda: b.parked_at is None and a.failures == 0, horizon=clock.now() + 10)
        later = [r.at - throttled_at for r in oauth2_emulator.requests[before:]]
        assert later and min(later) >= 7 - 1e-6, later


async def test_debitura_1000_tenants_within_rate_none_missed(start_daemon, debitura, clock, tmp_path) -> None:
    tenants = [f"tenant-{i:04d}" for i in range(1000)]
    job = deb_job(debitura, tmp_path, tenants, requests_per_minute=600, max_concurrency=16)
    start = clock.now()
    async with start_daemon({"jobs": [job]}) as daemon:
        sched = daemon.scheduler
        await drive(clock, sched, lambda: all(r.token is not None for r in sched.jobs.values()), horizon=start + 600)
        assert debitura.count(status=200) == 1000 and debitura.count() == 1000
        times = sorted(r.at for r in debitura.requests)
        # ≤ 600 in any 60 s window (the configured rate): 1000 need just over a minute.
        for i in range(len(times) - 600):
            assert times[i + 600] - times[i] >= 60
        assert clock.now() - start < 62
        assert sched.peak_requests_in_flight <= 16
    assert len(list(tmp_path.glob("tenant-*.json"))) == 1000


async def test_token_memory_follows_the_tenants_through_refreshes_and_removal(
    start_daemon, debitura, clock, tmp_path
) -> None:
    from refresher.logging import TOKENS_PER_OWNER

    tenants = [f"t-{i:03d}" for i in range(40)]
    async with start_daemon({"jobs": [deb_job(debitura, tmp_path, tenants)]}) as daemon:
        sched, redactor = daemon.scheduler, daemon.redactor
        await drive(clock, sched, lambda: all(r.token for r in sched.jobs.values()), horizon=clock.now() + 60)
        # Every tenant refreshed again and again: five more tokens each, on average.
        minted = lambda: debitura.count(status=200)  # noqa: E731
        await drive(clock, sched, lambda: minted() >= 6 * len(tenants), horizon=clock.now() + 6 * 1800)
        assert redactor.remembered_tokens <= TOKENS_PER_OWNER * len(sched.jobs)
        await daemon.jobs.remove("debitura")
        assert redactor.remembered_tokens == 0


async def test_debitura_tenants_file_add_and_remove(start_daemon, debitura, tmp_path) -> None:
    from refresher.clock import SystemClock

    tenants = tmp_path / "tenants.txt"
    tenants.write_text("t-a\nt-b  # comment\n")
    job = deb_job(debitura, tmp_path, tenants_file=str(tenants))
    async with start_daemon({"jobs": [job]}, clock=SystemClock()) as daemon:
        await wait_for(lambda: (tmp_path / "t-a.json").exists() and (tmp_path / "t-b.json").exists())
        await wait_for(lambda: daemon.watcher.ready.is_set())
        tenants.write_text("t-b\nt-c\n")
        await wait_for(lambda: (tmp_path / "t-c.json").exists() and not (tmp_path / "t-a.json").exists())
        assert set(k[1] for k in daemon.scheduler.jobs) == {"t-b", "t-c"}
        assert debitura.count(client="t-b") == 1, "unchanged tenant not re-minted"


def test_debitura_sink_path_needs_tenant(tmp_path, capsys) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"jobs": [{"name": "d", "provider": {"kind": "debitura", "api_key": "k", "tenants": ["a"]},
                                              "sinks": [{"kind": "file", "path": str(tmp_path / "x.jwt")}]}]}))
    assert main(["check", "--config", str(path)]) == 2
    assert "sinks[0].path must contain {tenant}" in capsys.readouterr().err


# ------------------------------------------------------------------ Gooclaim


@pytest.fixture
def gooclaim(make_emulator, clock, leak_guard):
    leak_guard.secrets.add(GOO_SECRET)
    return make_emulator(GooclaimEmulator, clients={"goo-client": GOO_SECRET}, tenants={"goo-client": "tn_42"}, clock=clock)


def goo_job(emu, tmp_path: Path, name: str = "gooclaim", **provider: Any) -> dict[str, Any]:
    pem = tmp_path / "gooclaim.pem"
    pem.write_bytes(emu.public_key_pem())
    return {
        "name": name,
        "provider": {"kind": "gooclaim", "base_url": emu.url, "client_id": "goo-client", "client_secret": GOO_SECRET,
                     "issuer": emu.issuer, "public_key_file": str(pem), **provider},
        "sinks": [{"kind": "file", "path": str(tmp_path / f"{name}.token")}],
    }


async def test_gooclaim_json_grant_verified_rs256(start_daemon, gooclaim, tmp_path) -> None:
    async with start_daemon({"jobs": [goo_job(gooclaim, tmp_path, introspect=True)]}) as daemon:
        rt = daemon.scheduler.jobs[("gooclaim", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
    token_req = gooclaim.requests[0]
    assert token_req.path == "/v1/auth/token" and token_req.headers["content-type"] == "application/json"
    assert json.loads(token_req.body) == {"grant_type": "client_credentials", "client_id": "goo-client", "client_secret": GOO_SECRET}
    for request in gooclaim.requests:
        assert GOO_SECRET not in request.query and GOO_SECRET not in request.path
        assert GOO_SECRET not in json.dumps(dict(request.headers))
    introspect = gooclaim.requests[1]
    assert introspect.path == "/v1/auth/introspect"
    assert introspect.headers["authorization"] == f"Bearer {rt.token.value}"
    assert rt.token.extra["tenant_id"] == "tn_42"
    assert rt.token.expires_at - rt.token.obtained_at == pytest.approx(3600, abs=1)
    assert (tmp_path / "gooclaim.token").read_text().strip() == rt.token.value


async def test_gooclaim_jwks_url_verification(start_daemon, gooclaim, tmp_path) -> None:
    job = goo_job(gooclaim, tmp_path)
    del job["provider"]["public_key_file"]
    job["provider"]["jwks_url"] = gooclaim.url + "/.well-known/jwks.json"
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("gooclaim", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)


@pytest.mark.parametrize(
    ("knob", "message"),
    [("wrong_audience", "wrong audience"), ("wrong_issuer", "wrong issuer"), ("bad_signature", "signature does not verify"),
     ("expired", "already expired")],
)
async def test_gooclaim_rejects_unverifiable_tokens(start_daemon, gooclaim, tmp_path, knob, message) -> None:
    setattr(gooclaim, knob, True)
    async with start_daemon({"jobs": [goo_job(gooclaim, tmp_path)]}) as daemon:
        rt = daemon.scheduler.jobs[("gooclaim", None)]
        await wait_for(lambda: rt.failures == 1)
        assert rt.failure_reason == "bad_response" and message in rt.failure_message
        assert not (tmp_path / "gooclaim.token").exists(), "an unverified token was written"
        assert metric(daemon, "refresher_refresh_failures_total", token_job="gooclaim", reason="bad_response") == 1


async def test_gooclaim_without_key_still_checks_audience(start_daemon, gooclaim, tmp_path) -> None:
    job = goo_job(gooclaim, tmp_path)
    del job["provider"]["public_key_file"]
    gooclaim.wrong_audience = True
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("gooclaim", None)]
        await wait_for(lambda: rt.failures == 1)
        assert "wrong audience" in rt.failure_message


async def test_gooclaim_introspection_inactive_is_rejected(start_daemon, gooclaim, tmp_path) -> None:
    job = goo_job(gooclaim, tmp_path, introspect=True, tenant_id="another-tenant")
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("gooclaim", None)]
        await wait_for(lambda: rt.failures == 1)
        assert "tenant_id 'tn_42' != 'another-tenant'" in rt.failure_message


async def test_gooclaim_401_is_never_retried_in_a_loop(start_daemon, gooclaim, clock, tmp_path, leak_guard) -> None:
    job = goo_job(gooclaim, tmp_path)
    job["provider"]["client_secret"] = "not-the-secret"
    leak_guard.secrets.add("not-the-secret")
    async with start_daemon({"jobs": [job]}) as daemon:
        t0 = clock.now()
        await drive(clock, daemon.scheduler, lambda: clock.now() >= t0 + 3600, horizon=t0 + 4000)
        assert gooclaim.count(status=401) <= 13


async def test_gooclaim_shared_client_id_stays_under_60_per_minute_for_an_hour(start_daemon, gooclaim, clock, tmp_path) -> None:
    """90 jobs share one client_id: over a simulated hour the emulator never sees
    more than 60 requests in any minute and never answers 429."""
    gooclaim.token_lifetime = 1800
    jobs = [goo_job(gooclaim, tmp_path, name=f"g{i:03d}") for i in range(90)]
    start = clock.now()
    async with start_daemon({"jobs": jobs, "refresh": {"min_remaining": "2m"}}) as daemon:
        sched = daemon.scheduler
        await drive(clock, sched, lambda: clock.now() >= start + 3600, horizon=start + 7200)
        assert gooclaim.count(status=429) == 0
        assert gooclaim.token_limiter.max_in_window <= 60
        assert gooclaim.token_limiter.max_in_window == 60, "the start-up burst used the whole budget"
        assert gooclaim.count(status=200) >= 90 * 2  # every job refreshed within the hour
        # Earliest-expiring first and nobody missed: every job holds a valid token.
        assert all(r.token is not None and r.token.is_valid(clock.now()) for r in sched.jobs.values())


async def test_gooclaim_limit_misconfigured_gets_429_and_waits_exact_retry_after(start_daemon, gooclaim, clock, tmp_path) -> None:
    jobs = [goo_job(gooclaim, tmp_path, name=f"g{i:02d}", requests_per_minute=1000) for i in range(61)]
    async with start_daemon({"jobs": jobs}) as daemon:
        sched = daemon.scheduler
        await wait_for(lambda: gooclaim.count(status=429) == 1 and sched.requests_in_flight == 0)
        limited = next(r for r in sched.jobs.values() if r.failure_reason == "rate_limited")
        first_429 = next(r for r in gooclaim.requests if r.status == 429)
        assert limited.next_refresh_at == pytest.approx(first_429.at + 60, abs=1)
        assert limited.backoff == 60
