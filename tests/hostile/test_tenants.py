"""Hostile tenant ids: a tenant id is the partner's own and
travels on the wire unchanged, but never chooses where a token lands, never
crashes the daemon, and never takes another tenant's Secret key."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from refresher.cli import main
from refresher.clock import SystemClock
from refresher.config import load_settings
from refresher.errors import ConfigError
from refresher.targets import path_segment
from tests.conftest import deb_job, metric, wait_for
from tests.hostile.conftest import NS, alive, kubeconfig

pytestmark = pytest.mark.anyio

HOSTILE = ["../../escaped", "../victim.txt", "a/b", ".", "..", ".hidden", "x y", "café", "50%"]


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


async def test_tenant_ids_never_leave_the_sink_directory(start_daemon, debitura, tmp_path) -> None:
    sinks = tmp_path / "deep" / "sinks"
    sinks.mkdir(parents=True)
    (tmp_path / "victim.txt").write_text("precious")
    (tmp_path / "deep" / "victim.txt").write_text("precious")
    job = deb_job(debitura, sinks, HOSTILE)
    config = {"jobs": [job]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    before = {k: v for k, v in tree(tmp_path).items() if not k.startswith("deep/sinks")}
    assert main(["check", "--config", str(tmp_path / "config.yaml")]) == 0
    async with start_daemon(config) as daemon:
        runtimes = daemon.scheduler.jobs.values()
        await wait_for(lambda: all(r.token and r.refreshing is None for r in runtimes))
        assert alive(daemon)
    # The partner saw each id exactly as configured ...
    assert sorted(r.client for r in debitura.requests) == sorted(HOSTILE)
    # ... and every token landed inside the sink directory, one file per tenant.
    assert sorted(p.name for p in sinks.iterdir()) == sorted(
        f"{path_segment(t)}.json" for t in HOSTILE
    )
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("deep/sinks")} == before


async def test_tenants_file_line_cannot_overwrite_or_delete_outside(
    start_daemon, debitura, tmp_path
) -> None:
    sinks = tmp_path / "sinks"
    sinks.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    tenants = tmp_path / "tenants.txt"
    tenants.write_text("good\n")
    job = deb_job(debitura, sinks, tenants_file=str(tenants))
    job["sinks"] = [{"kind": "file", "path": str(sinks / "{tenant}")}]
    async with start_daemon({"jobs": [job]}, clock=SystemClock()) as daemon:
        jobs = daemon.scheduler.jobs
        await wait_for(lambda: (sinks / "good").exists())
        await wait_for(lambda: daemon.watcher.ready.is_set())
        tenants.write_text("good\n../victim.txt\n")
        encoded = sinks / path_segment("../victim.txt")
        await wait_for(lambda: encoded.exists(), what="the hostile tenant's token, inside sinks/")
        assert victim.read_text() == "precious"
        tenants.write_text("good\n")
        await wait_for(lambda: ("debitura", "../victim.txt") not in jobs and not encoded.exists())
        assert victim.read_text() == "precious" and (sinks / "good").exists()
        assert alive(daemon)


@pytest.mark.parametrize(
    ("tenant", "problem"),
    [
        ("a\nb", "control character"),
        ("a\x00b", "control character"),
        ("tab\there", "control character"),
        ("lone\ud800", "surrogate"),
        (" padded", "whitespace"),
        ("x" * 201, "longer than 200"),
    ],
)
def test_bad_tenant_in_config_is_a_config_error_naming_it(tmp_path, tenant, problem) -> None:
    job = {
        "name": "deb",
        "provider": {"kind": "debitura", "api_key": "k" * 8, "tenants": ["ok", tenant]},
        "sinks": [{"kind": "file", "path": str(tmp_path / "{tenant}")}],
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(data={"jobs": [job]})
    assert any(e.startswith("jobs[0].provider.tenants[1]") and problem in e for e in caught.value.errors)


def test_non_utf8_config_file_is_refused_with_exit_2(tmp_path, capsys) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(
        b"jobs:\n- name: deb\n  provider: {kind: debitura, api_key: kkkkkkkk, tenants: [caf\xe9]}\n"
        b"  sinks: [{kind: file, path: '/tmp/{tenant}'}]\n"
    )
    assert main(["check", "--config", str(config)]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


async def test_bad_tenants_file_lines_are_skipped_and_the_rest_keep_working(
    start_daemon, debitura, tmp_path, leak_guard
) -> None:
    tenants = tmp_path / "tenants.txt"
    tenants.write_text("t-1\nt-2\n")
    job = deb_job(debitura, tmp_path, tenants_file=str(tenants))
    async with start_daemon({"jobs": [job]}, clock=SystemClock()) as daemon:
        jobs = daemon.scheduler.jobs
        await wait_for(lambda: len(jobs) == 2 and all(r.token for r in jobs.values()))
        await wait_for(lambda: daemon.watcher.ready.is_set())
        tenants.write_bytes(b"t-1\nt-2\nnul\x00byte\ncaf\xe9\nt-3\nform\x0cfeed\n")
        await wait_for(lambda: ("debitura", "t-3") in jobs and jobs[("debitura", "t-3")].token)
        await wait_for(lambda: metric(daemon, "refresher_tenants_rejected", token_job="debitura") == 3)
        assert sorted(t for _, t in jobs) == ["t-1", "t-2", "t-3"]
        refused = leak_guard.events("tenant refused: its other tenants keep working")
        reasons = " ".join(e["reason"] for e in refused)
        assert "line 3" in reasons and "line 4: not valid UTF-8" in reasons and "line 6" in reasons
        assert alive(daemon)
        # Fixing the file clears the gauge.
        tenants.write_text("t-1\nt-2\nt-3\n")
        await wait_for(lambda: metric(daemon, "refresher_tenants_rejected", token_job="debitura") == 0)


def kube_job(debitura: Any, config: Path, **provider: Any) -> dict[str, Any]:
    job = deb_job(debitura, Path("/unused"), **provider)
    job["sinks"] = [
        {
            "kind": "kubernetes",
            "namespace": NS,
            "secret": "debitura",
            "kubeconfig": str(config),
            "extra_keys": ["expires_at"],
        }
    ]
    return job


def test_tenant_that_cannot_be_a_secret_key_fails_check(debitura, kube, tmp_path, capsys) -> None:
    job = kube_job(debitura, kubeconfig(kube, tmp_path), tenants=["ok", "x/y"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"jobs": [job]}))
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "jobs[0].sinks[0]: Secret key 'x/y'" in err and "may only contain" in err


def test_secret_key_collision_in_config_names_both_tenants(debitura, kube, tmp_path) -> None:
    job = kube_job(debitura, kubeconfig(kube, tmp_path), tenants=["a", "a.expires_at"])
    with pytest.raises(ConfigError) as caught:
        load_settings(data={"jobs": [job]})
    message = " ".join(caught.value.errors)
    assert "tenant 'a.expires_at'" in message and "tenant 'a'" in message
    assert "secret/apps/debitura#a.expires_at" in message


async def test_runtime_secret_key_problems_skip_only_that_tenant(
    start_daemon, debitura, kube, tmp_path
) -> None:
    tenants = tmp_path / "tenants.txt"
    tenants.write_text("a\n")
    config = tmp_path / "config.yaml"
    job = kube_job(debitura, kubeconfig(kube, tmp_path), tenants_file=str(tenants))
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, "jobs": [job]}))
    async with start_daemon({"jobs": [job]}, clock=SystemClock(), config_path=config) as daemon:
        jobs = daemon.scheduler.jobs
        await wait_for(lambda: ("debitura", "a") in jobs and jobs[("debitura", "a")].token)
        await wait_for(lambda: daemon.watcher.ready.is_set())
        first = jobs[("debitura", "a")].token
        # A tenant that is not a valid key, and one whose key is a's companion key.
        tenants.write_text("a\nx/y\na.expires_at\nb\n")
        await wait_for(lambda: ("debitura", "b") in jobs and jobs[("debitura", "b")].last_success_at)
        await wait_for(lambda: metric(daemon, "refresher_tenants_rejected", token_job="debitura") == 2)
        assert sorted(t for _, t in jobs) == ["a", "b"]
        data = kube.secret(NS, "debitura")["data"]
        assert base64.b64decode(data["a"]).decode() == first.value
        assert set(data) == {"a", "a.expires_at", "b", "b.expires_at"}
        # SIGHUP with a config naming the bad tenant directly: rejected, nothing changes.
        bad = kube_job(debitura, Path(job["sinks"][0]["kubeconfig"]), tenants=["a", "x/y"])
        config.write_text(yaml.safe_dump({"jobs": [bad]}))
        assert await daemon.reload() is False
        assert metric(daemon, "refresher_config_reload_failures_total") == 1
        assert sorted(t for _, t in jobs) == ["a", "b"]
        await anyio.sleep(0)
        assert alive(daemon)


def test_path_length_and_escape_rules(tmp_path) -> None:
    job = {
        "name": "deb",
        "provider": {"kind": "debitura", "api_key": "k" * 8, "tenants": ["é" * 100]},
        "sinks": [{"kind": "file", "path": str(tmp_path / "{tenant}.json")}],
    }
    with pytest.raises(ConfigError, match="longer than 255 bytes"):
        load_settings(data={"jobs": [job]})
    job["provider"]["tenants"] = ["ok"]
    job["sinks"] = [{"kind": "file", "path": str(tmp_path / "{tenant}" / "{bogus}")}]
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \{bogus\}"):
        load_settings(data={"jobs": [job]})
    # A single-token job has no tenant to put in a path.
    single = {
        "name": "api",
        "provider": {"kind": "gooclaim", "client_id": "c", "client_secret": "s" * 8},
        "sinks": [{"kind": "file", "path": str(tmp_path / "{tenant}.token")}],
    }
    with pytest.raises(ConfigError, match="has no tenants"):
        load_settings(data={"jobs": [single]})
    assert os.listdir(tmp_path) == []
