"""Events the daemon reacts to besides its timer :
consumer feedback, credential rotation, reload, notifications, systemd notify."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import sys
from pathlib import Path

import anyio
import httpx2
import pytest
import yaml

from refresher.clock import SystemClock
from refresher.demo.base import Fault
from refresher.sdnotify import SystemdNotifier
from tests.conftest import CLIENT_ID, CLIENT_SECRET, get_json, oauth2_job, wait_for
from tests.reliability.servers import WebhookReceiver

pytestmark = pytest.mark.anyio


async def post(daemon, path: str, headers: dict[str, str] | None = None) -> httpx2.Response:
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{daemon.port}") as client:
        return await client.post(path, headers=headers or {})


# ------------------------------------------------------------------ consumer feedback


async def test_forced_refresh_is_single_flight_and_rate_limited(start_daemon, oauth2_emulator, clock, tmp_path, leak_guard) -> None:
    async with start_daemon({"jobs": [oauth2_job(oauth2_emulator, tmp_path)]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        before = rt.token.fingerprint()
        oauth2_emulator.inject(Fault.slow(0.3))
        async with anyio.create_task_group() as tg:
            responses: list[httpx2.Response] = []

            async def one() -> None:
                responses.append(await post(daemon, "/v1/tokens/api/refresh"))

            for _ in range(10):
                tg.start_soon(one)
        assert [r.status_code for r in responses] == [200] * 10
        fingerprints = {r.json()["fingerprint"] for r in responses}
        assert len(fingerprints) == 1 and fingerprints != {before}
        assert oauth2_emulator.count() == 2, "10 concurrent calls must share one mint"
        for r in responses:
            leak_guard.extra_outputs.append(r.text)
            assert rt.token.value not in r.text
        # Within the minimum interval: 429 + Retry-After, no request to the provider.
        await clock.advance(3)
        again = await post(daemon, "/v1/tokens/api/refresh")
        assert again.status_code == 429 and again.headers["retry-after"] == "7"
        assert oauth2_emulator.count() == 2
        await clock.advance(7)
        assert (await post(daemon, "/v1/tokens/api/refresh")).status_code == 200
        assert oauth2_emulator.count() == 3
        assert (await post(daemon, "/v1/tokens/nope/refresh")).status_code == 404


async def test_refresh_endpoint_needs_bearer_off_loopback(start_daemon, oauth2_emulator, tmp_path, leak_guard) -> None:
    admin = tmp_path / "admin-token"
    admin.write_text("the-admin-bearer-secret\n")
    leak_guard.secrets.add("the-admin-bearer-secret")
    config = {"server": {"listen": "0.0.0.0:0", "admin_token_file": str(admin)},
              "jobs": [oauth2_job(oauth2_emulator, tmp_path)]}
    async with start_daemon(config) as daemon:
        await wait_for(lambda: daemon.scheduler.jobs[("api", None)].token is not None)
        assert (await post(daemon, "/v1/tokens/api/refresh")).status_code == 401
        bad = await post(daemon, "/v1/tokens/api/refresh", {"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        good = await post(daemon, "/v1/tokens/api/refresh", {"Authorization": "Bearer the-admin-bearer-secret"})
        assert good.status_code == 200
        # Read-only endpoints stay open for probes and Prometheus.
        assert (await get_json(daemon, "/v1/tokens"))[0] == 200


# ------------------------------------------------------------------ credential rotation


def k8s_secret_dir(root: Path, version: str, secret: str) -> None:
    """Lay out a directory like kubelet does for a mounted Secret and swap ..data."""
    data = root / f"..{version}"
    data.mkdir()
    (data / "client_secret").write_text(secret)
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(data.name)
    os.replace(tmp_link, root / "..data")  # atomic swap, as kubelet does
    if not (root / "client_secret").is_symlink():
        (root / "client_secret").symlink_to("..data/client_secret")


async def test_rotated_secret_via_symlink_swap_triggers_re_mint(start_daemon, oauth2_emulator, tmp_path, leak_guard) -> None:
    mount = tmp_path / "secret"
    mount.mkdir()
    k8s_secret_dir(mount, "v1", CLIENT_SECRET)
    job = oauth2_job(oauth2_emulator, tmp_path)
    del job["provider"]["client_secret"]
    job["provider"]["client_secret_file"] = str(mount / "client_secret")
    leak_guard.secrets.add("rotated-secret-value-2")
    async with start_daemon({"jobs": [job]}, clock=SystemClock()) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        await wait_for(lambda: daemon.watcher.ready.is_set())
        first = rt.token
        oauth2_emulator.clients[CLIENT_ID] = "rotated-secret-value-2"
        k8s_secret_dir(mount, "v2", "rotated-secret-value-2")
        await wait_for(lambda: rt.token is not first and rt.refreshing is None)
        assert b"client_secret=rotated-secret-value-2" in oauth2_emulator.requests[-1].body
        assert (tmp_path / "api.token").read_text().strip() == rt.token.value


async def test_rotation_to_a_rejected_secret_keeps_the_old_token(start_daemon, oauth2_emulator, tmp_path, leak_guard) -> None:
    secret = tmp_path / "client_secret"
    secret.write_text(CLIENT_SECRET)
    job = oauth2_job(oauth2_emulator, tmp_path)
    del job["provider"]["client_secret"]
    job["provider"]["client_secret_file"] = str(secret)
    leak_guard.secrets.add("a-wrong-new-secret")
    async with start_daemon({"jobs": [job]}, clock=SystemClock()) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        await wait_for(lambda: daemon.watcher.ready.is_set())
        old = rt.token
        # An editor-style save: write a new file and rename it over the old one.
        (tmp_path / "client_secret.new").write_text("a-wrong-new-secret\n")
        os.replace(tmp_path / "client_secret.new", secret)
        await wait_for(lambda: rt.failures == 1)
        assert rt.token is old and (tmp_path / "api.token").read_text().strip() == old.value
        assert rt.display_state(SystemClock().now()) == "retrying"
        assert leak_guard.events("refresh failed")[-1]["reason"] == "unauthorized"


# ------------------------------------------------------------------ reload


async def test_reload_keeps_unchanged_adds_removes_and_rejects_invalid(start_daemon, oauth2_emulator, tmp_path, leak_guard) -> None:
    config_path = tmp_path / "refresher.yaml"
    keep = oauth2_job(oauth2_emulator, tmp_path)
    gone = oauth2_job(oauth2_emulator, tmp_path, name="gone",
                      sinks=[{"kind": "file", "path": str(tmp_path / "gone.token")}], on_remove="delete")
    base = {"server": {"listen": "127.0.0.1:0"}, "jobs": [keep, gone]}
    config_path.write_text(yaml.safe_dump(base))
    async with start_daemon(base, config_path=config_path) as daemon:
        await wait_for(lambda: all(r.token and r.refreshing is None for r in daemon.scheduler.jobs.values()))
        kept = daemon.scheduler.jobs[("api", None)]
        token, due = kept.token, kept.next_refresh_at
        new = oauth2_job(oauth2_emulator, tmp_path, name="new", sinks=[{"kind": "file", "path": str(tmp_path / "new.token")}])
        config_path.write_text(yaml.safe_dump({**base, "jobs": [keep, new]}))
        assert await daemon.reload()
        await wait_for(lambda: (tmp_path / "new.token").exists())
        assert daemon.scheduler.jobs[("api", None)] is kept and kept.token is token and kept.next_refresh_at == due
        assert ("gone", None) not in daemon.scheduler.jobs and not (tmp_path / "gone.token").exists()
        assert oauth2_emulator.count() == 3
        # An invalid config is rejected, counted, and the running jobs stay.
        config_path.write_text(yaml.safe_dump({**base, "jobs": [{**keep, "colour": "red"}]}))
        assert not await daemon.reload()
        assert set(daemon.scheduler.jobs) == {("api", None), ("new", None)}
        status, text = await get_json(daemon, "/metrics")
        assert "refresher_config_reload_failures_total 1.0" in text
        assert "jobs[0].colour: unknown key" in leak_guard.events("reload rejected: keeping the running config")[0]["errors"]


# ------------------------------------------------------------------ notifiers


async def test_each_notifier_fires_once_per_refresh_without_the_token(start_daemon, oauth2_emulator, clock, tmp_path) -> None:
    env_dump = tmp_path / "env.json"
    script = tmp_path / "dump_env.py"
    script.write_text(
        "import json, os, sys\n"
        "keys = ['REFRESHER_JOB', 'REFRESHER_TENANT', 'REFRESHER_SINK_PATH', 'REFRESHER_EXPIRES_AT']\n"
        f"with open({str(env_dump)!r}, 'a') as f: f.write(json.dumps({{k: os.environ.get(k) for k in keys}}) + '\\n')\n"
        f"with open({str(tmp_path / 'all_env.txt')!r}, 'a') as f: f.write(repr(dict(os.environ)))\n"
    )
    signals = tmp_path / "signals.txt"
    consumer = tmp_path / "consumer.py"
    consumer.write_text(
        "import signal, sys, time, os\n"
        f"open({str(tmp_path / 'consumer.pid')!r}, 'w').write(str(os.getpid()))\n"
        f"signal.signal(signal.SIGHUP, lambda *a: open({str(signals)!r}, 'a').write('HUP\\n'))\n"
        "deadline = time.time() + 60\n"
        "while time.time() < deadline: time.sleep(0.05)\n"
    )
    hmac_key = tmp_path / "hmac"
    hmac_key.write_text("webhook-hmac-key\n")
    proc = await anyio.open_process([sys.executable, str(consumer)])
    try:
        await wait_for(lambda: (tmp_path / "consumer.pid").exists())
        with WebhookReceiver(fail_first=1) as hook:
            job = oauth2_job(oauth2_emulator, tmp_path, notify=[
                {"kind": "command", "argv": [sys.executable, str(script)], "timeout": "10s"},
                {"kind": "signal", "pid_file": str(tmp_path / "consumer.pid"), "signal": "HUP"},
                {"kind": "webhook", "url": hook.url, "secret_file": str(hmac_key), "retry_backoff": "50ms"},
            ])
            async with start_daemon({"jobs": [job]}) as daemon:
                rt = daemon.scheduler.jobs[("api", None)]
                await wait_for(lambda: env_dump.exists() and signals.exists() and len(hook.calls) == 2)
                await clock.set(rt.next_refresh_at)
                await wait_for(lambda: len(env_dump.read_text().splitlines()) == 2
                               and len(signals.read_text().splitlines()) == 2 and len(hook.calls) == 3)
                token = rt.token
        entries = [json.loads(line) for line in env_dump.read_text().splitlines()]
        assert entries[-1] == {"REFRESHER_JOB": "api", "REFRESHER_TENANT": "",
                               "REFRESHER_SINK_PATH": str(tmp_path / "api.token"),
                               "REFRESHER_EXPIRES_AT": entries[-1]["REFRESHER_EXPIRES_AT"]}
        assert entries[-1]["REFRESHER_EXPIRES_AT"].endswith("Z")
        assert token.value not in (tmp_path / "all_env.txt").read_text()
        headers, body = hook.calls[-1]
        payload = json.loads(body)
        assert payload == {"job": "api", "tenant": None, "expires_at": payload["expires_at"], "fingerprint": token.fingerprint()}
        expected = "sha256=" + hmac.new(b"webhook-hmac-key", body, hashlib.sha256).hexdigest()
        assert headers["x-refresher-signature"] == expected
        assert token.value.encode() not in b"".join(b for _, b in hook.calls)
    finally:
        proc.kill()
        await proc.wait()
        await proc.aclose()


async def test_hanging_notifier_is_killed_and_refreshing_goes_on(start_daemon, oauth2_emulator, clock, tmp_path, leak_guard) -> None:
    job = oauth2_job(oauth2_emulator, tmp_path, notify=[
        {"kind": "command", "argv": [sys.executable, "-c", "import time; time.sleep(60)"], "timeout": "300ms"}])
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        await clock.set(rt.next_refresh_at)
        await wait_for(lambda: oauth2_emulator.count() == 2 and rt.refreshing is None)
        await wait_for(lambda: len(leak_guard.events("notification failed")) == 2)
        assert "timed out after 0.3s and was killed" in leak_guard.events("notification failed")[0]["error"]
        status, text = await get_json(daemon, "/metrics")
        assert 'refresher_notify_failures_total{notifier="command",provider="oauth2",token_job="api"} 2.0' in text


# ------------------------------------------------------------------ systemd notify


async def test_sd_notify_ready_reloading_stopping(start_daemon, oauth2_emulator, tmp_path) -> None:
    sock_path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(sock_path))
    receiver.settimeout(5)
    config_path = tmp_path / "refresher.yaml"
    config = {"server": {"listen": "127.0.0.1:0"}, "jobs": [oauth2_job(oauth2_emulator, tmp_path)]}
    config_path.write_text(yaml.safe_dump(config))
    notifier = SystemdNotifier(str(sock_path))
    try:
        async with start_daemon(config, systemd=notifier, config_path=config_path) as daemon:
            ready = await anyio.to_thread.run_sync(receiver.recv, 4096)
            assert b"READY=1" in ready and b"STATUS=1/1 tokens valid" in ready
            assert await daemon.reload()
            reloading = await anyio.to_thread.run_sync(receiver.recv, 4096)
            assert b"RELOADING=1" in reloading
            assert b"READY=1" in await anyio.to_thread.run_sync(receiver.recv, 4096)
        assert b"STOPPING=1" in await anyio.to_thread.run_sync(receiver.recv, 4096)
    finally:
        notifier.close()
        receiver.close()
