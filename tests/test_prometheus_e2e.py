"""A real Prometheus scraping real daemons that run against the emulators.

Two daemons: A (scrape job "refresher") with one job per failure the alerts know about,
and B (scrape job "refresher-ha"), a leader-election replica that can never get the Lease.
A third target in job "refresher" is a closed port. No `honor_labels`: the daemon exports
`token_job`, never `job`. Checks:

(a) `promtool check metrics` finds nothing to complain about on a live scrape, and no
    series carries a `job` label;
(b) every PromQL expression the dashboard uses returns data;
(c) RefresherRefreshFailing goes pending/firing with the shipped rule file loaded;
(d) every Grafana-managed rule (files/grafana-alerts.yaml): its query, run against this
    Prometheus, returns the series of the failure injected for it, and never a healthy job.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from refresher.demo.base import Fault
from refresher.demo.debitura import DebituraEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.emulators.kubernetes import KubernetesEmulator
from tests.emulators.oauth2 import OAuth2Emulator

ROOT = Path(__file__).resolve().parent.parent
WITH_A_BUG = ROOT / "tests" / "monitoring" / "refresher_with_a_bug.py"
DEB_KEY = "e2e-debitura-key"
REFUSING_KEY = "e2e-debitura-key-of-a-refused-tenant"
#: Metrics the rules and dashboard read that another work stream adds to the daemon.
PENDING_METRICS = {"refresher_scope_missing"}

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
        return int(s.getsockname()[1])


def until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_expressions() -> list[str]:
    module = load(ROOT / "helm/refresher/dashboards/generate.py", "dashboard_gen")
    return list(module.promql_expressions())


def grafana_rules() -> dict[str, str]:
    """Title -> the PromQL of query A of every Grafana-managed rule."""
    document = yaml.safe_load((ROOT / "helm/refresher/files/grafana-alerts.yaml").read_text())
    return {
        rule["title"]: next(q for q in rule["data"] if q["refId"] == "A")["model"]["expr"]
        for group in document["groups"]
        for rule in group["rules"]
    }


def exported_metric_names() -> set[str]:
    from refresher.metrics import Metrics

    metrics = Metrics()
    metrics.register_state(lambda: [], is_leader=None)
    return {family.name for family in metrics.registry.collect()}


def pending_only(expr: str) -> bool:
    """Whether `expr` can only return data once another work stream's metric exists."""
    names = set(re.findall(r"\brefresher_[a-z_]+\b", expr))
    missing = {n for n in names & PENDING_METRICS if n not in exported_metric_names()}
    return bool(missing) and not names - missing


@pytest.fixture
def emulators(leak_guard):
    healthy = OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=3600).start()
    throttled = OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=3600).start()
    throttled.inject(Fault.rate_limited("1", count=100_000))
    # Lives less than the 5 minutes RefresherTokenExpiringSoon allows.
    short = OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=200).start()
    debitura = DebituraEmulator(api_keys={DEB_KEY, REFUSING_KEY}).start()
    # The mint refuses this tenant: a 401 no retry fixes (on its own key, so the other
    # Debitura jobs' credential is not paused with it).
    debitura.mint_refused.add("t-unlinked")
    kube = KubernetesEmulator(namespaces=["e2e"]).start()
    for verb in ("get", "create", "update", "patch"):
        kube.forbid(verb, "leases")  # replica B never gets the Lease: no leader
    started = [healthy, throttled, short, debitura, kube]
    leak_guard.emulators.extend(started)
    leak_guard.secrets.update({DEB_KEY, REFUSING_KEY})
    yield {
        "healthy": healthy,
        "throttled": throttled,
        "short": short,
        "debitura": debitura,
        "kube": kube,
    }
    for emulator in started:
        emulator.stop()


def oauth2(name: str, emulator: OAuth2Emulator, sink: Path, **provider: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": {
            "kind": "oauth2",
            "token_url": emulator.token_url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            **provider,
        },
        "sinks": [{"kind": "file", "path": str(sink)}],
    }


def debitura_job(
    name: str, emulator: DebituraEmulator, sinks: Path, **provider: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "provider": {"kind": "debitura", "base_url": emulator.url, "api_key": DEB_KEY, **provider},
        "sinks": [{"kind": "file", "path": str(sinks / f"{name}-{{tenant}}.jwt")}],
    }


def test_prometheus_scrapes_dashboard_queries_and_alerts(emulators, tmp_path, leak_guard) -> None:
    port_a, port_b, dead, prom_port = free_port(), free_port(), free_port(), free_port()
    tenants_file = tmp_path / "tenants.txt"
    tenants_file.write_bytes(b"t-3\nnul\x00byte\n")  # one line refused
    config_a = tmp_path / "refresher.yaml"
    config_a.write_text(
        yaml.safe_dump(
            {
                "server": {"listen": f"127.0.0.1:{port_a}"},
                "refresh": {"backoff": {"initial": "1s", "max": "2s"}, "min_remaining": "10s"},
                "jobs": [
                    oauth2("healthy", emulators["healthy"], tmp_path / "healthy.token"),
                    oauth2(
                        "throttled", emulators["throttled"], tmp_path / "throttled.token"
                    ),  # 429 storm
                    oauth2(
                        "unwritable", emulators["healthy"], tmp_path / "missing-dir" / "t.token"
                    ),
                    oauth2("shortlived", emulators["short"], tmp_path / "short.token"),
                    oauth2(
                        "buggy",
                        emulators["healthy"],
                        tmp_path / "buggy.token",
                        audience="e2e-internal-error",
                    ),
                    debitura_job(
                        "tenants", emulators["debitura"], tmp_path, tenants=["t-1", "t-2"]
                    ),
                    debitura_job(
                        "tenantsfile",
                        emulators["debitura"],
                        tmp_path,
                        tenants_file=str(tenants_file),
                    ),
                    debitura_job(
                        "unlinked",
                        emulators["debitura"],
                        tmp_path,
                        tenants=["t-unlinked"],
                        api_key=REFUSING_KEY,
                    ),
                ],
            }
        )
    )
    kubeconfig = emulators["kube"].write_kubeconfig(tmp_path / "kubeconfig", namespace="e2e")
    config_b = tmp_path / "replica-b.yaml"
    config_b.write_text(
        yaml.safe_dump(
            {
                "server": {"listen": f"127.0.0.1:{port_b}"},
                "leader_election": {
                    "enabled": True,
                    "namespace": "e2e",
                    "identity": "pod-b",
                    "kubeconfig": str(kubeconfig),
                },
                "jobs": [oauth2("standby", emulators["healthy"], tmp_path / "standby.token")],
            }
        )
    )
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ROOT / "helm/refresher/files/alerts.yaml")],
                "scrape_configs": [
                    # The scrape config of docs/monitoring.md: no honor_labels.
                    {
                        "job_name": "refresher",
                        "static_configs": [
                            {"targets": [f"127.0.0.1:{port_a}", f"127.0.0.1:{dead}"]}
                        ],
                    },
                    {
                        "job_name": "refresher-ha",
                        "static_configs": [{"targets": [f"127.0.0.1:{port_b}"]}],
                    },
                ],
            }
        )
    )
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("a", "b", "prometheus")}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    daemon_a = subprocess.Popen(
        [sys.executable, str(WITH_A_BUG), "run", "--config", str(config_a)],
        stdout=logs["a"],
        stderr=logs["a"],
        env=env,
    )
    daemon_b = subprocess.Popen(
        [sys.executable, "-m", "refresher", "run", "--config", str(config_b)],
        stdout=logs["b"],
        stderr=logs["b"],
        env=env,
    )
    prometheus = None
    try:
        until(lambda: (tmp_path / "healthy.token").exists(), 20, "the daemon's first token")
        # (a) promtool lint of a live scrape: no complaint at all; no `job` label anywhere.
        scrape = httpx2.get(f"http://127.0.0.1:{port_a}/metrics").text
        leak_guard.extra_outputs.append(scrape)
        lint = subprocess.run(
            ["promtool", "check", "metrics"],
            input=scrape,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert lint.returncode == 0 and lint.stdout.strip() == "" and lint.stderr.strip() == "", (
            lint.stdout + lint.stderr
        )
        samples = [s for f in text_string_to_metric_families(scrape) for s in f.samples]
        assert samples and [s for s in samples if "job" in s.labels] == []

        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=logs["prometheus"],
            stderr=logs["prometheus"],
        )
        api = f"http://127.0.0.1:{prom_port}/api/v1"

        def query(expr: str) -> list[dict[str, Any]]:
            response = httpx2.get(f"{api}/query", params={"query": expr}, timeout=5)
            body = response.json()
            assert body["status"] == "success", (expr, body)
            result: list[dict[str, Any]] = body["data"]["result"]
            return result

        def ready() -> bool:
            try:
                return (
                    httpx2.get(f"http://127.0.0.1:{prom_port}/-/ready", timeout=1).status_code
                    == 200
                )
            except httpx2.HTTPError:
                return False

        until(ready, 30, "prometheus to start")
        # A config reload the daemon must reject (RefresherConfigReloadRejected), once
        # Prometheus has seen the counter at 0.
        until(
            lambda: query(
                f'refresher_config_reload_failures_total{{instance="127.0.0.1:{port_a}"}} == 0'
            ),
            30,
            "a first scrape of daemon A",
        )
        good_config = config_a.read_text()
        config_a.write_text("jobs: [this is not a job]\n")
        daemon_a.send_signal(signal.SIGHUP)

        # (b) every dashboard expression returns data once a few scrapes are in.
        missing: list[str] = []
        for expr in dashboard_expressions():
            if pending_only(expr):
                continue
            try:
                until(lambda e=expr: query(e), 30, expr)
            except AssertionError:
                missing.append(expr)
        assert missing == [], f"dashboard expressions without data: {missing}"

        # (c) the failing provider drives RefresherRefreshFailing to pending/firing.
        def refresh_failing() -> list:
            alerts = httpx2.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]
            return [
                a
                for a in alerts
                if a["labels"]["alertname"] == "RefresherRefreshFailing"
                and a["state"] in ("pending", "firing")
            ]

        alerts = until(refresh_failing, 30, "RefresherRefreshFailing to go pending")
        failing_jobs = {a["labels"]["token_job"] for a in alerts}
        assert "throttled" in failing_jobs and "healthy" not in failing_jobs
        assert all(a["labels"]["job"] == "refresher" for a in alerts), "the scrape job survives"

        # (d) each Grafana rule's query finds the failure injected for it.
        a, b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
        expected: dict[str, dict[str, str] | None] = {
            "RefresherDown": {"job": "refresher", "instance": f"127.0.0.1:{dead}"},
            "RefresherRefreshFailing": {"token_job": "throttled", "job": "refresher"},
            "RefresherTokenExpiringSoon": {"token_job": "shortlived"},
            "RefresherTokenExpired": {"token_job": "throttled"},
            "RefresherRateLimited": {"token_job": "throttled"},
            "RefresherSinkWriteFailing": {"token_job": "unwritable", "sink": "file"},
            "RefresherNoLeader": {"job": "refresher-ha"},
            "RefresherConfigReloadRejected": {"job": "refresher", "instance": a},
            "RefresherInternalError": {"component": "refresh", "instance": a},
            "RefresherTenantsRejected": {"token_job": "tenantsfile"},
            # The mint rejects the job's credential (401).
            "RefresherCredentialInvalid": {"token_job": "unlinked", "reason": "unauthorized"},
        }
        rules = grafana_rules()
        assert sorted(expected) == sorted(rules), "every Grafana rule needs an injected failure"
        not_found: dict[str, Any] = {}
        for title, want in expected.items():
            if want is None:
                continue

            def matches(expr: str = rules[title], want: dict[str, str] = want) -> list:
                return [r for r in query(expr) if want.items() <= r["metric"].items()]

            try:
                until(matches, 45, title)
            except AssertionError:
                not_found[title] = query(rules[title])
        assert not_found == {}, f"Grafana rules that did not see their failure: {not_found}"
        for title, expr in rules.items():
            result = query(expr)
            healthy = [r for r in result if r["metric"].get("token_job") in ("healthy", "standby")]
            assert healthy == [], (title, healthy)
            if title != "RefresherNoLeader":
                assert all(r["metric"].get("instance") != b for r in result), (title, result)
        config_a.write_text(good_config)
    finally:
        for proc in (prometheus, daemon_a, daemon_b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for log in logs.values():
            log.close()
    leak_guard.extra_outputs.append((tmp_path / "a.log").read_text())
    leak_guard.extra_outputs.append((tmp_path / "b.log").read_text())
