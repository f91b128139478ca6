"""Hostile inputs against bundles and templates: a tenant id, a token or a partner's
metadata that would break the file's format is refused, never written; what is
written reads back exactly, and a shell sourcing a bundle runs nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from dotenv import dotenv_values

from refresher.config import load_settings
from refresher.demo.base import Fault
from refresher.errors import ConfigError
from refresher.sinks.bundle import parse
from refresher.targets import expand_name
from tests.conftest import DEB_KEY, deb_job, metric, oauth2_job, wait_for
from tests.hostile.conftest import alive

pytestmark = pytest.mark.anyio

#: Tenant ids that would break an env file, a shell, a dotenv parser or JSON if written raw.
HOSTILE_TENANTS = [
    'x"; touch PWNED; "',
    "$(touch PWNED)",
    "`touch PWNED`",
    "a b",
    "ü-1",
    "#c",
    "O'Brien",
    "back\\slash",
    "=1",
    '{"json": 1}',
]


def sourced(path: Path, cwd: Path) -> dict[str, str]:
    out = subprocess.run(
        ["sh", "-c", 'set -a; . "$1"; env -0', "sh", str(path)],
        capture_output=True,
        check=True,
        cwd=cwd,
    )
    pairs = (item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
    return {k: v for k, v in pairs if k.startswith("DEBITURA_")}


def settled(daemon: Any) -> bool:
    jobs = daemon.scheduler.jobs.values()
    return all(r.token and r.refreshing is None and not r.unwritten for r in jobs)


@pytest.mark.parametrize("fmt", ["env", "dotenv", "json"])
async def test_tenant_ids_cannot_break_a_bundle(start_daemon, debitura, tmp_path, fmt) -> None:
    path = tmp_path / f"tokens.{fmt}"
    job = deb_job(debitura, tmp_path, HOSTILE_TENANTS)
    job["sinks"] = [{"kind": "bundle", "path": str(path), "format": fmt}]
    async with start_daemon({"jobs": [job]}) as daemon:
        await wait_for(lambda: settled(daemon))
        tokens = {k[1]: r.token.value for k, r in daemon.scheduler.jobs.items()}
        assert alive(daemon)
    held = parse(path.read_bytes(), fmt)
    assert {owner[1]: e.token.value for owner, e in held.items() if e.token} == tokens
    if fmt == "json":
        document = json.loads(path.read_text())
        assert {k: v["value"] for k, v in document.items()} == {
            f"debitura/{t}": v for t, v in tokens.items()
        }
        return
    expected = {expand_name(None, job="debitura", tenant=t): v for t, v in tokens.items()}
    assert len(expected) == len(HOSTILE_TENANTS)
    assert sourced(path, tmp_path) == expected
    assert not (tmp_path / "PWNED").exists(), "sourcing the bundle ran a command"
    assert dotenv_values(path) == expected


@pytest.mark.parametrize(
    "value",
    ["tok\nEVIL=1", 'tok"quote', "tok$(touch PWNED)", "tok value", "tok'x", "tok;x", "~tok"],
)
async def test_a_token_that_would_break_the_format_is_refused_not_written(
    start_daemon, oauth2_emulator, tmp_path, value
) -> None:
    template = tmp_path / "auth.tmpl"
    template.write_text('Authorization: "${token_type} ${value}"\n')
    api = oauth2_job(oauth2_emulator, tmp_path)
    api["sinks"] = [
        {"kind": "bundle", "path": str(tmp_path / "tokens.env")},
        {"kind": "bundle", "path": str(tmp_path / "tokens.json"), "format": "json"},
        {"kind": "template", "template": str(template), "path": str(tmp_path / "auth.conf")},
    ]
    outputs = ["tokens.env", "tokens.json", "auth.conf"]
    async with start_daemon({"jobs": [api]}) as daemon:
        runtime = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: settled(daemon))
        before = {name: (tmp_path / name).read_bytes() for name in outputs}
        hostile = {"access_token": value, "token_type": "Bearer", "expires_in": 3600}
        oauth2_emulator.inject(Fault.body_json(hostile))
        await daemon.scheduler.feedback.force("api")
        assert runtime.failure_reason == "bad_response"
        assert {name: (tmp_path / name).read_bytes() for name in outputs} == before
        assert alive(daemon)
    assert not (tmp_path / "PWNED").exists()


async def test_a_tenant_a_template_cannot_insert_is_refused_and_the_others_rendered(
    start_daemon, debitura, tmp_path
) -> None:
    template, tenants = tmp_path / "t.tmpl", tmp_path / "tenants.txt"
    template.write_text('{"tenant": "${tenant}", "token": ${value_json}}\n')
    tenants.write_text('good\nbad"quote\na b\n')
    job = deb_job(debitura, tmp_path, tenants_file=str(tenants))
    job["sinks"] = [
        {"kind": "template", "template": str(template), "path": str(tmp_path / "{tenant}.json")}
    ]
    async with start_daemon({"jobs": [job]}) as daemon:
        await wait_for(lambda: settled(daemon) and len(daemon.scheduler.jobs) == 1)
        assert metric(daemon, "refresher_tenants_rejected", token_job="debitura") == 2
        good = daemon.scheduler.jobs[("debitura", "good")].token.value
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["good.json"]
    assert json.loads((tmp_path / "good.json").read_text()) == {"tenant": "good", "token": good}
    # Known from the config itself, the same tenant is a config error naming it.
    static = deb_job(debitura, tmp_path, ["good", 'bad"quote'])
    static["sinks"] = job["sinks"]
    with pytest.raises(ConfigError, match=r"tenant 'bad\"quote' cannot be inserted by template"):
        load_settings(data={"jobs": [static]})


async def test_partner_metadata_a_template_cannot_insert_is_refused_not_written(
    start_daemon, debitura, tmp_path
) -> None:
    template = tmp_path / "t.tmpl"
    template.write_text("creditor=${metadata.creditorId} token=${value}\n")
    job = deb_job(debitura, tmp_path, ["t-1"])
    job["sinks"] = [
        {"kind": "template", "template": str(template), "path": str(tmp_path / "{tenant}.conf")}
    ]
    async with start_daemon({"jobs": [job]}) as daemon:
        runtime = daemon.scheduler.jobs[("debitura", "t-1")]
        await wait_for(lambda: settled(daemon))
        before = (tmp_path / "t-1.conf").read_bytes()
        token = debitura.sign_hs256({"sub": "t-1", "exp": 1_800_009_000, "iat": 1_800_000_000})
        debitura.inject(
            Fault.body_json(
                {
                    "accessToken": token,
                    "tokenType": "Bearer",
                    "expiresIn": 1800,
                    "externalTenantId": "t-1",
                    "creditorId": 'c"\ninjected=1',
                }
            )
        )
        await daemon.scheduler.feedback.force("debitura", "t-1")
        assert runtime.failure_reason == "sink" and "metadata.creditorId" in runtime.failure_message
        assert (tmp_path / "t-1.conf").read_bytes() == before
        assert metric(daemon, "refresher_template_errors_total", template=str(template)) == 1
    assert DEB_KEY.encode() not in before
