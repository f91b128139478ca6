"""Fault isolation (supervision): an unexpected exception at any of a
job's boundaries is caught there, logged once with its traceback, counted, and the
job retries; the daemon and every other job keep running.

Each test injects a bug (a plain `RuntimeError`, what no code path expects) at one
boundary with monkeypatching: these are in-process fakes of *bugs*, which cannot be
provoked from outside on purpose.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from refresher.clock import SystemClock
from refresher.config import BackoffConfig, RefreshConfig
from refresher.policy import MAX_BACKOFF_EXPONENT, backoff_delay
from refresher.token import Token
from tests.conftest import CLIENT_SECRET, get_json, metric, oauth2_job, wait_for
from tests.hostile.conftest import alive, all_minted

pytestmark = pytest.mark.anyio


class Bug(RuntimeError):
    """What a bug in refresher looks like from the outside."""


def two_jobs(emu: Any, tmp_path: Path, **api: Any) -> dict[str, Any]:
    (tmp_path / "other").mkdir(exist_ok=True)
    return {
        "jobs": [
            oauth2_job(emu, tmp_path, **api),
            oauth2_job(emu, tmp_path / "other", name="other"),
        ]
    }


def fails_once(original: Any) -> Any:
    calls = {"n": 0}

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Bug("injected")
        return await original(*args, **kwargs)

    return wrapper


async def test_bug_in_a_refresh_is_that_jobs_failure_only(
    start_daemon, oauth2_emulator, clock, tmp_path, leak_guard
) -> None:
    async with start_daemon(two_jobs(oauth2_emulator, tmp_path)) as daemon:
        jobs = daemon.scheduler.jobs
        api, other = jobs[("api", None)], jobs[("other", None)]
        await wait_for(lambda: all_minted(daemon))
        api.provider.fetch = fails_once(api.provider.fetch)  # type: ignore[method-assign]
        before = other.token
        await daemon.scheduler.refresh(api, force=True)
        assert api.failure_reason == "internal" and api.failures == 1
        assert metric(daemon, "refresher_internal_errors_total", component="refresh") == 1
        assert metric(daemon, "refresher_refresh_failures_total", token_job="api", reason="internal") == 1
        [logged] = leak_guard.events("internal error")
        assert logged["component"] == "refresh" and "Bug: injected" in logged["exception"]
        # The API says "internal", not the bug's text.
        _, body = await get_json(daemon, "/v1/tokens", leak_guard)
        entry = next(j for j in body["jobs"] if j["job"] == "api")
        assert entry["last_error"] == "internal" and "injected" not in str(entry)
        # The job retries on its own (backoff on the injected clock) and recovers.
        await clock.advance(api.backoff + 0.01)
        await wait_for(lambda: api.failures == 0 and api.refreshing is None)
        assert other.token is before and other.failures == 0
        assert alive(daemon)


async def test_bug_in_a_log_line_of_the_write_path(start_daemon, oauth2_emulator, tmp_path) -> None:
    async with start_daemon(two_jobs(oauth2_emulator, tmp_path)) as daemon:
        jobs = daemon.scheduler.jobs
        api = jobs[("api", None)]
        await wait_for(lambda: all_minted(daemon))

        class BrokenLog:
            def __getattr__(self, name: str) -> Any:
                def fail(*args: Any, **kwargs: Any) -> None:
                    raise Bug(f"log.{name}")

                return fail

        good_log, api.bound_log = api.bound_log, BrokenLog()
        await daemon.scheduler.refresh(api, force=True)
        assert metric(daemon, "refresher_internal_errors_total", component="refresh") == 1
        api.bound_log = good_log
        await daemon.scheduler.refresh(api, force=True)
        assert api.failures == 0
        await daemon.scheduler.refresh(jobs[("other", None)], force=True)
        assert jobs[("other", None)].failures == 0 and alive(daemon)


async def test_bug_in_read_back_at_start_mints_instead(start_daemon, oauth2_emulator, tmp_path, monkeypatch) -> None:
    from refresher.sinks.file import FileSink

    async def broken(self: FileSink) -> Token | None:
        raise Bug("read_back")

    monkeypatch.setattr(FileSink, "read_back", broken)
    async with start_daemon(two_jobs(oauth2_emulator, tmp_path)) as daemon:
        await wait_for(lambda: all_minted(daemon))
        assert metric(daemon, "refresher_internal_errors_total", component="read_back") == 2
        assert alive(daemon)


async def test_bug_in_a_notification_hook_keeps_the_written_token(
    start_daemon, oauth2_emulator, tmp_path
) -> None:
    async with start_daemon(two_jobs(oauth2_emulator, tmp_path)) as daemon:
        jobs = daemon.scheduler.jobs
        await wait_for(lambda: all_minted(daemon))

        def hook(runtime: Any, token: Token) -> None:
            raise Bug("hook")

        async def slow_bug() -> None:
            raise Bug("notifier task")

        daemon.scheduler.publisher.written_hooks.append(hook)
        daemon.scheduler.publisher.written_hooks.append(lambda runtime, token: slow_bug())
        api = jobs[("api", None)]
        await daemon.scheduler.refresh(api, force=True)
        await wait_for(lambda: metric(daemon, "refresher_internal_errors_total", component="notify") == 2)
        assert api.failures == 0 and (tmp_path / "api.token").read_text().strip() == api.token.value
        assert alive(daemon)


async def test_bug_in_expiry_handling(start_daemon, oauth2_emulator, clock, tmp_path, monkeypatch) -> None:
    from refresher.demo.base import Fault
    from refresher.sinks.file import FileSink

    async def broken(self: FileSink) -> None:
        raise Bug("remove")

    monkeypatch.setattr(FileSink, "remove", broken)
    config = two_jobs(oauth2_emulator, tmp_path, on_expiry="remove")
    async with start_daemon(config) as daemon:
        api = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: all_minted(daemon))
        oauth2_emulator.inject(Fault.server_error(count=1000))
        await clock.set(api.token.expires_at + 1)
        await wait_for(lambda: metric(daemon, "refresher_internal_errors_total", component="expiry") == 1)
        assert alive(daemon)


async def test_bug_in_a_watcher_callback_and_in_tenant_sync(
    start_daemon, debitura, tmp_path, monkeypatch
) -> None:
    from tests.conftest import deb_job

    tenants = tmp_path / "tenants.txt"
    tenants.write_text("t-1\n")
    secret = tmp_path / "api-key"
    secret.write_text("debitura-api-key-value-123\n")
    job = deb_job(debitura, tmp_path, tenants_file=str(tenants))
    del job["provider"]["api_key"]
    job["provider"]["api_key_file"] = str(secret)
    async with start_daemon({"jobs": [job]}, clock=SystemClock()) as daemon:
        jobs = daemon.scheduler.jobs
        await wait_for(lambda: ("debitura", "t-1") in jobs and jobs[("debitura", "t-1")].token)
        await wait_for(lambda: daemon.watcher.ready.is_set())
        # The rotation callback hits a bug ...
        provider = daemon.jobs.providers["debitura"]
        monkeypatch.setattr(provider, "secrets", lambda: (_ for _ in ()).throw(Bug("secrets")))
        secret.write_text("debitura-api-key-value-123 \n".strip() + "\n\n")
        await wait_for(lambda: metric(daemon, "refresher_internal_errors_total", component="watch") == 1)
        # ... and so does the tenant sync; the watcher keeps watching through both.
        monkeypatch.setattr(daemon.jobs, "_build_tenants", lambda *a: (_ for _ in ()).throw(Bug("tenants")))
        tenants.write_text("t-1\nt-2\n")
        await wait_for(lambda: metric(daemon, "refresher_internal_errors_total", component="tenants") == 1)
        monkeypatch.undo()
        tenants.write_text("t-1\nt-2\nt-3\n")
        await wait_for(lambda: ("debitura", "t-3") in jobs and jobs[("debitura", "t-3")].token)
        assert alive(daemon)


async def test_bug_in_a_reload_leaves_the_running_jobs(
    start_daemon, oauth2_emulator, tmp_path, monkeypatch
) -> None:
    import yaml

    config = two_jobs(oauth2_emulator, tmp_path)
    path = tmp_path / "config.yaml"
    async with start_daemon(config, config_path=path) as daemon:
        jobs = daemon.scheduler.jobs
        await wait_for(lambda: all_minted(daemon))
        changed = two_jobs(oauth2_emulator, tmp_path)
        (tmp_path / "third").mkdir()
        changed["jobs"].append(oauth2_job(oauth2_emulator, tmp_path / "third", name="third"))
        path.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, **changed}))

        async def broken(job: Any) -> None:
            raise Bug("add_job")

        monkeypatch.setattr(daemon.jobs, "add", broken)
        assert await daemon.reload() is True
        assert metric(daemon, "refresher_internal_errors_total", component="reload") == 1
        assert set(jobs) == {("api", None), ("other", None)} and alive(daemon)


async def test_bug_in_an_http_handler_is_a_500(
    start_daemon, oauth2_emulator, tmp_path, monkeypatch, leak_guard
) -> None:
    async with start_daemon(two_jobs(oauth2_emulator, tmp_path)) as daemon:
        monkeypatch.setattr(daemon.scheduler, "statuses", lambda: (_ for _ in ()).throw(Bug(CLIENT_SECRET)))
        status, body = await get_json(daemon, "/v1/tokens", leak_guard)
        assert status == 500 and body == {"error": "internal error"}
        assert metric(daemon, "refresher_internal_errors_total", component="server") == 1
        # The secret in the bug's message was redacted in the log (the leak guard checks).
        assert (await get_json(daemon, "/healthz"))[0] == 200 and alive(daemon)


def test_backoff_never_overflows() -> None:
    policy = BackoffConfig(initial=0.001, max=300)
    rng = random.Random(1)
    for failures in (1, 63, 64, 1025, 10**6, 10**18):
        delay = backoff_delay(failures, policy, rng)
        assert 0.0001 <= delay <= 300
    assert backoff_delay(10**6, BackoffConfig(initial=1e300, max=1e300), rng) <= 1e300
    assert MAX_BACKOFF_EXPONENT < 1024


async def test_a_thousand_failures_in_a_row_keep_the_job_retrying(
    start_daemon, oauth2_emulator, clock, tmp_path
) -> None:
    from refresher.demo.base import Fault

    config = two_jobs(oauth2_emulator, tmp_path)
    config["refresh"] = RefreshConfig(backoff=BackoffConfig(initial=0.001, max=0.01)).model_dump()
    async with start_daemon(config) as daemon:
        api = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: all_minted(daemon))
        api.failures = 1500  # as after a long outage with a small backoff
        oauth2_emulator.inject(Fault.server_error())
        await daemon.scheduler.refresh(api, force=True)
        assert api.failures == 1501 and api.backoff <= 0.01
        await daemon.scheduler.refresh(api, force=True)
        assert api.failures == 0 and alive(daemon)
    async with httpx2.AsyncClient() as client:  # the emulator is still fine
        assert (await client.post(oauth2_emulator.token_url)).status_code == 400
    await anyio.sleep(0)
