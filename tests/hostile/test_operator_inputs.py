"""What a tired operator or a noisy consumer can get wrong: secrets that are not
text, environment overrides that are not JSON, forced refreshes without end, loose
file modes and missing directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from refresher.cli import main
from refresher.clock import SystemClock
from tests.conftest import CLIENT_SECRET, DEB_KEY, deb_job, metric, oauth2_job, wait_for
from tests.hostile.conftest import alive

pytestmark = pytest.mark.anyio


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def secret_file_job(emu: Any, tmp_path: Path, content: bytes) -> dict[str, Any]:
    secret = tmp_path / "client_secret"
    secret.write_bytes(content)
    job = oauth2_job(emu, tmp_path)
    del job["provider"]["client_secret"]
    job["provider"]["client_secret_file"] = str(secret)
    return job


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"\n\n", "is empty"),
        (b"caf\xe9-secret", "not valid UTF-8 (byte 4)"),
        (b"two\nlines", "control or invalid character at position 4"),
    ],
    ids=["empty", "only-newlines", "latin-1", "line-break"],
)
def test_unusable_secret_file_fails_check_naming_the_file(
    oauth2_emulator, tmp_path, capsys, content, problem
) -> None:
    config = write_config(tmp_path, {"jobs": [secret_file_job(oauth2_emulator, tmp_path, content)]})
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "client_secret_file" in err and str(tmp_path / "client_secret") in err and problem in err


async def test_secret_file_rotated_to_garbage_fails_that_job_only(
    start_daemon, oauth2_emulator, tmp_path, leak_guard
) -> None:
    job = secret_file_job(oauth2_emulator, tmp_path, CLIENT_SECRET.encode())
    (tmp_path / "other").mkdir()
    other = oauth2_job(oauth2_emulator, tmp_path / "other", name="other")
    async with start_daemon({"jobs": [job, other]}, clock=SystemClock()) as daemon:
        jobs = daemon.scheduler.jobs
        api = jobs[("api", None)]
        await wait_for(lambda: all(r.token and r.refreshing is None for r in jobs.values()))
        await wait_for(lambda: daemon.watcher.ready.is_set())
        first = api.token
        requests = oauth2_emulator.count()
        (tmp_path / "client_secret").write_bytes(b"\xff\xfe rotated badly")
        await wait_for(lambda: api.failure_reason == "config" and api.refreshing is None)
        assert "not valid UTF-8" in api.failure_message
        assert oauth2_emulator.count() == requests, "an unusable secret is never sent"
        assert api.token is first and (tmp_path / "api.token").read_text().strip() == first.value
        assert metric(daemon, "refresher_refresh_failures_total", token_job="api", reason="config") == 1
        # Fixed file: the watcher re-mints at once, no backoff wait.
        (tmp_path / "client_secret").write_text(CLIENT_SECRET + "\n")
        await wait_for(lambda: api.token is not first and api.failures == 0)
        assert jobs[("other", None)].failures == 0 and alive(daemon)


def test_environment_override_that_is_not_json_names_the_variable(oauth2_emulator, tmp_path) -> None:
    config = write_config(tmp_path, {"jobs": [oauth2_job(oauth2_emulator, tmp_path)]})
    for variable in ("REFRESHER_JOBS", "REFRESHER_SERVER", "REFRESHER_REFRESH"):
        result = subprocess.run(
            [sys.executable, "-m", "refresher", "check", "--config", str(config)],
            capture_output=True,
            text=True,
            env={**os.environ, variable: "notjson"},
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert f"{variable}: not valid JSON" in result.stderr and "Traceback" not in result.stderr


def test_check_warns_about_loose_modes_and_missing_directories(oauth2_emulator, tmp_path, capsys) -> None:
    job = oauth2_job(oauth2_emulator, tmp_path)
    job["sinks"] = [
        {"kind": "file", "path": str(tmp_path / "a.token"), "mode": "0666"},
        {"kind": "file", "path": str(tmp_path / "b.token"), "mode": "0644"},
        {"kind": "file", "path": str(tmp_path / "missing" / "c.token")},
        {"kind": "file", "path": str(tmp_path / "d.token"), "mode": "0640"},
    ]
    assert main(["check", "--config", str(write_config(tmp_path, {"jobs": [job]}))]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3
    assert "sinks[0]" in warnings[0] and "0666 lets other users replace" in warnings[0]
    assert "sinks[1]" in warnings[1] and "0644 lets every user read" in warnings[1]
    assert "sinks[2]" in warnings[2] and "does not exist yet" in warnings[2]


def test_check_reports_tenants_file_lines_it_will_skip(debitura, tmp_path, capsys) -> None:
    tenants = tmp_path / "tenants.txt"
    tenants.write_bytes(b"good\nbad\x01line\n")
    config = write_config(tmp_path, {"jobs": [deb_job(debitura, tmp_path, tenants_file=str(tenants))]})
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "tenants: 1" in out and "line 2: tenant contains the control character" in out


async def test_forced_refreshes_are_bounded_per_credential_and_per_daemon(
    start_daemon, debitura, clock, tmp_path, leak_guard
) -> None:
    tenants = [f"t-{i:03d}" for i in range(200)]
    job = deb_job(debitura, tmp_path, tenants)
    async with start_daemon({"jobs": [job]}) as daemon:
        jobs = daemon.scheduler.jobs
        await wait_for(lambda: all(r.token and r.refreshing is None for r in jobs.values()), timeout=30)
        minted = debitura.count()
        answers: list[httpx2.Response] = []
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{daemon.port}") as client:
            for tenant in tenants:
                answers.append(await client.post(f"/v1/tokens/debitura/refresh?tenant={tenant}"))
            codes = [a.status_code for a in answers]
            assert codes.count(200) == 30 and codes.count(429) == 170
            refused = answers[-1]
            assert refused.json()["budget"] == "credential" and int(refused.headers["retry-after"]) >= 1
            assert debitura.count() == minted + 30
            # A minute later the credential's budget is back.
            await clock.advance(60)
            again = await client.post(f"/v1/tokens/debitura/refresh?tenant={tenants[-1]}")
            assert again.status_code == 200
        assert alive(daemon)


async def test_the_daemon_wide_forced_budget(start_daemon, debitura, oauth2_emulator, clock, tmp_path) -> None:
    (tmp_path / "o").mkdir()
    config = {
        "refresh": {"forced": {"per_minute": 3, "min_interval": "0s"}},
        "jobs": [deb_job(debitura, tmp_path, ["a", "b"]), oauth2_job(oauth2_emulator, tmp_path / "o")],
    }
    async with start_daemon(config) as daemon:
        jobs = daemon.scheduler.jobs
        await wait_for(lambda: all(r.token and r.refreshing is None for r in jobs.values()))
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{daemon.port}") as client:
            paths = [
                "/v1/tokens/debitura/refresh?tenant=a",
                "/v1/tokens/api/refresh",
                "/v1/tokens/debitura/refresh?tenant=b",
                "/v1/tokens/api/refresh",
            ]
            codes = [(await client.post(p)).status_code for p in paths]
            last = await client.post("/v1/tokens/debitura/refresh?tenant=a")
        assert codes == [200, 200, 200, 429] and last.json()["budget"] == "daemon"
        assert DEB_KEY not in last.text
