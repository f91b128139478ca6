"""Partner contract rules, each against its emulator over the real wire.

DutyClaims: the sandbox token endpoint on api.dutyclaims.com, visible
environments, managed credentials probed with the documented pair. Gooclaim
Gooclaim: RS256 only, the token's sub and tenant_id, introspection shared per
client id and honest about ``active``/``exp``/``scope``, signing-key rotation.
Scopes (RFC 6749 §3.3/§5.1) for every provider that requests or expects them.
docs/contracts.md maps every seed rule to the test that proves it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from refresher.cli import main
from refresher.clock import ManualClock, SystemClock
from refresher.demo.base import Fault
from refresher.demo.dutyclaims import DutyClaimsEmulator
from refresher.demo.gooclaim import GooclaimEmulator
from refresher.scopes import missing_scopes
from tests.conftest import drive, get_json, metric, oauth2_job, settle, wait_for

pytestmark = pytest.mark.anyio

DC_SECRET = "dc-sandbox-secret-contract"
CRED = "dcp_live_contract_credential_0001"
GOO_SECRET = "gooclaim-secret-contract"


def job_label(daemon: Any) -> str:
    """The label naming the token job (``job`` today, ``token_job`` after the rename)."""
    return str(daemon.metrics._labels[0])


async def statuses(daemon: Any, leak_guard: Any) -> dict[str, dict[str, Any]]:
    status, body = await get_json(daemon, "/v1/tokens", leak_guard)
    assert status == 200
    return {entry["job"]: entry for entry in body["jobs"]}


def run_check(tmp_path: Path, capsys: Any, jobs: list[dict[str, Any]]) -> tuple[int, str, str]:
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump({"jobs": jobs}))
    code = main(["check", "--config", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ DutyClaims


@pytest.fixture
def dutyclaims(make_emulator: Any, clock: ManualClock, leak_guard: Any) -> Any:
    leak_guard.secrets.update({DC_SECRET, CRED})
    return make_emulator(
        DutyClaimsEmulator,
        clients={"dc_client": DC_SECRET},
        granted_scopes={"dc_client": {"clients.read", "webhooks.read"}},
        managed_credentials={CRED},
        clock=clock,
        token_lifetime=3600,
    )


def sandbox_job(emu: Any, tmp_path: Path, name: str = "dc-sandbox", **provider: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": {"kind": "dutyclaims", "mode": "sandbox", "base_url": emu.url,
                     "client_id": "dc_client", "client_secret": DC_SECRET, **provider},
        "sinks": [{"kind": "file", "path": str(tmp_path / f"{name}.json"), "format": "json"}],
    }


def managed_job(emu: Any, tmp_path: Path, name: str = "dc-prod", **provider: Any) -> dict[str, Any]:
    cred = tmp_path / f"{name}.cred"
    if not cred.exists():
        cred.write_text(CRED + "\n")
    return {
        "name": name,
        "provider": {"kind": "dutyclaims", "mode": "managed", "base_url": emu.url,
                     "credential_file": str(cred), **provider},
        "sinks": [{"kind": "file", "path": str(tmp_path / f"{name}.header"), "format": "header"}],
    }


def test_dutyclaims_sandbox_on_the_contracts_host_is_accepted(tmp_path: Path, capsys: Any) -> None:
    """The DutyClaims contract: the sandbox token endpoint is https://api.dutyclaims.com/v1/oauth/token."""
    sandbox = {"kind": "dutyclaims", "mode": "sandbox", "client_id": "dc_client_id",
               "client_secret": "dc_client_secret"}
    sink = [{"kind": "file", "path": str(tmp_path / "t.json")}]
    code, out, err = run_check(tmp_path, capsys, [{"name": "dc", "provider": sandbox, "sinks": sink}])
    assert code == 0, err
    assert "provider dutyclaims https://api.dutyclaims.com" in out
    assert "deprecated" not in out

    # Existing configs with the old key still load; check says the key does nothing now.
    old = {**sandbox, "sandbox_on_production_host": True}
    code, out, err = run_check(tmp_path, capsys, [{"name": "dc", "provider": old, "sinks": sink}])
    assert code == 0, err
    assert "jobs[0].provider.sandbox_on_production_host (dc): deprecated and ignored" in out

    # A production managed credential is still refused as a sandbox client secret.
    live = {**sandbox, "client_secret": "dcp_live_abc"}
    code, _, err = run_check(tmp_path, capsys, [{"name": "dc", "provider": live, "sinks": sink}])
    assert code == 2 and "production managed credential (dcp_live_...)" in err


async def test_dutyclaims_environment_is_visible_in_status_metric_and_log(
    start_daemon: Any, dutyclaims: Any, oauth2_emulator: Any, tmp_path: Path, leak_guard: Any
) -> None:
    jobs = [
        sandbox_job(dutyclaims, tmp_path, sandbox_on_production_host=False),
        managed_job(dutyclaims, tmp_path),
        oauth2_job(oauth2_emulator, tmp_path),
    ]
    async with start_daemon({"jobs": jobs}) as daemon:
        await wait_for(lambda: all(r.token and r.refreshing is None for r in daemon.scheduler.jobs.values()))
        entries = await statuses(daemon, leak_guard)
        assert entries["dc-sandbox"]["environment"] == "sandbox"
        assert entries["dc-prod"]["environment"] == "production"
        assert entries["api"]["environment"] is None
        label = job_label(daemon)
        assert metric(daemon, "refresher_job_info", **{label: "dc-sandbox"}, environment="sandbox") == 1
        assert metric(daemon, "refresher_job_info", **{label: "dc-prod"}, environment="production") == 1
        assert metric(daemon, "refresher_job_info", **{label: "api"}, environment="") == 1
        # An info metric, not a label on every series.
        from prometheus_client import generate_latest

        text = generate_latest(daemon.metrics.registry).decode()
        assert [line for line in text.splitlines() if "environment=" in line and not line.startswith("refresher_job_info")] == []
    notes = leak_guard.events(
        "DutyClaims sandbox job: sandbox OAuth is no proof of production access "
        "(production uses managed credentials)"
    )
    assert [n["job"] for n in notes] == ["dc-sandbox"], "one start-up line per sandbox job"
    deprecated = [e for e in leak_guard.lines() if "sandbox_on_production_host is deprecated" in e["event"]]
    assert [d["job"] for d in deprecated] == ["dc-sandbox"] and deprecated[0]["level"] == "warning"


async def test_dutyclaims_managed_probe_is_the_documented_pair_every_interval(
    start_daemon: Any, dutyclaims: Any, clock: ManualClock, tmp_path: Path, leak_guard: Any
) -> None:
    async with start_daemon({"jobs": [managed_job(dutyclaims, tmp_path)]}) as daemon:
        rt = daemon.scheduler.jobs[("dc-prod", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        assert (tmp_path / "dc-prod.header").read_text() == f"Authorization: Bearer {CRED}\n"
        first = dutyclaims.requests[0]
        assert (first.method, first.path, first.query) == ("GET", "/v1/clients", "")
        assert first.headers["authorization"] == f"Bearer {CRED}" and "x-api-key" not in first.headers
        assert dutyclaims.count(dutyclaims.token_path) == 0
        # No expiry, but re-checked every probe_interval (15 min ± jitter).
        assert rt.token.expires_at is None
        assert 900 * 0.9 <= rt.next_refresh_at - clock.now() <= 900 * 1.1
        inode = (tmp_path / "dc-prod.header").stat().st_ino
        t0 = clock.now()
        await drive(clock, daemon.scheduler, lambda: dutyclaims.count("/v1/clients") >= 4, horizon=t0 + 4 * 990)
        assert clock.now() - t0 >= 3 * 900 * 0.9
        # An unchanged credential is neither re-written nor re-announced.
        assert (tmp_path / "dc-prod.header").stat().st_ino == inode
        assert len(leak_guard.events("token re-checked: unchanged")) == 3
        assert len(leak_guard.events("token refreshed")) == 1
        assert metric(daemon, "refresher_token_valid", **{job_label(daemon): "dc-prod"}) == 1


async def test_dutyclaims_revoked_managed_credential_turns_the_job_invalid_without_a_loop(
    start_daemon: Any, dutyclaims: Any, clock: ManualClock, tmp_path: Path, leak_guard: Any
) -> None:
    async with start_daemon({"jobs": [managed_job(dutyclaims, tmp_path)]}) as daemon:
        sched = daemon.scheduler
        rt = sched.jobs[("dc-prod", None)]
        label = job_label(daemon)
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        dutyclaims.revoke(CRED)
        await drive(clock, sched, lambda: rt.failures == 1, horizon=clock.now() + 1000)
        assert metric(daemon, "refresher_token_valid", **{label: "dc-prod"}) == 0
        assert metric(daemon, "refresher_refresh_failures_total", **{label: "dc-prod"}, reason="unauthorized") == 1
        entry = (await statuses(daemon, leak_guard))["dc-prod"]
        assert entry["valid"] is False and entry["last_error"] == "unauthorized"
        assert entry["last_error_status"] == 401
        status, body = await get_json(daemon, "/readyz")
        assert status == 503
        failed = leak_guard.events("refresh failed")[0]
        assert failed["level"] == "error" and "/v1/clients" in failed["error"]
        # "Honor 401 ... instead of retrying blindly": one probe per backoff.max.
        t0 = clock.now()
        await drive(clock, sched, lambda: clock.now() >= t0 + 3600, horizon=t0 + 4000)
        assert dutyclaims.count("/v1/clients", status=401) <= 1 + 3600 // 300 + 1
        # Restored (or rotated): the next probe makes the job valid and re-publishes.
        dutyclaims.revoked.clear()
        await settle(sched)
        assert rt.next_refresh_at - clock.now() <= 300
        await clock.set(rt.next_refresh_at)
        await wait_for(lambda: rt.failures == 0 and rt.refreshing is None)
        assert metric(daemon, "refresher_token_valid", **{label: "dc-prod"}) == 1
        assert rt.token.expires_at is None


async def test_dutyclaims_managed_probe_403_is_a_warning_and_stays_valid(
    make_emulator: Any, start_daemon: Any, clock: ManualClock, tmp_path: Path, leak_guard: Any
) -> None:
    leak_guard.secrets.add(CRED)
    emu = make_emulator(DutyClaimsEmulator, managed_credentials={CRED},
                        credential_scopes={CRED: {"webhooks.read"}}, clock=clock)
    async with start_daemon({"jobs": [managed_job(emu, tmp_path)]}) as daemon:
        rt = daemon.scheduler.jobs[("dc-prod", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        assert emu.count("/v1/clients", status=403) == 1
        assert rt.failures == 0 and rt.valid(clock.now())
        assert (tmp_path / "dc-prod.header").exists()
        entry = (await statuses(daemon, leak_guard))["dc-prod"]
        assert entry["state"] == "valid" and "HTTP 403" in entry["warning"]
        assert "missing scope" in entry["warning"]
        warned = leak_guard.events("token obtained with a warning")
        assert warned and warned[0]["level"] == "warning" and warned[0]["job"] == "dc-prod"
        assert metric(daemon, "refresher_refresh_failures_total", **{job_label(daemon): "dc-prod"}, reason="forbidden") == 0


async def test_dutyclaims_managed_probe_429_waits_retry_after(
    start_daemon: Any, dutyclaims: Any, clock: ManualClock, tmp_path: Path
) -> None:
    dutyclaims.inject(Fault.rate_limited("120"))
    async with start_daemon({"jobs": [managed_job(dutyclaims, tmp_path)]}) as daemon:
        rt = daemon.scheduler.jobs[("dc-prod", None)]
        await wait_for(lambda: rt.failures == 1 and rt.refreshing is None)
        assert rt.failure_reason == "rate_limited" and rt.backoff == 120
        t0 = clock.now()
        await drive(clock, daemon.scheduler, lambda: rt.token is not None, horizon=t0 + 200)
        retry = dutyclaims.requests[1]
        assert retry.at - dutyclaims.requests[0].at == pytest.approx(120, abs=1e-6)
        assert dutyclaims.count("/v1/clients") == 2


async def test_dutyclaims_probe_path_and_header_go_together(
    start_daemon: Any, dutyclaims: Any, tmp_path: Path, capsys: Any
) -> None:
    job = managed_job(dutyclaims, tmp_path, probe_path="/v1/claims/status?claimId=clm_123",
                      probe_header="x-api-key")
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("dc-prod", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
    probe = dutyclaims.requests[0]
    assert (probe.path, probe.query) == ("/v1/claims/status", "claimId=clm_123")
    assert probe.headers["x-api-key"] == CRED and "authorization" not in probe.headers

    def refused(**provider: Any) -> str:
        code, _, err = run_check(tmp_path, capsys, [managed_job(dutyclaims, tmp_path, **provider)])
        assert code == 2
        return err

    assert "set probe_path and probe_header together" in refused(probe_path="/v1/claims/status")
    assert "probe_path: must be a path on base_url" in refused(probe_path="https://evil.example/x", probe_header="authorization")
    assert "probe_path: must be a path on base_url" in refused(probe_path="/v1/clients x", probe_header="authorization")
    assert "probe_interval" in refused(probe_interval="0s")
    sandbox = sandbox_job(dutyclaims, tmp_path, probe=True)
    code, _, err = run_check(tmp_path, capsys, [sandbox])
    assert code == 2 and "probe* is for mode managed" in err


async def test_dutyclaims_probe_false_publishes_without_calling(
    start_daemon: Any, dutyclaims: Any, tmp_path: Path
) -> None:
    async with start_daemon({"jobs": [managed_job(dutyclaims, tmp_path, probe=False)]}) as daemon:
        rt = daemon.scheduler.jobs[("dc-prod", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        assert dutyclaims.count() == 0 and rt.next_refresh_at == math.inf


def test_tokens_without_expiry_are_rechecked_at_recheck_at_with_jitter() -> None:
    import random

    from refresher.config import RefreshConfig
    from refresher.policy import refresh_time
    from refresher.token import Token

    rng, policy = random.Random(1), RefreshConfig()
    blind = Token(value="dcp_live_x", token_type="Bearer", obtained_at=1000.0, expires_at=None)
    assert refresh_time(blind, policy, rng) == math.inf
    probed = Token(value="dcp_live_x", token_type="Bearer", obtained_at=1000.0, expires_at=None,
                   recheck_at=1900.0)
    moments = [refresh_time(probed, policy, rng) for _ in range(200)]
    assert min(moments) >= 1000 + 900 * 0.9 and max(moments) <= 1000 + 900 * 1.1
    assert max(moments) - min(moments) > 100, "spread, so many jobs never probe together"


# ------------------------------------------------------------------ scopes


@pytest.mark.parametrize(
    ("wanted", "granted", "requested", "missing"),
    [
        (["a", "b"], "a b", True, ()),
        (["a", "b"], "b", True, ("a",)),
        (["a", "b"], None, True, ()),  # RFC 6749 §5.1: absent = as requested
        (["a", "b"], None, False, ("a", "b")),  # expected, nothing requested: absent = none
        (["a"], "", True, ("a",)),
        (["a"], "A", True, ("a",)),  # scope tokens are case-sensitive
        ([], "x", True, ()),
    ],
)
def test_missing_scopes_rule(wanted: list[str], granted: str | None, requested: bool, missing: tuple[str, ...]) -> None:
    assert missing_scopes(wanted, granted, absent_means_granted=requested) == missing


async def test_dutyclaims_scope_shortfall_is_a_warning_status_and_gauge(
    start_daemon: Any, dutyclaims: Any, tmp_path: Path, leak_guard: Any
) -> None:
    dutyclaims.narrow_scopes = True
    job = sandbox_job(dutyclaims, tmp_path, scopes=["clients.read", "partner.read", "webhooks.read"])
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("dc-sandbox", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        assert json.loads((tmp_path / "dc-sandbox.json").read_text())["scope"] == "clients.read webhooks.read"
        entry = (await statuses(daemon, leak_guard))["dc-sandbox"]
        assert entry["scope_missing"] == ["partner.read"] and entry["valid"] is True
        assert metric(daemon, "refresher_scope_missing", **{job_label(daemon): "dc-sandbox"}) == 1
        warned = leak_guard.events("grant lacks requested scopes")
        assert warned[0]["missing"] == ["partner.read"] and warned[0]["level"] == "warning"


async def test_dutyclaims_require_scopes_fails_and_writes_nothing(
    start_daemon: Any, dutyclaims: Any, tmp_path: Path
) -> None:
    dutyclaims.narrow_scopes = True
    job = sandbox_job(dutyclaims, tmp_path, scopes=["clients.read", "partner.read"], require_scopes=True)
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("dc-sandbox", None)]
        await wait_for(lambda: rt.failures == 1 and rt.refreshing is None)
        assert rt.failure_reason == "scope_missing" and "partner.read" in rt.failure_message
        assert not (tmp_path / "dc-sandbox.json").exists()
        assert rt.backoff == 300, "a capability problem: no tight retry"
        assert metric(daemon, "refresher_refresh_failures_total", **{job_label(daemon): "dc-sandbox"}, reason="scope_missing") == 1


async def test_absent_scope_means_granted_as_requested(
    start_daemon: Any, dutyclaims: Any, tmp_path: Path, leak_guard: Any
) -> None:
    dutyclaims.omit_scope = True
    job = sandbox_job(dutyclaims, tmp_path, scopes=["clients.read"], require_scopes=True)
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("dc-sandbox", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        assert (await statuses(daemon, leak_guard))["dc-sandbox"]["scope_missing"] == []
        assert metric(daemon, "refresher_scope_missing", **{job_label(daemon): "dc-sandbox"}) == 0


async def test_oauth2_scope_shortfall_uses_the_same_rule(
    start_daemon: Any, oauth2_emulator: Any, tmp_path: Path, leak_guard: Any
) -> None:
    oauth2_emulator.inject(Fault.body_json({"access_token": "opaque-token-1", "expires_in": 3600, "scope": "read"}))
    job = oauth2_job(oauth2_emulator, tmp_path)
    job["provider"]["scopes"] = ["read", "write"]
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        assert (await statuses(daemon, leak_guard))["api"]["scope_missing"] == ["write"]
    oauth2_emulator.inject(Fault.body_json({"access_token": "opaque-token-2", "expires_in": 3600, "scope": "read"}))
    job["provider"]["require_scopes"] = True
    (tmp_path / "api.token").unlink()
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.failures == 1)
        assert rt.failure_reason == "scope_missing" and not (tmp_path / "api.token").exists()


def test_scope_config_is_checked(tmp_path: Path, capsys: Any) -> None:
    sink = [{"kind": "file", "path": str(tmp_path / "t")}]
    base = {"kind": "oauth2", "token_url": "https://auth.example/token", "client_id": "c", "client_secret": "s"}
    cases = [
        ({**base, "require_scopes": True}, "require_scopes needs scopes"),
        ({**base, "scopes": ["read write"]}, "is not a scope token"),
        ({**base, "scopes": ["read", "read"]}, "duplicate scope(s) 'read'"),
        ({"kind": "gooclaim", "client_id": "c", "client_secret": "s", "require_scopes": True}, "require_scopes needs expected_scopes"),
        ({"kind": "dutyclaims", "mode": "managed", "credential": "dcp_live_x", "require_scopes": True}, "are for mode sandbox"),
    ]
    for provider, message in cases:
        code, _, err = run_check(tmp_path, capsys, [{"name": "j", "provider": provider, "sinks": sink}])
        assert code == 2 and message in err, (provider, err)


# ------------------------------------------------------------------ Gooclaim


@pytest.fixture
def gooclaim(make_emulator: Any, clock: ManualClock, leak_guard: Any) -> Any:
    leak_guard.secrets.add(GOO_SECRET)
    return make_emulator(GooclaimEmulator, clients={"goo-client": GOO_SECRET},
                         tenants={"goo-client": "tn_42"}, clock=clock)


def goo_job(emu: Any, tmp_path: Path, name: str = "gooclaim", *, key: bool = True, **provider: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"kind": "gooclaim", "base_url": emu.url, "client_id": "goo-client",
                         "client_secret": GOO_SECRET, "issuer": emu.issuer, **provider}
    if key:
        pem = tmp_path / "gooclaim.pem"
        if not pem.exists():
            pem.write_bytes(emu.public_key_pem())
        p["public_key_file"] = str(pem)
    return {"name": name, "provider": p, "sinks": [{"kind": "file", "path": str(tmp_path / f"{name}.token")}]}


async def rejected(daemon: Any, name: str = "gooclaim") -> Any:
    rt = daemon.scheduler.jobs[(name, None)]
    await wait_for(lambda: rt.failures >= 1 and rt.refreshing is None)
    assert rt.failure_reason == "bad_response", rt.failure_message
    return rt


@pytest.mark.parametrize("alg", ["HS256", "none", "RS512"])
@pytest.mark.parametrize("key", [True, False], ids=["with-key", "without-key"])
async def test_gooclaim_header_alg_must_be_rs256_even_without_a_key(
    start_daemon: Any, gooclaim: Any, tmp_path: Path, alg: str, key: bool
) -> None:
    gooclaim.alg = alg  # HS256: HMAC keyed with the public PEM, the classic forgery
    async with start_daemon({"jobs": [goo_job(gooclaim, tmp_path, key=key)]}) as daemon:
        rt = await rejected(daemon)
        assert f"header alg {alg!r} is not allowed (want RS256)" in rt.failure_message
    assert not (tmp_path / "gooclaim.token").exists()


async def test_gooclaim_tenant_id_checked_without_introspection(
    start_daemon: Any, gooclaim: Any, tmp_path: Path
) -> None:
    async with start_daemon({"jobs": [goo_job(gooclaim, tmp_path, tenant_id="tn_other")]}) as daemon:
        rt = await rejected(daemon)
        assert "tenant_id 'tn_42' != 'tn_other'" in rt.failure_message
    assert gooclaim.count(GooclaimEmulator.introspect_path) == 0
    assert not (tmp_path / "gooclaim.token").exists()


async def test_gooclaim_sub_must_be_the_client_id(start_daemon: Any, gooclaim: Any, tmp_path: Path) -> None:
    gooclaim.sub = "user_1234"  # a human token
    async with start_daemon({"jobs": [goo_job(gooclaim, tmp_path, key=False)]}) as daemon:
        rt = await rejected(daemon)
        assert "sub 'user_1234' is not the client_id 'goo-client'" in rt.failure_message


async def test_gooclaim_iss_checked_whenever_configured_even_unverified(
    start_daemon: Any, gooclaim: Any, tmp_path: Path
) -> None:
    gooclaim.wrong_issuer = True
    async with start_daemon({"jobs": [goo_job(gooclaim, tmp_path, key=False)]}) as daemon:
        rt = await rejected(daemon)
        assert "wrong issuer" in rt.failure_message


def test_check_says_plainly_when_signatures_are_not_verified(tmp_path: Path, capsys: Any) -> None:
    provider = {"kind": "gooclaim", "client_id": "c", "client_secret": "s", "issuer": "https://iss.example"}
    sink = [{"kind": "file", "path": str(tmp_path / "g.token")}]
    code, out, _ = run_check(tmp_path, capsys, [{"name": "g", "provider": provider, "sinks": sink}])
    assert code == 0
    assert ("warning: jobs[0].provider (g): token signatures are NOT verified (no public_key_file "
            "or jwks_url); only alg, aud, exp, sub, iss are checked") in out
    provider["jwks_url"] = "https://iss.example/jwks.json"
    code, out, _ = run_check(tmp_path, capsys, [{"name": "g", "provider": provider, "sinks": sink}])
    assert code == 0 and "NOT verified" not in out


async def test_gooclaim_introspection_active_false_rejects(
    start_daemon: Any, gooclaim: Any, tmp_path: Path
) -> None:
    gooclaim.revoke_on_issue = True
    async with start_daemon({"jobs": [goo_job(gooclaim, tmp_path, introspect=True)]}) as daemon:
        rt = await rejected(daemon)
        assert "introspection says the token is not active" in rt.failure_message
    assert gooclaim.count(GooclaimEmulator.introspect_path, status=200) == 1
    assert not (tmp_path / "gooclaim.token").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"exp": 1}, "introspection exp 1 is not the token's"),
        ({"scope": "workflow:read admin:write"}, "introspection scope"),
        ({"scope": None}, "introspection scope None"),
        ({"tenant_id": "tn_other"}, "introspection tenant_id 'tn_other'"),
        ({"active": "true"}, "not active"),
    ],
)
async def test_gooclaim_introspection_must_describe_the_token(
    start_daemon: Any, gooclaim: Any, tmp_path: Path, override: dict[str, Any], message: str
) -> None:
    gooclaim.introspect_overrides = override
    async with start_daemon({"jobs": [goo_job(gooclaim, tmp_path, introspect=True)]}) as daemon:
        rt = await rejected(daemon)
        assert message in rt.failure_message


async def next_sleeper(clock: ManualClock, within: float = 100) -> float:
    """The deadline of the task sleeping on the clock next, once one sleeps less than
    `within` seconds ahead (the scheduler's own timer sleeps until the next refresh)."""
    with anyio.fail_after(5):
        while (deadline := clock.next_deadline()) is None or deadline > clock.now() + within:
            await anyio.sleep(0.002)
    return deadline


async def test_gooclaim_introspection_budget_is_shared_per_client_id(
    start_daemon: Any, gooclaim: Any, clock: ManualClock, tmp_path: Path
) -> None:
    jobs = [goo_job(gooclaim, tmp_path, name=n, introspect=True, introspect_requests_per_minute=1) for n in ("g1", "g2")]
    async with start_daemon({"jobs": jobs}) as daemon:
        runtimes = list(daemon.scheduler.jobs.values())
        path = GooclaimEmulator.introspect_path
        await wait_for(lambda: gooclaim.count(path) == 1 and gooclaim.count(GooclaimEmulator.token_path) == 2)
        # The second job's introspection waits for the shared window, not for a 429.
        await clock.set(await next_sleeper(clock))
        await wait_for(lambda: all(r.token is not None and r.refreshing is None for r in runtimes))
    times = [r.at for r in gooclaim.requests if r.path == path]
    assert len(times) == 2 and times[1] - times[0] >= 60
    assert gooclaim.count(status=429) == 0


async def test_gooclaim_introspection_429_waits_and_keeps_the_minted_token(
    make_emulator: Any, start_daemon: Any, clock: ManualClock, tmp_path: Path, leak_guard: Any
) -> None:
    leak_guard.secrets.add(GOO_SECRET)
    emu = make_emulator(GooclaimEmulator, clients={"goo-client": GOO_SECRET}, tenants={"goo-client": "tn_42"},
                        introspect_limit=1, clock=clock)
    jobs = [goo_job(emu, tmp_path, name=n, introspect=True) for n in ("g1", "g2")]
    jobs.append(goo_job(emu, tmp_path, name="plain"))  # same client id, no introspection
    async with start_daemon({"jobs": jobs}) as daemon:
        sched = daemon.scheduler
        token_path, path = GooclaimEmulator.token_path, GooclaimEmulator.introspect_path
        plain = sched.jobs[("plain", None)]
        await wait_for(
            lambda: emu.count(path, status=429) == 1
            and sum(r.token is not None for r in sched.jobs.values()) == 2
            and plain.refreshing is None
        )
        waiting = next(r for r in sched.jobs.values() if r.token is None)
        assert waiting.refreshing is not None and waiting.failures == 0
        # The token budget is not paused: a job on the same client id mints right away.
        with anyio.fail_after(5):
            await sched.feedback.force("plain")
        assert emu.count(token_path) == 4
        # Retry-After (60 s) later the same token is introspected again and written.
        deadline = await next_sleeper(clock)
        limited = next(r for r in emu.requests if r.status == 429)
        assert deadline - limited.at == pytest.approx(60, abs=1e-6)
        await clock.set(deadline)
        await wait_for(lambda: waiting.token is not None and waiting.refreshing is None)
        assert emu.count(path, status=200) == 2
        assert emu.count(token_path) == 4, "the minted token was kept, not re-minted"
        assert waiting.failures == 0
        written = (tmp_path / f"{waiting.job}.token").read_text().strip()
        assert written == waiting.token.value


async def test_gooclaim_public_key_file_rotation_retries_at_once(
    start_daemon: Any, gooclaim: Any, tmp_path: Path
) -> None:
    """A new signing key: tokens fail verification until the key file is updated; the
    watched file then retries at once (not after the 5-minute backoff)."""
    config = {"jobs": [goo_job(gooclaim, tmp_path)], "refresh": {"backoff": {"initial": "5m", "max": "5m"}}}
    async with start_daemon(config, clock=SystemClock()) as daemon:
        sched = daemon.scheduler
        rt = sched.jobs[("gooclaim", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        await wait_for(lambda: daemon.watcher.ready.is_set())
        first = rt.token
        gooclaim.rotate_key(keep_old=False)
        sched.reschedule_now(("gooclaim", None))
        await wait_for(lambda: rt.failures == 1 and rt.refreshing is None)
        assert "signature does not verify" in rt.failure_message
        assert rt.next_refresh_at - SystemClock().now() > 20
        (tmp_path / "gooclaim.pem").write_bytes(gooclaim.public_key_pem())
        await wait_for(lambda: rt.failures == 0 and rt.token is not first, timeout=10)
        assert gooclaim.count(GooclaimEmulator.token_path) == 3


async def test_gooclaim_jwks_refetched_for_unknown_kid_at_most_every_30s(
    start_daemon: Any, gooclaim: Any, clock: ManualClock, tmp_path: Path
) -> None:
    job = goo_job(gooclaim, tmp_path, key=False, jwks_url=gooclaim.url + GooclaimEmulator.jwks_path)
    jwks = GooclaimEmulator.jwks_path
    async with start_daemon({"jobs": [job]}) as daemon:
        sched = daemon.scheduler
        rt = sched.jobs[("gooclaim", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        assert gooclaim.count(jwks) == 1
        # Rotation announced in the JWKS: the unknown kid re-fetches it once, and verifies.
        gooclaim.rotate_key(keep_old=True)
        await clock.advance(30)
        sched.reschedule_now(("gooclaim", None))
        await wait_for(lambda: gooclaim.count(GooclaimEmulator.token_path) == 2 and rt.refreshing is None)
        assert rt.failures == 0 and gooclaim.count(jwks) == 2
        # A kid the JWKS does not (yet) hold: no re-fetch storm.
        gooclaim.jwks_lag = True
        gooclaim.rotate_key(keep_old=True)
        t0 = clock.now()
        await clock.advance(31)
        sched.reschedule_now(("gooclaim", None))
        await wait_for(lambda: rt.failures == 1 and rt.refreshing is None)
        assert gooclaim.count(jwks) == 3 and "is not in the JWKS" in rt.failure_message
        await drive(clock, sched, lambda: rt.failures >= 3, horizon=t0 + 31 + 29)
        assert gooclaim.count(jwks) == 3, "re-fetched at most every 30 s"
        assert "re-fetched at most every 30s" in rt.failure_message
        # Once the JWKS lists the key and 30 s have passed, one re-fetch verifies it.
        gooclaim.jwks_lag = False
        await settle(sched)
        await clock.set(t0 + 31 + 30)
        sched.reschedule_now(("gooclaim", None))
        await wait_for(lambda: rt.failures == 0 and rt.refreshing is None)
        assert gooclaim.count(jwks) == 4


# ------------------------------------------------------------------ the contract table


def test_contract_table_names_only_tests_and_code_that_exist() -> None:
    """docs/contracts.md: every test it cites is defined, every `module.name` it cites
    resolves, and every rule row of the three contracts is there (D1.., B1.., G1..)."""
    import importlib
    import re

    root = Path(__file__).resolve().parent.parent
    table = (root / "docs" / "contracts.md").read_text()
    defined = {
        match
        for path in (root / "tests").rglob("test_*.py")
        for match in re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M)
    }
    cited = set(re.findall(r"`(test_\w+)", table))
    assert cited and cited <= defined, sorted(cited - defined)
    unresolved = []
    for ref in set(re.findall(r"`((?:providers/)?[a-z_]+)\.([A-Za-z_][\w.]*)`", table)):
        module_name, attribute = ref[0].replace("/", "."), ref[1]
        try:
            target: Any = importlib.import_module(f"refresher.{module_name}")
        except ModuleNotFoundError:
            continue  # e.g. `base_url`-like prose, not a module
        for part in attribute.split("."):
            target = getattr(target, part, None)
        if target is None:
            unresolved.append(".".join(ref))
    # `Class.attr`: a class of some refresher module.
    import pkgutil

    import refresher

    classes: dict[str, Any] = {}
    for info in pkgutil.walk_packages(refresher.__path__, "refresher."):
        module = importlib.import_module(info.name)
        classes.update({k: v for k, v in vars(module).items() if isinstance(v, type)})
    for name, attribute in set(re.findall(r"`([A-Z]\w+)\.(\w+)`", table)):
        if not hasattr(classes.get(name), attribute) and attribute not in getattr(
            classes.get(name), "__dataclass_fields__", {}
        ):
            unresolved.append(f"{name}.{attribute}")
    assert unresolved == []
    rows = re.findall(r"^\| ([DBG]\d+) \|", table, re.M)
    for prefix, count in (("D", 13), ("B", 11), ("G", 14)):
        assert [r for r in rows if r[0] == prefix] == [f"{prefix}{i}" for i in range(1, count + 1)]
