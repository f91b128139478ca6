"""Bundle sinks (``kind: bundle``): the tokens of many jobs and tenants in one file,
read by real consumers (a POSIX shell, python-dotenv, Node's env-file parser),
rewritten atomically once per batch of changes with one notification per rewrite,
read back at restart, and following the documented rules for expired, withdrawn and
same-named members."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from dotenv import dotenv_values

import refresher.sinks.bundle as bundle_module
from refresher.clock import ManualClock
from refresher.config import BundleSinkConfig, load_settings
from refresher.demo.base import Fault
from refresher.errors import ConfigError, SinkError
from refresher.metrics import Metrics
from refresher.sinks.base import Rewrite
from refresher.sinks.bundle import Bundle, Entry, parse, render
from refresher.sinks.file import AtomicFile
from refresher.token import Token, fingerprint, rfc3339
from tests.conftest import deb_job, metric, oauth2_job, wait_for

pytestmark = pytest.mark.anyio


def members(path: Path) -> dict[str, str]:
    """NAME -> value of an env or dotenv bundle, as a shell sourcing it sees them."""
    script = 'set -a; . "$1"; env -0'
    out = subprocess.run(["sh", "-c", script, "sh", str(path)], capture_output=True, check=True)
    pairs = (item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    defined = {line.split("=", 1)[0] for line in lines if "=" in line}
    return {k: v for k, v in pairs if k in defined}


def with_bundle(
    debitura: Any,
    oauth2: Any,
    tmp_path: Path,
    bundle: dict[str, Any],
    *,
    tenants: list[str] | None = None,
) -> list[dict[str, Any]]:
    """A per-tenant Debitura job and an OAuth2 job, both members of `bundle`."""
    deb = deb_job(debitura, tmp_path, tenants or ["t-1", "t-2", "t-3"])
    deb["sinks"].append(bundle)
    api = oauth2_job(oauth2, tmp_path)
    api["sinks"].append(bundle)
    return [deb, api]


def all_written(daemon: Any) -> bool:
    jobs = daemon.scheduler.jobs.values()
    return all(r.token and r.refreshing is None and not r.unwritten for r in jobs)


def tokens_of(daemon: Any) -> dict[str, str]:
    """What each member's variable should hold: the daemon's current tokens."""
    names = {("api", None): "API"}
    names.update({("debitura", f"t-{i}"): f"DEBITURA_T_{i}" for i in range(1, 4)})
    return {names[key]: r.token.value for key, r in daemon.scheduler.jobs.items()}


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["env", "dotenv"])
async def test_env_bundles_read_the_same_in_a_shell_dotenv_and_node(
    start_daemon, debitura, oauth2_emulator, tmp_path, fmt
) -> None:
    path = tmp_path / f"tokens.{fmt}"
    bundle = {"kind": "bundle", "path": str(path), "format": fmt, "mode": "0640"}
    async with start_daemon(
        {"jobs": with_bundle(debitura, oauth2_emulator, tmp_path, bundle)}
    ) as daemon:
        await wait_for(lambda: all_written(daemon))
        expected = tokens_of(daemon)
    assert members(path) == expected
    assert dotenv_values(path) == expected
    assert path.stat().st_mode & 0o777 == 0o640
    node = shutil.which("node")
    if node is not None:  # process.loadEnvFile: Node 20.12 and later
        script = "process.loadEnvFile(process.argv[1]); console.log(JSON.stringify(process.env))"
        out = subprocess.run([node, "-e", script, str(path)], capture_output=True, text=True)
        if out.returncode == 0:
            seen = json.loads(out.stdout)
            assert {k: seen[k] for k in expected} == expected


async def test_json_bundle_maps_each_job_and_tenant_to_its_token(
    start_daemon, debitura, oauth2_emulator, tmp_path
) -> None:
    path = tmp_path / "tokens.json"
    bundle = {"kind": "bundle", "path": str(path), "format": "json"}
    async with start_daemon(
        {"jobs": with_bundle(debitura, oauth2_emulator, tmp_path, bundle)}
    ) as daemon:
        await wait_for(lambda: all_written(daemon))
        runtimes = dict(daemon.scheduler.jobs)
    document = json.loads(path.read_text())
    assert set(document) == {"api", "debitura/t-1", "debitura/t-2", "debitura/t-3"}
    entry, token = document["debitura/t-2"], runtimes[("debitura", "t-2")].token
    assert entry == {
        "job": "debitura",
        "tenant": "t-2",
        "value": token.value,
        "token_type": "Bearer",
        "expires_at": rfc3339(token.expires_at),
        "obtained_at": rfc3339(token.obtained_at),
        "fingerprint": token.fingerprint(),
    }
    assert document["api"]["tenant"] is None


# ---------------------------------------------------------------------------- batches


def token(value: str, *, expires_at: float = 5000.0) -> Token:
    return Token(value=value, token_type="Bearer", obtained_at=1000.0, expires_at=expires_at)


def bundle_in(tmp_path: Path, metrics: Metrics, rewrites: list[Rewrite], **config: Any) -> Bundle:
    spec = BundleSinkConfig(kind="bundle", path=str(tmp_path / "b.env"), **config)

    async def announce(rewrite: Rewrite) -> None:
        rewrites.append(rewrite)

    output = AtomicFile(tmp_path / "b.env", kind="bundle")
    return Bundle(spec, output, clock=ManualClock(start=2000.0), metrics=metrics, announce=announce)


async def test_changes_arriving_together_are_one_rewrite_that_all_of_them_wait_for(
    tmp_path,
) -> None:
    metrics, rewrites = Metrics(), []
    bundle = bundle_in(tmp_path, metrics, rewrites)
    sinks = [bundle.join("job", f"t{i}", "oauth2") for i in range(50)]
    sinks.append(bundle.join("other", None, "debitura"))
    async with anyio.create_task_group() as tg:
        for i, sink in enumerate(sinks):
            tg.start_soon(sink.write, token(f"tok-{i}"))
    writes = metrics.bundle_writes.labels(str(tmp_path / "b.env"))
    assert writes._value.get() == 1, "51 changes in one round: one rewrite"
    assert [r.jobs for r in rewrites] == [(("job", "oauth2"), ("other", "debitura"))]
    assert rewrites[0].fingerprint == fingerprint((tmp_path / "b.env").read_bytes())
    assert len(parse((tmp_path / "b.env").read_bytes(), "env")) == 51
    # The same token again changes nothing: no rewrite, no notification.
    await sinks[0].write(token("tok-0"))
    assert writes._value.get() == 1 and len(rewrites) == 1
    await sinks[0].write(token("tok-0b"))
    assert writes._value.get() == 2 and rewrites[-1].jobs == (("job", "oauth2"),)


async def test_a_reader_never_sees_a_torn_or_half_updated_bundle(tmp_path) -> None:
    bundle = bundle_in(tmp_path, Metrics(), [])
    path = tmp_path / "b.env"
    sinks = [bundle.join("job", f"t{i}", "oauth2") for i in range(20)]
    seen: list[tuple[int, set[str]]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                entries = parse(path.read_bytes(), "env").values()
                # Each value names its round: a whole file holds one round, every member.
                seen.append(
                    (len(entries), {e.token.value.split("-")[0] for e in entries if e.token})
                )

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(60):
            async with anyio.create_task_group() as tg:
                for i, sink in enumerate(sinks):
                    tg.start_soon(sink.write, token(f"r{round_}-m{i}"))
    finally:
        stop.set()
        reader.join(5)
    assert len({frozenset(rounds) for _, rounds in seen}) > 10, "the reader saw few rewrites"
    torn = [(count, rounds) for count, rounds in seen if count != 20 or len(rounds) != 1]
    assert torn == []


async def test_a_failed_rewrite_fails_every_change_in_it_and_keeps_the_file(tmp_path) -> None:
    metrics, rewrites = Metrics(), []
    (tmp_path / "d").mkdir()
    bundle = bundle_in(tmp_path / "d", metrics, rewrites)
    first, second = bundle.join("a", None, "oauth2"), bundle.join("b", None, "oauth2")
    await first.write(token("kept-1"))
    before = (tmp_path / "d" / "b.env").read_bytes()
    (tmp_path / "d").rename(tmp_path / "moved")  # every write now fails
    failures: list[str] = []

    async def write(sink: Any, value: str) -> None:
        try:
            await sink.write(token(value))
        except SinkError as exc:
            failures.append(str(exc))

    async with anyio.create_task_group() as tg:
        tg.start_soon(write, first, "new-1")
        tg.start_soon(write, second, "new-2")
    assert len(failures) == 2 and all("directory does not exist" in f for f in failures)
    assert (tmp_path / "moved" / "b.env").read_bytes() == before and len(rewrites) == 1
    # Both changes are still pending: the next write carries them (and its own).
    (tmp_path / "moved").rename(tmp_path / "d")
    await second.write(token("new-2"))
    assert {
        e.token.value
        for e in parse((tmp_path / "d" / "b.env").read_bytes(), "env").values()
        if e.token
    } == {"new-1", "new-2"}


async def test_one_rewrite_per_round_and_one_notification_per_rewrite(
    start_daemon, debitura, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(bundle_module, "BATCH_WINDOW", 0.3)  # a whole round in one batch
    path, log = tmp_path / "tokens.env", tmp_path / "notified"
    notify = 'echo "$REFRESHER_SINK_PATH $REFRESHER_FINGERPRINT" >> "$0"'
    job = deb_job(debitura, tmp_path, [f"t-{i}" for i in range(5)])
    job["sinks"] = [{"kind": "bundle", "path": str(path)}]
    job["notify"] = [{"kind": "command", "argv": ["sh", "-c", notify, str(log)]}]
    async with start_daemon({"jobs": [job]}) as daemon:
        await wait_for(lambda: all_written(daemon))
        await wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 2)
        await anyio.sleep(0.3)  # a notification per member would have come by now
        # The credential's first mint goes alone (its gate), the other four together.
        assert metric(daemon, "refresher_bundle_writes_total", bundle=str(path)) == 2
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and lines[-1] == f"{path} {fingerprint(path.read_bytes())}"


# ---------------------------------------------------------------------------- restart


@pytest.mark.parametrize("fmt", ["env", "json"])
async def test_a_restart_reads_the_bundle_back_and_mints_nothing(
    start_daemon, debitura, oauth2_emulator, tmp_path, fmt
) -> None:
    path = tmp_path / f"tokens.{fmt}"
    bundle = {"kind": "bundle", "path": str(path), "format": fmt}
    config = {"jobs": with_bundle(debitura, oauth2_emulator, tmp_path, bundle)}
    async with start_daemon(config) as daemon:
        await wait_for(lambda: all_written(daemon))
    before, mints = path.read_bytes(), debitura.count() + oauth2_emulator.count()
    async with start_daemon(config) as daemon:
        assert all(r.token is not None for r in daemon.scheduler.jobs.values())
        await anyio.sleep(0.05)
    assert debitura.count() + oauth2_emulator.count() == mints, "a restart re-minted"
    assert path.read_bytes() == before


async def test_a_member_whose_refresh_fails_keeps_its_value_while_others_change(
    start_daemon, debitura, oauth2_emulator, tmp_path
) -> None:
    path = tmp_path / "tokens.env"
    bundle = {"kind": "bundle", "path": str(path)}
    config = {"jobs": with_bundle(debitura, oauth2_emulator, tmp_path, bundle)}
    async with start_daemon(config) as daemon:
        await wait_for(lambda: all_written(daemon))
        api = daemon.scheduler.jobs[("api", None)]
        kept = api.token.value
        oauth2_emulator.inject(Fault.server_error(count=100))
        await daemon.scheduler.feedback.force("debitura", "t-1")
        await daemon.scheduler.feedback.force("api")
        assert api.failures == 1
        fresh = daemon.scheduler.jobs[("debitura", "t-1")].token.value
    assert members(path)["API"] == kept and members(path)["DEBITURA_T_1"] == fresh


async def test_refresher_once_writes_the_bundle_with_every_member(
    debitura, oauth2_emulator, clock, tmp_path, leak_guard
) -> None:
    from refresher.daemon import Daemon

    path = tmp_path / "tokens.env"
    bundle = {"kind": "bundle", "path": str(path)}
    settings = load_settings(
        data={"jobs": with_bundle(debitura, oauth2_emulator, tmp_path, bundle)}
    )
    daemon = Daemon(settings, clock=clock, redactor=leak_guard.redactor, serve_http=False)
    assert await daemon.refresh_all_once()
    assert set(members(path)) == {"API", "DEBITURA_T_1", "DEBITURA_T_2", "DEBITURA_T_3"}


@pytest.mark.parametrize(
    ("first", "second"), [("bundle", "bundle"), ("file", "bundle"), ("bundle", "file")]
)
async def test_a_second_daemon_on_a_bundles_directory_refuses_to_start(
    start_daemon, debitura, oauth2_emulator, tmp_path, first, second
) -> None:
    from refresher.errors import SinkOwnedError

    shared = tmp_path / "shared"
    shared.mkdir()
    sinks = {
        "bundle": {"kind": "bundle", "path": str(shared / "tokens.env")},
        "file": {"kind": "file", "path": str(shared / "{job}-{tenant}.token")},
    }
    holder = deb_job(debitura, tmp_path, ["t-1"])
    holder["sinks"] = [sinks[first]]
    other = oauth2_job(oauth2_emulator, tmp_path, sinks=[sinks[second]])
    if second == "file":
        other["sinks"] = [{"kind": "file", "path": str(shared / "api.token")}]
    async with start_daemon({"jobs": [holder]}) as daemon:
        await wait_for(lambda: all_written(daemon))
        before = sorted(p.name for p in shared.iterdir())
        with pytest.raises(SinkOwnedError, match=rf"already writes to {shared}"):
            async with start_daemon({"jobs": [other]}):
                pass
        assert oauth2_emulator.count() == 0, "the refused daemon minted"
        assert sorted(p.name for p in shared.iterdir()) == before
    if first == "bundle":
        assert set(members(shared / "tokens.env")) == {"DEBITURA_T_1"}


async def test_a_reload_keeps_the_bundle_and_mints_only_what_is_new(
    start_daemon, debitura, oauth2_emulator, tmp_path
) -> None:
    path = tmp_path / "tokens.env"
    bundle = {"kind": "bundle", "path": str(path)}
    jobs = with_bundle(debitura, oauth2_emulator, tmp_path, bundle)
    async with start_daemon({"jobs": jobs}) as daemon:
        await wait_for(lambda: all_written(daemon))
        before, mints = members(path), debitura.count()
        jobs[0]["provider"]["tenants"].append("t-4")  # the Debitura job changes
        new = load_settings(data={"jobs": jobs})
        assert await daemon.jobs.apply(new.jobs) == {
            "kept": 1,
            "added": 0,
            "removed": 0,
            "changed": 1,
        }
        await wait_for(lambda: all_written(daemon) and len(daemon.scheduler.jobs) == 5)
        assert debitura.count() == mints + 1, "only the new tenant was minted"
        after = members(path)
    assert after == {**before, "DEBITURA_T_4": after["DEBITURA_T_4"]}


async def test_a_reload_adds_and_removes_bundle_members(
    start_daemon, debitura, oauth2_emulator, tmp_path
) -> None:
    path, config_path = tmp_path / "tokens.env", tmp_path / "refresher.yaml"
    bundle = {"kind": "bundle", "path": str(path)}
    deb = deb_job(debitura, tmp_path, ["t-1", "t-2"])
    deb["sinks"] = [bundle]
    api = oauth2_job(oauth2_emulator, tmp_path, sinks=[bundle], on_remove="delete")
    reports = oauth2_job(oauth2_emulator, tmp_path, name="reports", sinks=[bundle])

    def configure(*jobs: dict[str, Any]) -> None:
        config_path.write_text(
            yaml.safe_dump({"server": {"listen": "127.0.0.1:0"}, "jobs": list(jobs)})
        )

    configure(deb, api)
    async with start_daemon({"jobs": [deb, api]}, config_path=config_path) as daemon:
        jobs = daemon.scheduler.jobs
        await wait_for(lambda: all_written(daemon))
        before, mints = members(path), debitura.count()
        assert set(before) == {"API", "DEBITURA_T_1", "DEBITURA_T_2"}
        # SIGHUP with `api` (on_remove: delete) gone and `reports` new: one joins, one leaves.
        configure(deb, reports)
        assert await daemon.reload()
        await wait_for(lambda: ("reports", None) in jobs and all_written(daemon))
        await wait_for(lambda: "API" not in members(path))
        assert members(path) == {
            "DEBITURA_T_1": before["DEBITURA_T_1"],
            "DEBITURA_T_2": before["DEBITURA_T_2"],
            "REPORTS": jobs[("reports", None)].token.value,
        }
        assert debitura.count() == mints, "an unchanged member was minted again"
        # `reports` (on_remove: keep) removed: its line stays until the next rewrite.
        configure(deb)
        assert await daemon.reload()
        assert "REPORTS" in members(path)
        await daemon.scheduler.feedback.force("debitura", "t-1")
        await wait_for(
            lambda: members(path).get("DEBITURA_T_1") == jobs[("debitura", "t-1")].token.value
        )
        assert set(members(path)) == {"DEBITURA_T_1", "DEBITURA_T_2"}


# ---------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("rule", ["keep", "omit", "mark"])
async def test_an_expired_member_follows_the_bundles_rule(
    start_daemon, oauth2_emulator, clock, tmp_path, leak_guard, rule
) -> None:
    path = tmp_path / "tokens.env"
    api = oauth2_job(oauth2_emulator, tmp_path)
    api["sinks"] = [{"kind": "bundle", "path": str(path), "expired": rule}]
    async with start_daemon({"jobs": [api]}) as daemon:
        runtime = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: all_written(daemon))
        value = runtime.token.value
        oauth2_emulator.inject(Fault.server_error(count=1000))
        await clock.advance(3700)  # past the expiry, every retry failing
        await wait_for(lambda: leak_guard.events("token expired without a replacement"))
        await anyio.sleep(0.05)
        text = path.read_text()
    if rule == "keep":
        assert members(path) == {"API": value}
    elif rule == "omit":
        assert members(path) == {} and "# API " not in text
    else:
        assert members(path) == {"API": ""} and "state=expired" in text
        assert "API=\n" in text


async def test_a_removed_tenant_leaves_the_bundle_at_once(start_daemon, debitura, tmp_path) -> None:
    path, tenants = tmp_path / "tokens.json", tmp_path / "tenants.txt"
    tenants.write_text("t-1\nt-2\n")
    job = deb_job(debitura, tmp_path, tenants_file=str(tenants))
    job["sinks"] = [{"kind": "bundle", "path": str(path), "format": "json"}]
    async with start_daemon({"jobs": [job]}) as daemon:
        await wait_for(lambda: len(daemon.scheduler.jobs) == 2 and all_written(daemon))
        await wait_for(lambda: len(json.loads(path.read_text())) == 2)
        tenants.write_text("t-2\n")
        await daemon.jobs.sync_tenants(daemon.jobs.configs["debitura"])
        assert set(json.loads(path.read_text())) == {"debitura/t-2"}


async def test_a_name_taken_at_run_time_leaves_the_member_out_logged_and_counted(
    start_daemon, debitura, tmp_path, leak_guard
) -> None:
    path, tenants = tmp_path / "tokens.env", tmp_path / "tenants.txt"
    tenants.write_text("acme-001\nacme.001\nt-2\n")
    job = deb_job(debitura, tmp_path, tenants_file=str(tenants))
    job["sinks"] = [{"kind": "bundle", "path": str(path)}]
    async with start_daemon({"jobs": [job]}) as daemon:
        jobs = daemon.scheduler.jobs
        await wait_for(lambda: len(jobs) == 3 and all_written(daemon))
        assert members(path) == {
            "DEBITURA_ACME_001": jobs[("debitura", "acme-001")].token.value,
            "DEBITURA_T_2": jobs[("debitura", "t-2")].token.value,
        }
        [skipped] = leak_guard.events("bundle member left out: another member has its name")
        assert (skipped["tenant"], skipped["name"]) == ("acme.001", "DEBITURA_ACME_001")
        assert metric(daemon, "refresher_bundle_members_skipped", bundle=str(path)) == 1
        # The holder leaves: the member left out takes the name, at once.
        tenants.write_text("acme.001\nt-2\n")
        await daemon.jobs.sync_tenants(daemon.jobs.configs["debitura"])
        assert members(path)["DEBITURA_ACME_001"] == jobs[("debitura", "acme.001")].token.value
        assert metric(daemon, "refresher_bundle_members_skipped", bundle=str(path)) == 0


def settings_with(
    sinks_a: list[dict[str, Any]],
    sinks_b: list[dict[str, Any]] | None = None,
    tenants: list[str] | None = None,
) -> dict[str, Any]:
    provider = {
        "kind": "oauth2",
        "token_url": "https://auth.example/token",
        "client_id": "c",
        "client_secret": "s",
    }
    jobs = [{"name": "a", "provider": provider, "sinks": sinks_a}]
    if tenants is not None:
        deb = {"kind": "debitura", "api_key": "k", "tenants": tenants}
        jobs = [{"name": "a", "provider": deb, "sinks": sinks_a}]
    if sinks_b is not None:
        jobs.append({"name": "b", "provider": provider, "sinks": sinks_b})
    return {"jobs": jobs}


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(data=data)
    return "\n".join(caught.value.errors)


def test_members_with_the_same_name_in_the_config_are_an_error_naming_both() -> None:
    bundle = {"kind": "bundle", "path": "/run/r/tokens.env"}
    message = refused(settings_with([bundle], tenants=["acme-001", "acme.001"]))
    assert message == (
        "jobs[0].sinks[0]: job 'a' tenant 'acme.001' and job 'a' tenant 'acme-001' are both "
        "named A_ACME_001 in bundle /run/r/tokens.env"
    )
    # A name per job settles it.
    load_settings(data=settings_with([{**bundle, "name": "X_{tenant}"}], tenants=["a-1", "b-1"]))


def test_two_sinks_on_one_target_are_an_error_naming_both_unless_one_bundle() -> None:
    env = {"kind": "bundle", "path": "/run/r/tokens.env"}
    file = {"kind": "file", "path": "/run/r/tokens.env"}
    assert "job 'b' and job 'a' would both write /run/r/tokens.env" in refused(
        settings_with([env], [file])
    )
    assert "would both write /run/r/tokens.env as different bundles" in refused(
        settings_with([env], [{**env, "format": "dotenv"}])
    )
    assert "sinks[0] and sinks[1] would both write /run/r/tokens.env" in refused(
        settings_with([env, file])
    )
    secret = {"kind": "bundle", "secret": "tokens", "key": "all", "namespace": "apps"}
    kube = {"kind": "kubernetes", "secret": "tokens", "key": "all", "namespace": "apps"}
    assert "would both write secret/apps/tokens#all" in refused(settings_with([secret], [kube]))
    # One bundle, many jobs: fine.
    load_settings(data=settings_with([env], [env]))
    load_settings(data=settings_with([secret], [{**secret, "name": "OTHER"}]))


def test_bundle_settings_that_cannot_work_are_refused() -> None:
    assert "no {job} or {tenant} in it" in refused(
        settings_with([{"kind": "bundle", "path": "/run/r/{job}.env"}])
    )
    assert "set exactly one of path" in refused(settings_with([{"kind": "bundle"}]))
    assert "needs key" in refused(settings_with([{"kind": "bundle", "secret": "x"}]))
    assert "name applies to env and dotenv" in refused(
        settings_with([{"kind": "bundle", "path": "/r/t.json", "format": "json", "name": "X"}])
    )
    assert "must contain {tenant}" in refused(
        settings_with([{"kind": "bundle", "path": "/r/t.env", "name": "DEB"}], tenants=["a"])
    )
    assert "mode only apply with path" in refused(
        settings_with([{"kind": "bundle", "secret": "x", "key": "k", "mode": "0640"}])
    )


def test_render_and_parse_agree_on_every_state() -> None:
    valid, old = token("tok-valid"), token("tok-old", expires_at=1500.0)
    entries = [
        Entry(("a", None), "A", valid),
        Entry(("b", "x y/ü"), "B_X_Y__", old, "expired"),
        Entry(("c", "t"), "C_T", None, "missing"),
    ]
    for fmt in ("env", "dotenv", "json"):
        back = parse(render(entries, fmt), fmt)
        assert back[("a", None)].token is not None
        assert back[("a", None)].token.value == "tok-valid"
        assert back[("b", "x y/ü")].state == "expired" and back[("b", "x y/ü")].token is None
        assert back[("c", "t")].state == "missing"
    assert parse(b"garbage\x00\xff", "env") == {} and parse(b"[1, 2]", "json") == {}


# ---------------------------------------------------------------------------- Kubernetes


async def test_a_bundle_kept_in_one_secret_key(
    start_daemon, debitura, make_emulator, clock, tmp_path
) -> None:
    from tests.emulators.kubernetes import KubernetesEmulator
    from tests.kube_rbac import SERVICE_ACCOUNT, install_chart_rbac

    kube = make_emulator(KubernetesEmulator, namespaces=["apps"], clock=clock)
    kube.add_token("sa-token", SERVICE_ACCOUNT)
    kubeconfig = kube.write_kubeconfig(
        tmp_path / "kubeconfig", namespace="apps", token="sa-token", user="refresher"
    )
    job = deb_job(debitura, tmp_path, ["t-1", "t-2", "t-3"])
    job["sinks"] = [
        {
            "kind": "bundle",
            "secret": "partner-tokens",
            "key": "tokens.env",
            "namespace": "apps",
            "kubeconfig": str(kubeconfig),
        }
    ]
    config = {"jobs": [job]}
    install_chart_rbac(kube, config)  # what the chart grants for this config, no more
    async with start_daemon(config) as daemon:
        await wait_for(lambda: all_written(daemon))
        expected = {
            f"DEBITURA_{k[1].upper().replace('-', '_')}": r.token.value
            for k, r in daemon.scheduler.jobs.items()
        }
    secret = kube.secret("apps", "partner-tokens")
    assert set(secret["data"]) == {"tokens.env"}
    content = kube.secret_data("apps", "partner-tokens")["tokens.env"]
    (tmp_path / "mounted.env").write_text(content)
    assert members(tmp_path / "mounted.env") == expected
    annotations = secret["metadata"]["annotations"]
    assert annotations["refresher.io/tokens.env.fingerprint"] == fingerprint(content)
    # A restart reads the Secret back: nothing is minted again.
    mints = debitura.count()
    async with start_daemon(config) as daemon:
        assert all(r.token is not None for r in daemon.scheduler.jobs.values())
    assert debitura.count() == mints


def test_check_refuses_a_secret_bundle_that_cannot_fit(tmp_path) -> None:
    from refresher.cli import main

    bundle = {"kind": "bundle", "secret": "partner-tokens", "key": "tokens.env"}
    small = settings_with([bundle], tenants=[f"t-{i}" for i in range(100)])
    load_settings(data=small)
    message = refused(settings_with([bundle], tenants=[f"t-{i}" for i in range(600)]))
    assert "would hold 600 tokens" in message and "more than the 1 MiB a Secret holds" in message
    # Tenants from a tenants_file are known to `check` only: it counts them too.
    tenants = tmp_path / "tenants.txt"
    tenants.write_text("".join(f"tenant-{i}\n" for i in range(600)))
    config = settings_with([bundle], tenants=["t-0"])
    config["jobs"][0]["provider"] = {
        "kind": "debitura",
        "api_key": "k",
        "tenants_file": str(tenants),
    }
    (tmp_path / "refresher.yaml").write_text(json.dumps(config))
    assert main(["check", "--config", str(tmp_path / "refresher.yaml")]) == 2
    tenants.write_text("".join(f"tenant-{i}\n" for i in range(100)))
    assert main(["check", "--config", str(tmp_path / "refresher.yaml")]) == 0


async def test_content_over_the_secret_limit_is_refused_and_the_secret_kept(
    kube, kubeconfig, clients
) -> None:
    from refresher.errors import KubernetesSinkError
    from tests.kube_support import NS, SECRET, sink

    secret = sink(kubeconfig, clients, key="tokens.env", namespace=NS)
    await secret.put(b"A=1\n")
    with pytest.raises(KubernetesSinkError, match="do not fit in a Secret"):
        await secret.put(b"A=" + b"x" * (1024 * 1024) + b"\n")
    assert kube.secret_data(NS, SECRET) == {"tokens.env": "A=1\n"}
