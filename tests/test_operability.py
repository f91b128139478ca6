"""What an operator sees: a rejected reload looks rejected, an empty daemon is ready,
config errors exit 2, `check --no-files`, `status` exit codes, `--help` on every flag.

Command-line behaviour runs in real processes (`python -m refresher ...`).
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml

from refresher.cli import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, build_parser
from refresher.config import load_settings
from refresher.errors import ConfigError
from refresher.sdnotify import SystemdNotifier
from tests.conftest import CLIENT_ID, CLIENT_SECRET, get_json, oauth2_job, wait_for


def refresher(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "refresher", *args], capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------- a rejected reload looks rejected


@pytest.mark.anyio
async def test_rejected_reload_says_so_in_the_systemd_status(
    start_daemon: Any, oauth2_emulator: Any, tmp_path: Path
) -> None:
    sock_path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(sock_path))
    receiver.settimeout(5)
    config_path = tmp_path / "refresher.yaml"
    config = {"server": {"listen": "127.0.0.1:0"}, "jobs": [oauth2_job(oauth2_emulator, tmp_path)]}
    config_path.write_text(yaml.safe_dump(config))
    notifier = SystemdNotifier(str(sock_path))

    async def message() -> bytes:
        data: bytes = await anyio.to_thread.run_sync(receiver.recv, 4096)
        return data

    try:
        async with start_daemon(config, systemd=notifier, config_path=config_path) as daemon:
            assert b"STATUS=1/1 tokens valid" in await message()
            # Two errors: an unknown key and a job without provider/sinks.
            config_path.write_text("colour: red\njobs: [{name: x}]\n")
            assert not await daemon.reload()
            assert b"RELOADING=1" in await message()
            rejected = await message()
            assert b"READY=1" in rejected
            status = rejected.decode().split("STATUS=", 1)[1].splitlines()[0]
            assert status == (
                "reload rejected: 3 error(s); running the previous config; 1/1 tokens valid"
            )
            # The periodic status keeps saying so: it must not fall back to "all good".
            assert daemon.status_line() == status
            # A good reload clears it.
            config_path.write_text(yaml.safe_dump(config))
            assert await daemon.reload()
            assert b"RELOADING=1" in await message()
            assert b"STATUS=1/1 tokens valid\n" in await message() + b"\n"
            assert daemon.status_line() == "1/1 tokens valid"
    finally:
        notifier.close()
        receiver.close()


def test_config_errors_exit_2_so_systemd_stops_restarting(tmp_path: Path) -> None:
    """systemd/refresher.service has RestartPreventExitStatus=2 (tests/test_systemd.py)."""
    config = tmp_path / "refresher.yaml"
    config.write_text("jobs: [{name: x}]\n")
    for command in ("run", "once", "check"):
        result = refresher(command, "--config", str(config))
        assert result.returncode == EXIT_CONFIG == 2, (command, result.stderr)
        assert "jobs[0].provider" in result.stderr
    missing = refresher("run", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr


# ---------------------------------------------------------------- an empty job list is ready


@pytest.mark.anyio
async def test_a_daemon_without_jobs_is_ready(start_daemon: Any) -> None:
    # `helm install --wait` with the chart's default `jobs: []` must finish.
    async with start_daemon({"jobs": []}) as daemon:
        status, body = await get_json(daemon, "/readyz")
        assert (status, body) == (200, {"status": "ready"})


@pytest.mark.anyio
async def test_a_daemon_with_a_failing_job_is_still_not_ready(
    start_daemon: Any, oauth2_emulator: Any, tmp_path: Path
) -> None:
    job = oauth2_job(oauth2_emulator, tmp_path)
    job["provider"]["client_secret"] = "wrong-secret-value"
    async with start_daemon({"jobs": [job]}) as daemon:
        runtime = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: runtime.failures > 0)
        status, body = await get_json(daemon, "/readyz")
        assert status == 503 and body["jobs_not_valid"] == 1


# ---------------------------------------------------------------- check --no-files


def config_naming_missing_files(tmp_path: Path) -> Path:
    """Every kind of file reference, none of which exists."""
    missing = tmp_path / "not-mounted"
    config = {
        "server": {"listen": "0.0.0.0:9464", "admin_token_file": str(missing / "admin")},
        "jobs": [
            {
                "name": "gooclaim",
                "provider": {
                    "kind": "gooclaim",
                    "client_id": "abc",
                    "client_secret_file": str(missing / "gooclaim-secret"),
                    "issuer": "https://auth.gooclaim.example",
                    "public_key_file": str(missing / "gooclaim.pem"),
                    "ca_file": str(missing / "ca.pem"),
                },
                "sinks": [
                    {"kind": "file", "path": "/tokens/gooclaim.token"},
                    {"kind": "kubernetes", "secret": "t", "kubeconfig": str(missing / "kc")},
                ],
                "notify": [
                    {
                        "kind": "webhook",
                        "url": "https://hook.example",
                        "secret_file": str(missing / "h"),
                    }
                ],
            },
            {
                "name": "debitura",
                "provider": {
                    "kind": "debitura",
                    "api_key_file": str(missing / "debitura-key"),
                    "tenants_file": str(missing / "tenants.txt"),
                },
                "sinks": [{"kind": "file", "path": "/tokens/debitura-{tenant}.jwt"}],
            },
            {
                "name": "dutyclaims",
                "provider": {
                    "kind": "dutyclaims",
                    "mode": "managed",
                    "credential_file": str(missing / "dc"),
                },
                "sinks": [{"kind": "file", "path": "/tokens/dc.header", "format": "header"}],
            },
        ],
    }
    path = tmp_path / "refresher.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_check_no_files_validates_without_the_secret_files(tmp_path: Path) -> None:
    path = config_naming_missing_files(tmp_path)
    plain = refresher("check", "--config", str(path))
    assert plain.returncode == 2
    assert plain.stderr.count("file not found") == 9, plain.stderr

    result = refresher("check", "--no-files", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK: 3 job(s)")
    assert "tenants: from" in result.stdout and "tenants.txt" in result.stdout
    assert "sink file: /tokens/debitura-{tenant}.jwt" in result.stdout


def test_check_no_files_still_rejects_everything_else(tmp_path: Path) -> None:
    config = yaml.safe_load(config_naming_missing_files(tmp_path).read_text())
    config["jobs"][0]["provider"]["client_secert_file"] = "/typo"
    config["jobs"][1]["sinks"][0]["path"] = "/tokens/debitura.jwt"  # no {tenant}
    config["refresh"] = {"min_remaining": "soon"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = refresher("check", "--no-files", "--config", str(path))
    assert result.returncode == 2
    assert "jobs[0].provider.client_secert_file: unknown key" in result.stderr
    assert "sinks[0].path must contain {tenant}" in result.stderr
    assert "refresh.min_remaining: invalid duration" in result.stderr
    assert "file not found" not in result.stderr


def test_no_files_is_scoped_to_one_load(tmp_path: Path) -> None:
    path = config_naming_missing_files(tmp_path)
    assert load_settings(path, check_files=False).jobs[0].name == "gooclaim"
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(path)


def test_check_online_and_no_files_exclude_each_other(tmp_path: Path) -> None:
    path = config_naming_missing_files(tmp_path)
    result = refresher("check", "--online", "--no-files", "--config", str(path))
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


# ---------------------------------------------------------------- status exit codes


def test_status_exits_3_when_the_daemon_is_unreachable() -> None:
    port = free_port()  # nothing listens there any more
    result = refresher("status", "--url", f"127.0.0.1:{port}")
    assert result.returncode == EXIT_UNREACHABLE == 3
    assert "cannot read status" in result.stderr


def test_status_exits_3_on_an_answer_that_is_not_a_status(tmp_path: Path) -> None:
    # A listener that is not refresher (here: a static file server answering 404).
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx2.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx2.HTTPError:
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.05)
        result = refresher("status", "--url", f"http://127.0.0.1:{port}")
        assert result.returncode == 3, result.stderr
        (tmp_path / "v1").mkdir()
        (tmp_path / "v1" / "tokens").write_text('{"jobs": 5}')
        result = refresher("status", "--url", f"http://127.0.0.1:{port}")
        assert result.returncode == 3, result.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_status_exits_2_on_a_usage_error() -> None:
    result = refresher("status", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


def test_status_exits_0_when_every_job_is_valid(tmp_path: Path, leak_guard: Any) -> None:
    from tests.emulators.oauth2 import OAuth2Emulator

    with OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=3600) as emulator:
        leak_guard.emulators.append(emulator)
        (tmp_path / "secret").write_text(CLIENT_SECRET)
        port = free_port()
        config = tmp_path / "refresher.yaml"
        job = {
            "name": "one",
            "provider": {
                "kind": "oauth2",
                "token_url": emulator.token_url,
                "client_id": CLIENT_ID,
                "client_secret_file": str(tmp_path / "secret"),
            },
            "sinks": [{"kind": "file", "path": str(tmp_path / "one.token")}],
        }
        config.write_text(
            yaml.safe_dump({"server": {"listen": f"127.0.0.1:{port}"}, "jobs": [job]})
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "refresher", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 15
            while not (tmp_path / "one.token").exists():
                assert time.monotonic() < deadline, "no token"
                time.sleep(0.02)
            result = refresher("status", "--url", f"127.0.0.1:{port}")
            assert result.returncode == EXIT_OK, result.stderr
            leak_guard.extra_outputs.append(result.stdout)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
    assert EXIT_FAILED == 1  # the not-valid case: tests/test_cli_process.py


# ---------------------------------------------------------------- --help on every flag


def every_parser(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(every_parser(sub))
    return found


def test_every_flag_and_command_has_help() -> None:
    parsers = every_parser(build_parser())
    assert {prog for prog, _ in parsers} >= {
        "refresher",
        "refresher run",
        "refresher once",
        "refresher check",
        "refresher status",
        "refresher demo",
    }
    missing = []
    for prog, parser in parsers:
        assert parser.description, f"{prog}: no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        missing.append(f"{prog} {choice.dest}")
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_help_runs_for_every_command() -> None:
    for command in ("run", "once", "check", "status", "demo"):
        result = refresher(command, "--help")
        assert result.returncode == 0, result.stderr
        assert "--" in result.stdout
    assert "--no-files" in refresher("check", "--help").stdout
    assert "3 daemon unreachable" in refresher("status", "--help").stdout.replace("\n", " ")
