"""One writer per file-sink directory: a second refresher on the same
directory refuses to start (exit 2, the holder's pid in the message) instead of
minting and overwriting the first one's files; a directory that appears later under
another process's lock fails only the writes into it; a leader waits for a held
lock instead of writing. The "other process" is a real one: another `refresher run`
or a small `python -c` that holds the lock."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from refresher.config import FileSinkConfig
from refresher.errors import Refusal, SinkError, SinkOwnedError
from refresher.sinks.file import FileSink
from refresher.sinks.lock import DirectoryLocks, holder_pid
from refresher.token import Token
from tests.conftest import CLIENT_ID, CLIENT_SECRET, oauth2_job, wait_for
from tests.emulators.kubernetes import KubernetesEmulator
from tests.emulators.oauth2 import OAuth2Emulator
from tests.kube_rbac import SERVICE_ACCOUNT, install_chart_rbac

SECOND_ID, SECOND_SECRET = "second-client", "second-client-secret-value"
#: The exact sentence an operator sees.
REFUSED = (
    "another refresher already writes to {dir} (lock held by pid {pid}): "
    "stop it or give this daemon its own sink directory"
)

#: Log events an operator greps for.
OWNED = "sink directory owned by another process: not writing there"
UNLOCKABLE = "cannot lock sink directory: a second refresher writing there would go unnoticed"
WAITING = "sink directories owned by another process: their jobs wait for the lock"
RESUMED = "sink directory lock acquired: resuming its jobs"

HOLD = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)


@contextmanager
def held_by_another_process(directory: Path) -> Iterator[subprocess.Popen[str]]:
    """A separate process holding `directory`'s lock until the block ends (or `free`)."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", HOLD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        free(proc)


def free(holder: subprocess.Popen[str]) -> None:
    if holder.stdin is not None and not holder.stdin.closed:
        holder.stdin.close()
    holder.wait(10)


def token(value: str = "tok-ownership") -> Token:
    return Token(value=value, token_type="Bearer", obtained_at=1000.0, expires_at=5000.0)


# ------------------------------------------------------------------ the lock itself
# flock locks belong to an open file description: two DirectoryLocks in one process
# conflict exactly as two processes do.


def test_second_owner_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first, second = DirectoryLocks(), DirectoryLocks()
    try:
        assert first.acquire([str(tmp_path)]) == []
        refusals = second.acquire([str(tmp_path)])
        assert refusals == [Refusal(str(tmp_path), pid=os.getpid())]
        assert str(SinkOwnedError(refusals)) == REFUSED.format(dir=tmp_path, pid=os.getpid())
        # A holder the kernel does not name (another pid namespace) is still described.
        assert str(SinkOwnedError([Refusal("/run/refresher")])) == (
            "another refresher already writes to /run/refresher (lock held by another "
            "refresher process): stop it or give this daemon its own sink directory"
        )
        assert not second.holds(str(tmp_path))
        assert os.listdir(tmp_path) == [], "locking created something in the consumer's directory"
    finally:
        first.release_all()
        second.release_all()


def test_holder_pid_is_read_from_the_kernel(tmp_path: Path) -> None:
    with held_by_another_process(tmp_path) as holder:
        assert holder_pid(os.stat(tmp_path)) == holder.pid
        locks = DirectoryLocks()
        assert locks.acquire([str(tmp_path)]) == [Refusal(str(tmp_path), pid=holder.pid)]
    assert holder_pid(os.stat(tmp_path)) is None
    assert locks.acquire([str(tmp_path)]) == [], "the lock outlived its holder"
    locks.release_all()


def test_one_lock_per_directory_however_many_sinks_and_spellings(tmp_path: Path) -> None:
    (tmp_path / "via-link").symlink_to(tmp_path, target_is_directory=True)
    locks, other = DirectoryLocks(), DirectoryLocks()
    spellings = [str(tmp_path)] * 10_000 + [f"{tmp_path}/.", str(tmp_path / "via-link")]
    try:
        assert locks.acquire(spellings) == []
        # One descriptor and one kernel lock, not one per tenant or spelling.
        fds = [
            fd
            for fd in os.listdir("/proc/self/fd")
            if os.path.realpath(f"/proc/self/fd/{fd}") == str(tmp_path)
        ]
        stat = os.stat(tmp_path)
        inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
        kernel = [line.split() for line in Path("/proc/locks").read_text().splitlines()]
        on_it = [fields for fields in kernel if len(fields) > 5 and fields[5] == inode]
        assert len(fds) == 1
        assert [(fields[1], fields[4]) for fields in on_it] == [("FLOCK", str(os.getpid()))]
        assert all(locks.holds(s) for s in spellings)
        locks.claim(str(tmp_path / "via-link"))  # its own lock does not refuse it
        assert [r.directory for r in other.acquire([str(tmp_path / "via-link")])] == [
            str(tmp_path / "via-link")
        ]
    finally:
        locks.release_all()
        other.release_all()


def test_per_tenant_directories_never_take_more_than_the_descriptor_budget(
    tmp_path: Path, leak_guard: Any
) -> None:
    tenants = [tmp_path / f"tenant-{i}" for i in range(5)]
    for directory in tenants:
        directory.mkdir()
    locks = DirectoryLocks(max_locks=3)
    try:
        with held_by_another_process(tenants[4]):
            # The fifth is beyond the budget: written unchecked rather than refused.
            assert locks.acquire(str(d) for d in tenants) == []
            locks.claim(str(tenants[4]))
        assert sum(locks.holds(str(d)) for d in tenants) == 5
        other = DirectoryLocks()
        assert len(other.acquire(str(d) for d in tenants)) == 3
        other.release_all()
        warned = leak_guard.events(UNLOCKABLE)
        assert [w["reason"] for w in warned] == ["more than 3 directories"], (
            "one line, not one per directory"
        )
        # The default budget leaves three quarters of the open-file limit to the rest.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert DirectoryLocks().max_locks == soft // 4
    finally:
        locks.release_all()


def test_release_all_frees_the_directory_and_stops_claims(tmp_path: Path) -> None:
    first, second = DirectoryLocks(), DirectoryLocks()
    assert first.acquire([str(tmp_path)]) == []
    first.release_all()
    assert second.acquire([str(tmp_path)]) == []
    # A replica that stopped leading must not quietly lock and write again.
    with pytest.raises(SinkError, match="not leading"):
        first.claim(str(tmp_path))
    second.release_all()


def test_missing_directory_is_locked_at_the_first_claim(tmp_path: Path, leak_guard: Any) -> None:
    late = tmp_path / "late"
    locks = DirectoryLocks()
    assert locks.acquire([str(late)]) == [], "a missing directory cannot be locked yet"
    late.mkdir()
    with held_by_another_process(late) as holder:
        for _ in range(3):
            with pytest.raises(SinkOwnedError) as refused:
                locks.claim(str(late))
            assert str(refused.value) == REFUSED.format(dir=late, pid=holder.pid)
        owned = leak_guard.events(OWNED)
        assert len(owned) == 1, "logged once, not once per retried write"
        assert owned[0]["holder_pid"] == holder.pid
    locks.claim(str(late))
    assert locks.holds(str(late))
    assert leak_guard.events("sink directory lock acquired")[0]["directory"] == str(late)
    locks.release_all()


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any directory")
def test_directory_that_cannot_be_opened_is_written_with_a_warning(
    tmp_path: Path, leak_guard: Any
) -> None:
    blind = tmp_path / "blind"
    blind.mkdir(mode=0o300)  # writable, not readable: the lock cannot be taken
    locks = DirectoryLocks()
    try:
        assert locks.acquire([str(blind)]) == []
        locks.claim(str(blind))
        assert locks.holds(str(blind))
        assert len(leak_guard.events(UNLOCKABLE)) == 1
    finally:
        locks.release_all()
        blind.chmod(0o700)


# ------------------------------------------------------------------ the file sink


def locked_sink(path: Path, locks: DirectoryLocks) -> FileSink:
    sink = FileSink(FileSinkConfig(kind="file", path=str(path)), path)
    sink.locks = locks
    return sink


@pytest.mark.anyio
async def test_file_sink_neither_writes_removes_nor_sweeps_in_a_directory_owned_elsewhere(
    tmp_path: Path,
) -> None:
    target = tmp_path / "api.token"
    target.write_text("the other writer's token\n")
    in_flight = tmp_path / ".api.token.tmp-0badc0de"  # the other writer's write in progress
    in_flight.write_text("half")
    ours = DirectoryLocks()
    ours.acquire([])
    sink = locked_sink(target, ours)
    with held_by_another_process(tmp_path) as holder:
        await sink.read_back()
        assert in_flight.exists(), "swept another live writer's temp file"
        with pytest.raises(SinkOwnedError, match=f"lock held by pid {holder.pid}"):
            await sink.write(token())
        with pytest.raises(SinkOwnedError):
            await sink.remove()
        assert target.read_text() == "the other writer's token\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == [in_flight.name, "api.token"]
    await sink.write(token())  # the lock is free now: taken at this write
    assert ours.holds(str(tmp_path))
    assert target.read_text() == "tok-ownership\n"
    assert not in_flight.exists(), "once owned, crash leftovers are swept"
    ours.release_all()


# ------------------------------------------------------------------ real daemons


@pytest.fixture
def emulator(leak_guard: Any) -> Iterator[OAuth2Emulator]:
    # 2 s tokens: a running daemon rewrites its file about every 1.5 s.
    clients = {CLIENT_ID: CLIENT_SECRET, SECOND_ID: SECOND_SECRET}
    with OAuth2Emulator(clients=clients, token_lifetime=2) as emu:
        leak_guard.emulators.append(emu)
        leak_guard.secrets.add(SECOND_SECRET)
        yield emu


def until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def daemon_config(
    tmp_path: Path, emulator: OAuth2Emulator, name: str, sink_dir: Path, *, client: str = CLIENT_ID
) -> Path:
    secret = tmp_path / f"{client}.secret"
    secret.write_text({CLIENT_ID: CLIENT_SECRET, SECOND_ID: SECOND_SECRET}[client])
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"listen": "127.0.0.1:0"},
                "logging": {"format": "json"},
                "jobs": [
                    {
                        "name": name,
                        "provider": {
                            "kind": "oauth2",
                            "token_url": emulator.token_url,
                            "client_id": client,
                            "client_secret_file": str(secret),
                        },
                        "sinks": [{"kind": "file", "path": str(sink_dir / f"{name}.token")}],
                    }
                ],
            }
        )
    )
    return config


class Daemons:
    """`refresher` processes of one test: started, read back, always stopped."""

    def __init__(self, tmp_path: Path, leak_guard: Any) -> None:
        self.tmp_path = tmp_path
        self.leak_guard = leak_guard
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, command: str, config: Path) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"{command}-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "refresher", command, "--config", str(config)],
                stdout=out,
                stderr=out,
            )
        self.procs.append((proc, log))
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        return next(log for p, log in self.procs if p is proc).read_text()

    def stop(self, proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> int:
        proc.send_signal(sig)
        return proc.wait(15)

    def close(self) -> None:
        for proc, log in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.leak_guard.extra_outputs.append(log.read_text())


@pytest.fixture
def daemons(tmp_path: Path, leak_guard: Any) -> Iterator[Daemons]:
    started = Daemons(tmp_path, leak_guard)
    yield started
    started.close()


def changes(path: Path) -> Callable[[], bool]:
    """True once `path` holds something other than what it holds now."""
    before = path.read_bytes() if path.exists() else None
    return lambda: path.exists() and path.read_bytes() != before


def test_second_daemon_on_the_same_directory_refuses_and_the_first_keeps_writing(
    tmp_path: Path, emulator: OAuth2Emulator, daemons: Daemons
) -> None:
    shared, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    shared.mkdir()
    elsewhere.mkdir()
    first_cfg = daemon_config(tmp_path, emulator, "first", shared)
    second_cfg = daemon_config(tmp_path, emulator, "second", shared, client=SECOND_ID)
    first = daemons.start("run", first_cfg)
    # A daemon on a directory of its own runs alongside.
    neighbour = daemons.start("run", daemon_config(tmp_path, emulator, "neighbour", elsewhere))
    until(
        lambda: (shared / "first.token").exists() and (elsewhere / "neighbour.token").exists(),
        what="both daemons' tokens",
    )

    first_writes, neighbour_writes = (
        changes(shared / "first.token"),
        changes(elsewhere / "neighbour.token"),
    )
    # A second daemon and a `once` on the same directory, side by side: both refuse;
    # `check` reads the config only and takes no lock.
    second = daemons.start("run", second_cfg)
    once = daemons.start("once", second_cfg)
    check = daemons.start("check", second_cfg)
    assert second.wait(60) == 2 and once.wait(60) == 2 and check.wait(60) == 0
    expected = REFUSED.format(dir=shared, pid=first.pid)
    for refused, verb in ((second, "start"), (once, "run")):
        output = daemons.output(refused)
        assert f"refusing to {verb}: {expected}" in output
        assert "Traceback" not in output
    assert emulator.count(client=SECOND_ID) == 0, "the refused daemon minted"
    assert not (shared / "second.token").exists()

    until(first_writes, what="the first daemon to keep writing")
    until(neighbour_writes, what="the neighbour to keep writing")
    assert first.poll() is None and neighbour.poll() is None
    assert daemons.stop(first) == 0

    # Released at exit: the next one starts; and the kernel releases it on SIGKILL too.
    third = daemons.start("run", second_cfg)
    until(lambda: (shared / "second.token").exists(), what="a daemon after SIGTERM")
    assert daemons.stop(third, signal.SIGKILL) == -signal.SIGKILL
    fourth = daemons.start("run", first_cfg)
    until(changes(shared / "first.token"), what="a daemon after SIGKILL")
    assert fourth.poll() is None and neighbour.poll() is None
    assert daemons.stop(fourth) == 0 and daemons.stop(neighbour) == 0
    assert "refusing" not in daemons.output(fourth) + daemons.output(neighbour)


# ------------------------------------------------------------------ in-process daemons


@pytest.mark.anyio
async def test_directory_created_later_under_another_lock_fails_its_writes_only(
    start_daemon: Any, oauth2_emulator: Any, clock: Any, tmp_path: Path, leak_guard: Any
) -> None:
    late = tmp_path / "late"
    jobs = [
        oauth2_job(oauth2_emulator, tmp_path),
        oauth2_job(
            oauth2_emulator,
            tmp_path,
            name="late",
            sinks=[{"kind": "file", "path": str(late / "late.token")}],
        ),
    ]
    async with start_daemon({"jobs": jobs}) as daemon:
        api, rt = daemon.scheduler.jobs[("api", None)], daemon.scheduler.jobs[("late", None)]
        await wait_for(
            lambda: (
                api.token is not None
                and rt.failures == 1
                and api.refreshing is None
                and rt.refreshing is None
            )
        )
        assert "directory does not exist" in (rt.failure_message or "")
        late.mkdir()
        with held_by_another_process(late) as holder:
            for attempt in range(2, 5):
                await clock.set(rt.next_refresh_at)
                await wait_for(lambda a=attempt: rt.failures == a and rt.refreshing is None)
                assert rt.failure_reason == "sink"
                assert REFUSED.format(dir=late, pid=holder.pid) in (rt.failure_message or "")
            assert list(late.iterdir()) == []
            assert oauth2_emulator.count() == 2, "a refused write re-minted"
            assert len(leak_guard.events(OWNED)) == 1, "logged once, not once per retried write"
            # The other job keeps its schedule.
            written = changes(tmp_path / "api.token")
            await clock.set(api.next_refresh_at)
            await wait_for(lambda: written() and api.refreshing is None)
            assert (tmp_path / "api.token").read_text().strip() == api.token.value
            assert api.failure_reason is None
        await clock.set(rt.next_refresh_at)
        await wait_for(lambda: (late / "late.token").exists() and rt.refreshing is None)
        assert (late / "late.token").read_text().strip() == rt.token.value
        assert rt.failure_reason is None


@pytest.mark.anyio
async def test_reload_adding_a_job_in_an_owned_directory_adds_the_others(
    start_daemon: Any, oauth2_emulator: Any, clock: Any, tmp_path: Path
) -> None:
    owned = tmp_path / "owned"
    owned.mkdir()
    config_path = tmp_path / "refresher.yaml"
    base = {"server": {"listen": "127.0.0.1:0"}, "jobs": [oauth2_job(oauth2_emulator, tmp_path)]}
    config_path.write_text(yaml.safe_dump(base))
    async with start_daemon(base, config_path=config_path) as daemon:
        api = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: api.token is not None and api.refreshing is None)
        with held_by_another_process(owned) as holder:
            config_path.write_text(
                yaml.safe_dump(
                    {
                        **base,
                        "jobs": [
                            *base["jobs"],
                            oauth2_job(
                                oauth2_emulator,
                                tmp_path,
                                name="owned",
                                sinks=[{"kind": "file", "path": str(owned / "owned.token")}],
                            ),
                            oauth2_job(
                                oauth2_emulator,
                                tmp_path,
                                name="fresh",
                                sinks=[{"kind": "file", "path": str(tmp_path / "fresh.token")}],
                            ),
                        ],
                    }
                )
            )
            assert await daemon.reload() is True
            jobs = daemon.scheduler.jobs
            assert {("api", None), ("owned", None), ("fresh", None)} <= set(jobs)
            fresh, blocked = jobs[("fresh", None)], jobs[("owned", None)]
            await wait_for(
                lambda: (
                    fresh.token is not None
                    and fresh.refreshing is None
                    and blocked.failures == 1
                    and blocked.refreshing is None
                )
            )
            assert REFUSED.format(dir=owned, pid=holder.pid) in (blocked.failure_message or "")
            assert (tmp_path / "fresh.token").read_text().strip() == fresh.token.value
            assert list(owned.iterdir()) == []
            assert api.valid(clock.now())


# ------------------------------------------------------------------ leader election

NS = "apps"


@pytest.fixture
def kube(make_emulator: Any, clock: Any) -> KubernetesEmulator:
    return make_emulator(KubernetesEmulator, namespaces=[NS], clock=clock)


def replica_config(
    oauth2: Any, kube: KubernetesEmulator, tmp_path: Path, identity: str, sink_dir: Path
) -> dict[str, Any]:
    kube.add_token(f"sa-token-{identity}", SERVICE_ACCOUNT)
    kubeconfig = kube.write_kubeconfig(
        tmp_path / f"kubeconfig-{identity}",
        namespace=NS,
        token=f"sa-token-{identity}",
        user=identity,
    )
    config = {
        "jobs": [
            oauth2_job(
                oauth2, tmp_path, sinks=[{"kind": "file", "path": str(sink_dir / "api.token")}]
            )
        ],
        "leader_election": {
            "enabled": True,
            "namespace": NS,
            "lease_name": "refresher",
            "identity": identity,
            "kubeconfig": str(kubeconfig),
        },
    }
    install_chart_rbac(kube, config)  # the Lease rules the chart grants
    return config


async def advance_to(clock: Any, moment: float, leader: Any) -> None:
    """Walk the clock in 1 s steps, letting the leader's lease renewals complete."""
    while clock.now() < moment:
        await clock.set(min(moment, clock.now() + 1))
        await wait_for(lambda: clock.now() - leader.elector._renewed_at <= 2.0 + 1e-6)


@pytest.mark.anyio
async def test_leader_waits_for_a_held_directory_and_a_follower_never_exits(
    start_daemon: Any,
    oauth2_emulator: Any,
    kube: KubernetesEmulator,
    clock: Any,
    tmp_path: Path,
    leak_guard: Any,
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "api.token"
    daemons: dict[str, Any] = {}
    stops = {"pod-a": anyio.Event(), "pod-b": anyio.Event()}

    async def replica(identity: str) -> None:
        async with start_daemon(
            replica_config(oauth2_emulator, kube, tmp_path, identity, shared)
        ) as daemon:
            daemons[identity] = daemon
            await stops[identity].wait()

    with held_by_another_process(shared) as holder:
        async with anyio.create_task_group() as tg:
            tg.start_soon(replica, "pod-a")
            await wait_for(lambda: "pod-a" in daemons and daemons["pod-a"].leadership.leading)
            a = daemons["pod-a"]
            rt_a = a.scheduler.jobs[("api", None)]
            tg.start_soon(replica, "pod-b")
            await wait_for(lambda: "pod-b" in daemons)
            b = daemons["pod-b"]
            # The leader mints nothing for a directory it cannot own, over many retries.
            await advance_to(clock, clock.now() + 12, a)
            assert oauth2_emulator.count() == 0 and not target.exists()
            assert rt_a.failure_reason == "sink"
            assert REFUSED.format(dir=shared, pid=holder.pid) in (rt_a.failure_message or "")
            assert len(leak_guard.events(WAITING)) == 1, "logged once, not once per retry"

            # Kill the leader (no lease release): the follower, still up, takes over.
            async def no_release() -> None:
                return None

            a.elector.release = no_release
            stops["pod-a"].set()
            await wait_for(lambda: a.scheduler.is_active() is False)
            while not b.elector.is_leader():
                await clock.advance(0.5)
                await anyio.sleep(0.05)
            await wait_for(lambda: len(leak_guard.events(WAITING)) == 2)
            rt_b = b.scheduler.jobs[("api", None)]
            await advance_to(clock, clock.now() + 6, b)
            assert oauth2_emulator.count() == 0 and not target.exists()
            # The third process lets go: within a retry period the leader owns it and writes.
            free(holder)
            await advance_to(clock, clock.now() + 2, b)
            await wait_for(lambda: target.exists() and rt_b.refreshing is None)
            assert target.read_text().strip() == rt_b.token.value
            assert oauth2_emulator.count() == 1 and rt_b.failure_reason is None
            assert leak_guard.events(RESUMED)
            # Held for as long as it leads; given back the moment it stops leading.
            probe = DirectoryLocks()
            assert probe.acquire([str(shared)]) == [Refusal(str(shared), pid=os.getpid())]
            await b.elector.release()
            assert probe.acquire([str(shared)]) == []
            probe.release_all()
            stops["pod-b"].set()
