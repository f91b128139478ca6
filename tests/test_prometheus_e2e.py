"""A real Prometheus scraping a real daemon that runs against the emulators.

Checks (a) `promtool check metrics` finds nothing to complain about on a live
scrape, (b) every PromQL expression the dashboard uses returns data, and (c) the
RefresherRefreshFailing alert goes pending/firing with the shipped rule file loaded.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import yaml

from refresher.emulators.base import Fault
from refresher.emulators.debitura import DebituraEmulator
from refresher.emulators.oauth2 import OAuth2Emulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        shutil.which("prometheus") is None or shutil.which("promtool") is None,
        reason="needs the prometheus and promtool binaries (Debian package prometheus)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def dashboard_expressions() -> list[str]:
    spec = importlib.util.spec_from_file_location("dashboard_gen", ROOT / "helm/refresher/dashboards/generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.promql_expressions())


@pytest.fixture
def emulators(leak_guard):
    healthy = OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=3600).start()
    throttled = OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=3600).start()
    throttled.inject(Fault.rate_limited("1", count=100_000))
    debitura = DebituraEmulator(api_keys={"e2e-debitura-key"}).start()
    leak_guard.emulators.extend([healthy, throttled, debitura])
    leak_guard.secrets.add("e2e-debitura-key")
    yield healthy, throttled, debitura
    for emulator in (healthy, throttled, debitura):
        emulator.stop()


def test_prometheus_scrapes_dashboard_queries_and_alert(emulators, tmp_path, leak_guard) -> None:
    healthy, throttled, debitura = emulators
    daemon_port, prom_port = free_port(), free_port()

    def job(name: str, emulator: OAuth2Emulator, path: Path) -> dict:
        return {
            "name": name,
            "provider": {"kind": "oauth2", "token_url": emulator.token_url, "client_id": CLIENT_ID,
                         "client_secret": CLIENT_SECRET},
            "sinks": [{"kind": "file", "path": str(path)}],
        }

    config = tmp_path / "refresher.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"listen": f"127.0.0.1:{daemon_port}"},
        "refresh": {"backoff": {"initial": "1s", "max": "2s"}},
        "jobs": [
            job("healthy", healthy, tmp_path / "healthy.token"),
            job("throttled", throttled, tmp_path / "throttled.token"),  # 429 storm: the failing provider
            job("unwritable", healthy, tmp_path / "missing-dir" / "t.token"),  # sink failures
            {"name": "tenants",  # per-tenant gauges
             "provider": {"kind": "debitura", "base_url": debitura.url, "api_key": "e2e-debitura-key",
                          "tenants": ["t-1", "t-2"]},
             "sinks": [{"kind": "file", "path": str(tmp_path / "{tenant}.jwt")}]},
        ],
    }))
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "helm/refresher/files/alerts.yaml")],
        "scrape_configs": [{
            "job_name": "refresher",
            "honor_labels": True,
            "static_configs": [{"targets": [f"127.0.0.1:{daemon_port}"]}],
        }],
    }))
    daemon_log = open(tmp_path / "daemon.log", "w")
    prom_log = open(tmp_path / "prometheus.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "refresher", "run", "--config", str(config)],
                              stdout=daemon_log, stderr=daemon_log)
    prometheus = None
    try:
        until(lambda: (tmp_path / "healthy.token").exists(), 20, "the daemon's first token")
        # (a) promtool lint of a live scrape: no complaint at all.
        scrape = httpx2.get(f"http://127.0.0.1:{daemon_port}/metrics").text
        leak_guard.extra_outputs.append(scrape)
        lint = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=30)
        assert lint.returncode == 0 and lint.stdout.strip() == "" and lint.stderr.strip() == "", lint.stdout + lint.stderr

        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={prom_config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1h"],
            stdout=prom_log, stderr=prom_log,
        )
        api = f"http://127.0.0.1:{prom_port}/api/v1"

        def query(expr: str) -> list:
            response = httpx2.get(f"{api}/query", params={"query": expr}, timeout=5)
            body = response.json()
            assert body["status"] == "success", (expr, body)
            return body["data"]["result"]

        def ready() -> bool:
            try:
                return httpx2.get(f"http://127.0.0.1:{prom_port}/-/ready", timeout=1).status_code == 200
            except httpx2.HTTPError:
                return False

        until(ready, 30, "prometheus to start")
        # (b) every dashboard expression returns data once a few scrapes are in.
        missing: list[str] = []
        for expr in dashboard_expressions():
            try:
                until(lambda e=expr: query(e), 30, expr)
            except AssertionError:
                missing.append(expr)
        assert missing == [], f"dashboard expressions without data: {missing}"

        # (c) the failing provider drives RefresherRefreshFailing to pending/firing.
        def refresh_failing() -> list:
            alerts = httpx2.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "RefresherRefreshFailing"
                    and a["state"] in ("pending", "firing")]

        alerts = until(refresh_failing, 30, "RefresherRefreshFailing to go pending")
        failing_jobs = {a["labels"]["job"] for a in alerts}
        assert "throttled" in failing_jobs and "healthy" not in failing_jobs
    finally:
        for proc in (prometheus, daemon):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        daemon_log.close()
        prom_log.close()
    leak_guard.extra_outputs.append((tmp_path / "daemon.log").read_text())
