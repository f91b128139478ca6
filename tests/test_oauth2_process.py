"""A rotated refresh token survives SIGKILL between the mint and the write: the real
``refresher run`` process, killed while the Kubernetes emulator holds its Secret
write; ``refresher once`` started afterwards redeems the refresh token saved in
``state_dir``. The server rotates
refresh tokens and treats a replayed one as stolen (its whole line revoked), so the
restart working at all proves the rotation was not lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from urllib.parse import parse_qs

import httpx2
import yaml

from refresher.clock import SystemClock
from tests.emulators.kubernetes import KubernetesEmulator
from tests.emulators.oauth2 import OAuth2Emulator
from tests.kube_rbac import SERVICE_ACCOUNT, install_chart_rbac

NS = "apps"


def test_sigkill_between_mint_and_write_loses_no_refresh_token(make_emulator, tmp_path, leak_guard) -> None:
    oauth2: OAuth2Emulator = make_emulator(
        OAuth2Emulator, clients={}, public_clients={"app"}, clock=SystemClock(), token_lifetime=3600
    )
    kube: KubernetesEmulator = make_emulator(KubernetesEmulator, namespaces=[NS], clock=SystemClock())
    kube.add_token("sa-token", SERVICE_ACCOUNT)
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS, token="sa-token", user="sa")
    seed = oauth2.issue_refresh_token("app")
    (tmp_path / "refresh_token").write_text(seed + "\n")
    state = tmp_path / "state"
    state.mkdir()
    config = {
        "server": {"listen": "127.0.0.1:0"},
        "logging": {"format": "json", "level": "debug"},
        "jobs": [{
            "name": "api",
            "provider": {"kind": "oauth2", "issuer": oauth2.issuer, "client_id": "app",
                         "client_auth": "none", "grant": "refresh_token",
                         "refresh_token_file": str(tmp_path / "refresh_token"),
                         "state_dir": str(state)},
            "sinks": [{"kind": "kubernetes", "namespace": NS, "secret": "partner-tokens",
                       "key": "api", "kubeconfig": str(kubeconfig)}],
        }],
    }
    install_chart_rbac(kube, config)
    (tmp_path / "refresher.yaml").write_text(yaml.safe_dump(config))
    run = [sys.executable, "-m", "refresher", "run", "--config", str(tmp_path / "refresher.yaml")]
    saved = state / "api.refresh-token.json"

    held = kube.hold(verb="patch", resource="secrets")
    with (tmp_path / "run.log").open("w") as log:
        daemon = subprocess.Popen(run, stdout=log, stderr=log)
    try:
        assert held.arrived.wait(30), (tmp_path / "run.log").read_text()[-3000:]
        # Minted, not yet written: the rotated refresh token is already on disk.
        rotated = json.loads(saved.read_text())["refresh_token"]
        assert rotated == oauth2.issued[-2]  # the newest refresh token the server issued
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        assert "api" not in ((kube.secret(NS, "partner-tokens") or {}).get("data") or {})
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        held.release()

    # Started again: it must redeem the saved refresh token.
    once = subprocess.run([*run[:3], "once", *run[4:]], capture_output=True, text=True, timeout=60)
    leak_guard.extra_outputs.extend([once.stdout, once.stderr])
    assert once.returncode == 0, once.stderr[-3000:]
    redeemed = [parse_qs(r.body.decode())["refresh_token"][0]
                for r in oauth2.requests if r.path == oauth2.token_path]
    assert redeemed == [seed, rotated]  # the restart redeemed the saved one, not the seed
    assert oauth2.revoked_lines == set()
    # What a restart without the saved token would have met: the seed is spent.
    replay = httpx2.post(oauth2.token_url, data={"grant_type": "refresh_token", "client_id": "app",
                                                 "refresh_token": seed})
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    leak_guard.secrets.update({seed, rotated, json.loads(saved.read_text())["refresh_token"]})
    leak_guard.extra_outputs.append((tmp_path / "run.log").read_text())
