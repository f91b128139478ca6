"""The real command line in real processes: signals, status table, once, demo."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import yaml

from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.emulators.oauth2 import OAuth2Emulator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def job(emulator: OAuth2Emulator, tmp_path: Path, name: str) -> dict:
    return {
        "name": name,
        "provider": {"kind": "oauth2", "token_url": emulator.token_url, "client_id": CLIENT_ID,
                     "client_secret_file": str(tmp_path / "secret")},
        "sinks": [{"kind": "file", "path": str(tmp_path / f"{name}.token")}],
    }


@pytest.fixture
def emulator(leak_guard):
    with OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=3600) as emu:
        leak_guard.emulators.append(emu)
        yield emu


def test_run_reload_status_and_sigterm(emulator, tmp_path, leak_guard) -> None:
    (tmp_path / "secret").write_text(CLIENT_SECRET + "\n")
    port = free_port()
    config = tmp_path / "refresher.yaml"
    base = {"server": {"listen": f"127.0.0.1:{port}"}, "logging": {"format": "json"}, "jobs": [job(emulator, tmp_path, "one")]}
    config.write_text(yaml.safe_dump(base))
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "refresher", "run", "--config", str(config)], stdout=log, stderr=log)
    try:
        until(lambda: (tmp_path / "one.token").exists())
        # SIGHUP with a new job.
        config.write_text(yaml.safe_dump({**base, "jobs": [job(emulator, tmp_path, "one"), job(emulator, tmp_path, "two")]}))
        proc.send_signal(signal.SIGHUP)
        until(lambda: (tmp_path / "two.token").exists())
        # SIGHUP with a broken config: rejected, the daemon lives on.
        config.write_text("jobs: [{name: x}]\n")
        proc.send_signal(signal.SIGHUP)
        until(lambda: "refresher_config_reload_failures_total 1.0" in httpx2.get(f"http://127.0.0.1:{port}/metrics").text)
        assert proc.poll() is None
        status = subprocess.run([sys.executable, "-m", "refresher", "status", "--url", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert lines[0].split()[:3] == ["JOB", "TENANTS", "STATE"]
        assert {line.split()[0] for line in lines[1:]} == {"one", "two"}
        assert all(" valid " in line for line in lines[1:])
        as_json = json.loads(subprocess.run([sys.executable, "-m", "refresher", "status", "--json", "--url", f"127.0.0.1:{port}"],
                                            capture_output=True, text=True, timeout=30).stdout)
        assert {j["job"] for j in as_json} == {"one", "two"}
        leak_guard.extra_outputs.extend([status.stdout, json.dumps(as_json)])
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "daemon.log").read_text()
    leak_guard.extra_outputs.append(output)
    events = [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]
    assert "config reloaded" in events and "reload rejected: keeping the running config" in events
    assert all(json.loads(line).get("job") for line in output.splitlines()
               if line.startswith("{") and json.loads(line)["event"] == "token refreshed")


def test_status_exits_1_when_a_job_is_not_valid(emulator, tmp_path) -> None:
    (tmp_path / "secret").write_text("wrong\n")
    port = free_port()
    config = tmp_path / "refresher.yaml"
    config.write_text(yaml.safe_dump({"server": {"listen": f"127.0.0.1:{port}"}, "jobs": [job(emulator, tmp_path, "bad")]}))
    proc = subprocess.Popen([sys.executable, "-m", "refresher", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until(lambda: emulator.count() >= 1)
        status = subprocess.run([sys.executable, "-m", "refresher", "status", "--url", f"http://127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 1
        assert "unauthorized" in status.stdout and "failing" in status.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_once_writes_and_reports_failure(emulator, tmp_path) -> None:
    (tmp_path / "secret").write_text(CLIENT_SECRET)
    config = tmp_path / "refresher.yaml"
    config.write_text(yaml.safe_dump({"jobs": [job(emulator, tmp_path, "one")]}))
    ok = subprocess.run([sys.executable, "-m", "refresher", "once", "--config", str(config)], capture_output=True, timeout=60)
    assert ok.returncode == 0 and (tmp_path / "one.token").read_text().startswith("eyJ")
    (tmp_path / "secret").write_text("wrong")
    failed = subprocess.run([sys.executable, "-m", "refresher", "once", "--config", str(config)], capture_output=True, timeout=60)
    assert failed.returncode == 1


def test_check_online_fetches_without_writing(emulator, tmp_path) -> None:
    (tmp_path / "secret").write_text(CLIENT_SECRET)
    config = tmp_path / "refresher.yaml"
    config.write_text(yaml.safe_dump({"jobs": [job(emulator, tmp_path, "one")]}))
    result = subprocess.run([sys.executable, "-m", "refresher", "check", "--online", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert emulator.count(status=200) == 1 and not (tmp_path / "one.token").exists()


def test_demo_rotates_tokens_and_stops_on_ctrl_c(tmp_path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "refresher", "demo", "--tokens-dir", str(tmp_path / "tokens"),
         "--lifetime", "4", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        tokens = tmp_path / "tokens"
        expected = {"dutyclaims.json", "dutyclaims.token", "debitura-acme-001.jwt",
                    "debitura-globex-002.jwt", "debitura-initech-003.jwt", "gooclaim.token",
                    "gooclaim.env", "tokens.env", "gooclaim-nginx.conf"}
        until(lambda: tokens.is_dir() and expected <= {p.name for p in tokens.iterdir()})
        until(lambda: (tokens / "tokens.env").read_text().count("\n# ") == 5)
        first = (tokens / "gooclaim.token").read_text()
        until(lambda: (tokens / "gooclaim.token").read_text() != first, timeout=20)
        # The bundle and the rendered template follow every rotation.
        bundle = dict(line.split("=", 1) for line in (tokens / "tokens.env").read_text().splitlines()
                      if line and not line.startswith("#"))
        assert set(bundle) == {"DUTYCLAIMS", "DEBITURA_ACME_001", "DEBITURA_GLOBEX_002",
                               "DEBITURA_INITECH_003", "GOOCLAIM"}
        until(lambda: (tokens / "gooclaim.token").read_text().strip()
              in (tokens / "gooclaim-nginx.conf").read_text())
        body = httpx2.get(f"http://127.0.0.1:{port}/v1/tokens").json()
        assert {j["job"] for j in body["jobs"]} == {"dutyclaims", "debitura", "gooclaim"}
        assert httpx2.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "token refreshed" in out
