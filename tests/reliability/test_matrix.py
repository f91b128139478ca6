"""The fault matrix, in process: a real daemon on the injected clock, real HTTP to the
real emulators, real files. One row of `SCENARIOS` per fault: a few lines of data and
a short `run(ctx)` with the scenario's own assertions; `runner.run_scenario` checks
the five invariants of the reliability matrix for every row (see harness.py).
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import shutil
import stat
import subprocess
import tracemalloc
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import anyio
import pytest

from refresher.demo.base import Fault
from tests.conftest import CLIENT_ID, CLIENT_SECRET, wait_for
from tests.reliability.harness import Ctx, Scenario, backoff_budget
from tests.reliability.runner import Env, run_scenario
from tests.reliability.servers import nodelay

pytestmark = pytest.mark.anyio

ROTATED_SECRET = "rotated-client-secret-value-2"


# ================================================================== building blocks


def policy(ctx: Ctx) -> Any:
    return ctx.daemon.settings.refresh


async def new_token(ctx: Ctx, old: Any, runtime: Any = None, horizon: float | None = None) -> Any:
    """Drive until `runtime` holds and has written a token other than `old`."""
    runtime = runtime or ctx.rt
    reached = await ctx.run_until(
        horizon if horizon is not None else old.expires_at,
        until=lambda: runtime.token is not old and not runtime.unwritten,
    )
    assert reached, f"no new token by the horizon: {runtime.failure_message}"
    return runtime.token


async def outage(
    ctx: Ctx,
    factory: Callable[[Any], Fault],
    *,
    fraction: float = 0.8,
    reason: str,
    message: str | None = None,
) -> None:
    """A fault answering every token request from the planned refresh for `fraction`
    of the margin left before expiry; the old token must carry the sink through."""
    old = await ctx.first_token()
    rt = ctx.rt
    due = rt.next_refresh_at
    end = due + fraction * (old.expires_at - due)
    ctx.fault_window(due, end, factory)
    await ctx.run_until(end)
    assert rt.token is old and ctx.file_value() == old.value, "a failure replaced the token"
    assert rt.failures >= 1 and rt.failure_reason == reason, (rt.failure_reason, rt.failure_message)
    if message:
        assert any(message in e for e in ctx.errors_seen), (message, ctx.errors_seen)
    assert ctx.metric("refresher_token_valid", token_job="api") == 1
    failures = ctx.metric("refresher_refresh_failures_total", token_job="api", reason=reason)
    await new_token(ctx, old)
    backoff = policy(ctx).backoff
    ctx.expect_max(
        2 + backoff_budget(end - due, backoff.initial, backoff.max),
        "full-jitter backoff arithmetic",
    )
    ctx.note(
        f"outage {end - due:.0f}s of a {old.expires_at - due:.0f}s margin, "
        f"{failures:.0f} failed attempts, new token {old.expires_at - ctx.clock.now():.0f}s "
        "before the old one expired"
    )


async def one_bad_answer(ctx: Ctx, factory: Callable[[Any], Fault], message: str) -> None:
    """The refresh gets one bad 200 answer: nothing is written, the retry succeeds."""
    old = await ctx.first_token()
    due = ctx.rt.next_refresh_at
    ctx.fault_window(due, due + 1e-3, factory)
    await ctx.run_until(due)
    assert ctx.rt.failure_reason == "bad_response", ctx.rt.failure_message
    assert message in ctx.rt.failure_message, ctx.rt.failure_message
    assert ctx.file_value() == old.value
    await new_token(ctx, old)
    assert ctx.metric("refresher_refresh_failures_total", token_job="api", reason="bad_response") == 1
    ctx.expect_max(3, "initial mint + the bad answer + one retry")


def bad_grant(
    ctx: Ctx,
    expires_in: Any,
    *,
    exp_offset: float = 3600,
    value_suffix: str = "",
    token_type: str = "Bearer",
) -> Callable[[Any], Fault]:
    def factory(emu: Any) -> Fault:
        now = int(emu.now())
        token = emu.sign_rs256(
            {
                "iss": emu.issuer,
                "aud": emu.audience,
                "sub": CLIENT_ID,
                "iat": now - 60,
                "exp": now + exp_offset,
                "jti": emu.new_jti(),
            }
        )
        token += value_suffix
        ctx.rejected.add(token)
        return Fault.body_json(
            {"access_token": token, "token_type": token_type, "expires_in": expires_in}
        )

    return factory


# ================================================================== provider side


async def storm_short(ctx: Ctx) -> None:
    await outage(ctx, lambda e: Fault.server_error(), reason="server_error")


async def storm_longer_than_lifetime(ctx: Ctx) -> None:
    old = await ctx.first_token()
    rt = ctx.rt
    due = rt.next_refresh_at
    end = old.expires_at + 600
    ctx.fault_window(due, end, lambda e: Fault.server_error())
    await ctx.run_until(old.expires_at + 1)
    assert ctx.metric("refresher_token_valid", token_job="api") == 0, "alert-worthy state not shown"
    assert ctx.metric("refresher_token_expiry_timestamp_seconds", token_job="api") == old.expires_at
    status, body = await ctx.get("/v1/tokens")
    assert '"state":"expired"' in body.replace(" ", ""), body
    assert (await ctx.get("/readyz"))[0] == 503
    assert ctx.file_value() == old.value, "on_expiry: keep must leave the last value"
    await ctx.run_until(end)
    assert rt.token is old
    await new_token(ctx, old, horizon=end + policy(ctx).backoff.max + 1)
    back = ctx.clock.now() - end
    assert back <= policy(ctx).backoff.max
    assert ctx.metric("refresher_token_valid", token_job="api") == 1
    assert (await ctx.get("/readyz"))[0] == 200
    backoff = policy(ctx).backoff
    ctx.expect_max(
        2 + backoff_budget(end - due, backoff.initial, backoff.max), "backoff arithmetic"
    )
    ctx.note(
        f"token_valid 0 for {ctx.clock.now() - old.expires_at:.0f}s, recovered {back:.0f}s "
        "after the provider returned"
    )


async def timeouts(ctx: Ctx) -> None:
    await outage(
        ctx, lambda e: Fault.slow(0.5), fraction=0.02, reason="timeout", message="timed out"
    )


async def closed_port_from_start(ctx: Ctx) -> None:
    await ctx.run_until(ctx.clock.now() + 3600)
    rt = ctx.rt
    assert rt.token is None and rt.failure_reason == "transport", rt.failure_message
    assert "ConnectError" in rt.failure_message
    assert not ctx.path.exists() and (await ctx.get("/readyz"))[0] == 503
    attempts = ctx.metric("refresher_refresh_failures_total", token_job="api", reason="transport")
    ctx.pressure = lambda: int(attempts)
    ctx.pressure_label = "refused connection attempts"
    backoff = policy(ctx).backoff
    ctx.expect_max(
        backoff_budget(3600, backoff.initial, backoff.max, halving=False),
        "backoff arithmetic over one hour",
    )


async def provider_down_then_back(ctx: Ctx) -> None:
    old = await ctx.first_token()
    rt = ctx.rt
    due = rt.next_refresh_at
    end = due + 0.8 * (old.expires_at - due)
    await ctx.run_until(due - 1)
    await anyio.to_thread.run_sync(ctx.emulator.stop)
    await ctx.run_until(end)
    assert rt.failure_reason == "transport" and "ConnectError" in rt.failure_message
    assert rt.token is old and ctx.file_value() == old.value
    await anyio.to_thread.run_sync(ctx.emulator.start)
    nodelay(ctx.emulator)
    await new_token(ctx, old)
    ctx.expect_max(2, "no request reaches a stopped emulator: initial + the one after restart")
    attempts = ctx.metric("refresher_refresh_failures_total", token_job="api", reason="transport")
    ctx.note(f"{attempts:.0f} refused connection attempts in {end - due:.0f}s")


def mid_body(mode: str) -> Callable[[Ctx], Any]:
    async def run(ctx: Ctx) -> None:
        old = await ctx.first_token()
        rt = ctx.rt
        due = rt.next_refresh_at
        ctx.proxy_window(due, due + 30, mode)
        await ctx.run_until(due + 30)
        assert rt.failure_reason == "transport", rt.failure_message
        assert rt.token is old and ctx.file_value() == old.value
        await new_token(ctx, old)
        lost = ctx.proxy.modes.count(mode)
        backoff = policy(ctx).backoff
        ctx.expect_max(2 + backoff_budget(30, backoff.initial, backoff.max), "backoff arithmetic")
        ctx.note(f"{lost} tokens minted but cut off in transit, none published")

    return run


async def tls_untrusted(ctx: Ctx) -> None:
    await ctx.run_until(ctx.clock.now() + 600)
    rt = ctx.rt
    assert rt.token is None and rt.failure_reason == "transport"
    assert "TLS error" in rt.failure_message and "CERTIFICATE_VERIFY_FAILED" in (
        rt.failure_message
    ), rt.failure_message
    assert ctx.emulator.count() == 0, "a request (with the client secret) crossed unverified TLS"
    attempts = ctx.metric("refresher_refresh_failures_total", token_job="api", reason="transport")
    ctx.pressure = lambda: int(attempts)
    ctx.pressure_label = "TLS handshakes refused by the client"
    backoff = policy(ctx).backoff
    ctx.expect_max(
        backoff_budget(600, backoff.initial, backoff.max, halving=False),
        "backoff arithmetic over 10 min",
    )
    ctx.note("verification on by default: 0 HTTP requests reached the server")


async def tls_with_ca_file(ctx: Ctx) -> None:
    old = await ctx.first_token()
    await new_token(ctx, old)
    ctx.expect_max(2, "two mints")


def rate_limited_gaps(ctx: Ctx) -> list[float]:
    """Gaps between the token requests after the first (initial) mint."""
    times = [r.at for r in ctx.emulator.requests if r.path == ctx.token_path]
    return [b - a for a, b in itertools.pairwise(times[1:])]


async def retry_after_seconds(ctx: Ctx) -> None:
    old = await ctx.first_token()
    due = ctx.rt.next_refresh_at
    ctx.fault_window(due, due + 250, lambda e: Fault.rate_limited("120"))
    await new_token(ctx, old)
    gaps = rate_limited_gaps(ctx)
    assert gaps == pytest.approx([120, 120, 120], abs=1e-6), gaps
    assert ctx.metric("refresher_rate_limited_total", token_job="api") == 3
    assert ctx.metric("refresher_retry_after_seconds_sum", token_job="api") == 360
    ctx.expect_max(5, "initial + ceil(250/120) 429s + success: Retry-After honoured exactly")


async def retry_after_http_date(ctx: Ctx) -> None:
    old = await ctx.first_token()
    due = ctx.rt.next_refresh_at
    ctx.fault_window(
        due,
        due + 100,
        lambda e: Fault.rate_limited(formatdate(math.ceil(e.now()) + 60, usegmt=True)),
    )
    await new_token(ctx, old)
    gaps = rate_limited_gaps(ctx)
    assert len(gaps) == 2 and all(60 <= g <= 61 for g in gaps), gaps
    ctx.expect_max(4, "initial + 2 429s + success")


async def retry_after_absurd(ctx: Ctx) -> None:
    old = await ctx.first_token()
    due = ctx.rt.next_refresh_at
    ctx.fault_window(due, due + 1e-3, lambda e: Fault.rate_limited("1000000000"))
    await new_token(ctx, old)
    assert rate_limited_gaps(ctx) == pytest.approx([600], abs=1e-6)
    event = ctx.env.leak_guard.events("refresh failed")[0]
    assert event["retry_after_capped"] is True and event["retry_in"] == 600, event
    ctx.expect_max(3, "initial + 429 + success after the capped wait")
    ctx.note("Retry-After 10^9 capped at refresh.max_retry_after=10m, logged retry_after_capped")


async def retry_after_in_the_past(ctx: Ctx) -> None:
    old = await ctx.first_token()
    due = ctx.rt.next_refresh_at
    # The provider's clock is 5 min behind: "retry at <its now + 30 s>" is already past here.
    ctx.fault_window(
        due, due + 30, lambda e: Fault.rate_limited(formatdate(e.now() + 30, usegmt=True)), limit=20
    )
    await new_token(ctx, old)
    ctx.expect_max(22, "must back off, not retry at once")


async def malformed_json(ctx: Ctx) -> None:
    await one_bad_answer(ctx, lambda e: Fault.malformed(), "body is not JSON (application/json")


async def html_200(ctx: Ctx) -> None:
    await one_bad_answer(ctx, lambda e: Fault.html(), "body is not JSON (text/html")


async def huge_8mib(ctx: Ctx) -> None:
    await one_bad_answer(ctx, lambda e: Fault.huge(8 << 20), "exceeds 1048576 bytes")


async def huge_streamed(ctx: Ctx) -> None:
    old = await ctx.first_token()
    rt = ctx.rt
    due = rt.next_refresh_at
    ctx.proxy_window(due, due + 1e-3, "huge")
    await ctx.run_until(due - 1e-3)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        await ctx.run_until(due)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert rt.failure_reason == "bad_response" and "exceeds" in rt.failure_message
    assert peak < 8 << 20, f"reading a 64 MiB body grew memory by {peak >> 20} MiB"
    assert ctx.proxy.huge_bytes_sent < 64 << 20, "the client read the whole body"
    await new_token(ctx, old)
    ctx.expect_max(2, "the huge answer never reaches the emulator: initial + retry")
    ctx.note(
        f"64 MiB body: peak Python allocation {peak / 2**20:.1f} MiB while reading; "
        f"server sent {ctx.proxy.huge_bytes_sent >> 20} MiB before the client hung up"
    )


def expires_in(value: Any, message: str) -> Callable[[Ctx], Any]:
    async def run(ctx: Ctx) -> None:
        await one_bad_answer(ctx, bad_grant(ctx, value), message)

    return run


def unsafe_grant(message: str, **bad: str) -> Callable[[Ctx], Any]:
    async def run(ctx: Ctx) -> None:
        await one_bad_answer(ctx, bad_grant(ctx, 3600, **bad), message)  # type: ignore[arg-type]

    return run


async def jwt_exp_in_past(ctx: Ctx) -> None:
    await one_bad_answer(ctx, bad_grant(ctx, 3600, exp_offset=-100), "already expired")


def gooclaim_knob(knob: str, message: str) -> Callable[[Ctx], Any]:
    async def run(ctx: Ctx) -> None:
        old = await ctx.first_token()
        due = ctx.rt.next_refresh_at

        def apply(emu: Any, on: bool) -> None:
            setattr(emu, knob, on)
            ctx.minting_bad = on

        ctx.knob_window(due, due + 20, apply)
        await ctx.run_until(due + 20)
        assert ctx.rt.failure_reason == "bad_response"
        assert any(message in e for e in ctx.errors_seen), ctx.errors_seen
        assert ctx.file_value() == old.value
        await new_token(ctx, old)
        backoff = policy(ctx).backoff
        ctx.expect_max(2 + backoff_budget(20, backoff.initial, backoff.max), "backoff arithmetic")
        rejected = ctx.emulator.count(ctx.token_path) - 2
        ctx.note(f"{rejected} unverifiable tokens rejected, none written")

    return run


def skewed(lifetime: float) -> Callable[[Ctx], Any]:
    async def run(ctx: Ctx) -> None:
        token = await ctx.first_token()
        assert token.lifetime == pytest.approx(lifetime, abs=1)
        for _ in range(3):
            token = await new_token(ctx, token)
            assert token.lifetime == pytest.approx(lifetime, abs=1)
        ctx.expect_max(4, "one mint per lifetime")
        ctx.note(f"lifetime used {token.lifetime:.0f}s: min(expires_in, JWT exp)")

    return run


async def unauthorized_after_rotation(ctx: Ctx) -> None:
    old = await ctx.first_token()
    rt = ctx.rt
    due = rt.next_refresh_at
    await wait_for(lambda: ctx.daemon.watcher.ready.is_set(), timeout=10)
    await ctx.run_until(due - 1)
    ctx.env.leak_guard.secrets.add(ROTATED_SECRET)
    ctx.emulator.clients[CLIENT_ID] = ROTATED_SECRET  # rotated at the provider first
    await ctx.run_until(due + 120)
    assert rt.failure_reason == "unauthorized" and rt.token is old
    assert ctx.emulator.count(status=401) == 1, "401 retried in a loop"
    assert ctx.env.leak_guard.events("refresh failed")[0]["job"] == "api"
    secret = ctx.secret_file
    staged = secret.with_suffix(".new")
    staged.write_text(ROTATED_SECRET + "\n")
    os.replace(staged, secret)  # then the mounted secret is updated
    await wait_for(lambda: rt.token is not old, timeout=10)
    await ctx.settle()
    assert ctx.file_value() == rt.token.value
    ctx.expect_max(3, "initial + one 401 (long backoff) + the re-mint the rotated file triggers")


def rotation_setup(ctx: Ctx) -> None:
    secrets = ctx.tmp_path / "secrets"
    secrets.mkdir()
    ctx.secret_file = secrets / "client_secret"
    ctx.secret_file.write_text(CLIENT_SECRET + "\n")
    provider = ctx.config["jobs"][0]["provider"]
    del provider["client_secret"]
    provider["client_secret_file"] = str(ctx.secret_file)


def refuse_mint(tenant: str) -> Callable[[Any, bool], None]:
    def apply(emu: Any, on: bool) -> None:
        if on:
            emu.mint_refused.add(tenant)
        else:
            emu.mint_refused.discard(tenant)

    return apply


async def debitura_tenant_refused_at_mint(ctx: Ctx) -> None:
    await ctx.first_token()
    bad, good = ctx.runtime("t-bad"), ctx.runtime("t-good")
    old = bad.token
    due = bad.next_refresh_at
    ctx.knob_window(due, math.inf, refuse_mint("t-bad"))
    # From here t-bad's outage is permanent (longer than any margin): I1 stays on t-good.
    ctx.observer.exempt([ctx.path_of("t-bad")])
    end = old.expires_at + 3600
    await ctx.run_until(end)
    now = ctx.clock.now()
    assert bad.failure_reason == "unauthorized" and bad.display_state(now) == "expired"
    assert ctx.file_value(ctx.path_of("t-bad")) == old.value, "on_expiry: keep"
    assert good.token.is_valid(now) and good.display_state(now) == "valid"
    bad_requests = ctx.emulator.count(client="t-bad")
    good_mints = ctx.emulator.count(client="t-good")
    cap = policy(ctx).backoff.max
    # One attempt at `due`, then one per backoff.max, never halving toward expiry;
    # the first 401 may pause the credential once, which t-good's probe reopens.
    attempts = 1 + math.ceil((end - due) / cap) + 1
    assert good_mints <= 2 + math.ceil((now - old.obtained_at) / (0.675 * ctx.sc.lifetime))
    ctx.pressure = lambda: bad_requests
    ctx.pressure_label = "from t-bad (bounded)"
    ctx.expect_max(
        1 + attempts + good_mints, "t-bad: one request per backoff.max; t-good unaffected"
    )
    ctx.note(
        f"t-bad refused at the mint: {bad_requests} requests over {(end - due) / 3600:.1f} h, "
        f"token kept after expiry; t-good fresh throughout with {good_mints} mints (I1 judged "
        "on t-good, and on t-bad until the refusal)"
    )


async def dutyclaims_forbidden(ctx: Ctx) -> None:
    old = await ctx.first_token()
    due = ctx.rt.next_refresh_at
    ctx.fault_window(due, due + 1e-3, lambda e: Fault.forbidden())
    await new_token(ctx, old)
    gaps = rate_limited_gaps(ctx)
    assert gaps == pytest.approx([policy(ctx).backoff.max], abs=1e-6), gaps
    ctx.expect_max(3, "403 waits backoff.max: initial + 403 + retry")


# ================================================================== sink side


def tmp_files(ctx: Ctx) -> list[str]:
    return (
        [p.name for p in ctx.sink_dir.iterdir() if ".tmp-" in p.name]
        if ctx.sink_dir.is_dir()
        else []
    )


async def sink_outage(
    ctx: Ctx,
    start: Callable[[], None],
    stop: Callable[[], None],
    message: str,
    *,
    before: float = 1.0,
) -> None:
    """The sink cannot be written from just before the refresh for 200 s."""
    old = await ctx.first_token()
    rt = ctx.rt
    due = rt.next_refresh_at
    await ctx.run_until(due - before)
    start()
    await ctx.run_until(due + 200)
    assert rt.token is not old and rt.unwritten, "the write did not fail"
    assert rt.display_state(ctx.clock.now()) == "sink_failing"
    assert message in rt.failure_message, rt.failure_message
    assert ctx.emulator.count() == 2, "failed writes must be retried without re-minting"
    assert not tmp_files(ctx), f"temp files left behind: {tmp_files(ctx)}"
    failures = ctx.metric("refresher_sink_failures_total", token_job="api", sink="file")
    stop()
    await ctx.run_until(old.expires_at, until=lambda: not rt.unwritten)
    ctx.observer.unexempt()
    assert ctx.file_value() == rt.token.value and ctx.emulator.count() == 2
    assert not tmp_files(ctx)
    ctx.expect_max(2, "one mint; failed writes retried without re-minting")
    ctx.note(f"{failures:.0f} failed writes in 200 s, then written without a new mint")


class IOFaults:
    """Injected OS errors for the sink's temp files only (fds tracked from os.open)."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.on = False
        self.fds: set[int] = set()
        self.first_write_modes: list[int] = []
        self.written: set[int] = set()
        self.open, self.write, self.fsync = os.open, os.write, os.fsync
        self.mode: str | None = None
        mp = ctx.env.monkeypatch
        mp.setattr(os, "open", self._open)
        mp.setattr(os, "write", self._write)
        mp.setattr(os, "fsync", self._fsync)

    def _ours(self, path: Any) -> bool:
        text = os.fspath(path)
        return text.startswith(str(self.ctx.sink_dir)) and ".tmp-" in text

    def _open(self, path: Any, flags: int, mode: int = 0o777, *a: Any, **k: Any) -> int:
        if self.on and self.mode == "erofs" and flags & os.O_CREAT and self._ours(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        fd = self.open(path, flags, mode, *a, **k)
        if self._ours(path):
            self.fds.add(fd)
        else:
            self.fds.discard(fd)
        self.written.discard(fd)
        return fd

    def _write(self, fd: int, data: Any) -> int:
        if fd in self.fds:
            if fd not in self.written:
                self.written.add(fd)
                self.first_write_modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
            if self.on and self.mode == "enospc-write":
                if len(data) > 1:
                    return self.write(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.write(fd, data)

    def _fsync(self, fd: int) -> None:
        if self.on and self.mode == "enospc-fsync" and fd in self.fds:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.fsync(fd)


async def sink_readonly(ctx: Ctx) -> None:
    faults = IOFaults(ctx)
    faults.mode = "erofs"
    if os.geteuid() == 0:
        ctx.note(
            "running as root (DAC does not bind root): EROFS injected at os.open of the temp file"
        )
        start, stop = (lambda: setattr(faults, "on", True)), (lambda: setattr(faults, "on", False))
        message = "Read-only file system"
    else:
        ctx.note("sink directory chmod 0555")
        start, stop = (lambda: ctx.sink_dir.chmod(0o555)), (lambda: ctx.sink_dir.chmod(0o700))
        message = "Permission denied"
    await sink_outage(ctx, start, stop, message)


async def sink_dir_removed(ctx: Ctx) -> None:
    def start() -> None:
        ctx.observer.exempt(missing=True)
        shutil.rmtree(ctx.sink_dir)

    ctx.note(
        "directory deleted 10 s before the refresh, recreated 200 s later "
        "(I1 not judged while there is no file to read)"
    )
    await sink_outage(
        ctx, start, lambda: ctx.sink_dir.mkdir(), "directory does not exist", before=10
    )


def enospc(mode: str) -> Callable[[Ctx], Any]:
    async def run(ctx: Ctx) -> None:
        faults = IOFaults(ctx)
        faults.mode = mode
        where = "os.write (half written, then ENOSPC)" if mode == "enospc-write" else "os.fsync"
        ctx.note(f"ENOSPC injected at {where} of the temp file (monkeypatch)")
        await sink_outage(
            ctx,
            lambda: setattr(faults, "on", True),
            lambda: setattr(faults, "on", False),
            "No space left on device",
        )

    return run


def tmpfs_possible() -> bool:
    probe = Path("/tmp") / f"refresher-tmpfs-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        ok = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(probe)], capture_output=True
            ).returncode
            == 0
        )
        if ok:
            subprocess.run(["umount", str(probe)], check=True, capture_output=True)
        return ok
    except OSError:
        return False
    finally:
        probe.rmdir()


def tmpfs_setup(ctx: Ctx) -> None:
    if not tmpfs_possible():
        pytest.skip("cannot mount a tmpfs here (the injected-ENOSPC rows cover this)")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(ctx.sink_dir)], check=True
    )

    def umount() -> None:
        if subprocess.run(["umount", str(ctx.sink_dir)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(ctx.sink_dir)], capture_output=True)

    ctx.cleanups.append(umount)


async def sink_tmpfs_full(ctx: Ctx) -> None:
    filler = ctx.sink_dir / "filler"

    def fill() -> None:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 1024)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)

    ctx.note("real ENOSPC: 16 KiB tmpfs filled up")
    await sink_outage(ctx, fill, lambda: filler.unlink(), "No space left on device")


async def sink_symlink(ctx: Ctx) -> None:
    old = await ctx.first_token()
    rt = ctx.rt
    outside = ctx.tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    await ctx.run_until(rt.next_refresh_at - 100)
    staged = ctx.sink_dir / "evil-link"
    staged.symlink_to(victim)
    os.replace(staged, ctx.path)
    await new_token(ctx, old)
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not ctx.path.is_symlink() and stat.S_IMODE(ctx.path.stat().st_mode) == 0o600
    assert ctx.file_value() == rt.token.value and not tmp_files(ctx)
    ctx.expect_max(2, "two mints")
    ctx.note(
        "the symlink itself was replaced by rename(); the target outside the sink dir "
        "kept its content and mode"
    )


async def mode_before_first_byte(ctx: Ctx) -> None:
    old = await ctx.first_token()
    faults = IOFaults(ctx)
    await new_token(ctx, old)
    assert faults.first_write_modes and set(faults.first_write_modes) == {0o600}, (
        faults.first_write_modes
    )
    assert stat.S_IMODE(ctx.path.stat().st_mode) == 0o640
    ctx.expect_max(2, "two mints")
    ctx.note(
        f"{len(faults.first_write_modes)} temp files were 0600 at their first byte; "
        "configured 0640 applied before rename"
    )


async def world_writable_dir(ctx: Ctx) -> None:
    """Issue 8 security check: warn about (or refuse) a world-writable sink directory."""
    await ctx.settle()
    ctx.expect_max(2, "one mint per start (plus one retry if the write is refused)")
    warned = [
        line
        for line in ctx.env.leak_guard.lines()
        if line.get("level") in ("warning", "error")
        and "world" in json.dumps(line).lower().replace("-", " ")
    ]
    assert warned, "no warning or refusal naming the world-writable sink directory"


async def stale_temp_after_crash(ctx: Ctx) -> None:
    old = await ctx.first_token()
    # What a crash between open() and rename() leaves behind.
    stale = ctx.sink_dir / f".{ctx.path.name}.tmp-0badf00d"
    stale.write_bytes(old.value[: len(old.value) // 2].encode())
    await ctx.restart()
    await ctx.settle()
    assert ctx.rt.token.value == old.value and ctx.emulator.count() == 1, "restart re-minted"
    ctx.expect_max(1, "the restart adopts the valid token")
    assert not stale.exists(), "a crash leftover (half a token) survived the restart"


# ================================================================== the table


def sc(name: str, group: str, run: Callable[[Ctx], Any], **kw: Any) -> Scenario:
    return Scenario(id=name, group=group, run=run, **kw)


SMALL_BACKOFF = {"backoff": {"initial": "1s", "max": "60s"}}

SCENARIOS = [
    # -------------------------------------------------------------- provider side
    sc("5xx_storm_shorter_than_margin", "provider", storm_short, command_notifier=True),
    sc(
        "5xx_storm_longer_than_lifetime",
        "provider",
        storm_longer_than_lifetime,
        lifetime=600,
        http=True,
        refresh=SMALL_BACKOFF,
        i1_na="outage > lifetime: expiry is the point",
    ),
    sc(
        "timeout_200ms",
        "provider",
        timeouts,
        provider_cfg={"timeout": "200ms"},
        burst=0,
        notes="Fault.slow(0.5 s) vs timeout 200ms (real time); the emulator stamps a slow "
        "request when its answer finishes, so the same-instant check is skipped",
    ),
    sc(
        "connection_refused_closed_port",
        "provider",
        closed_port_from_start,
        endpoint="closed",
        i1_na="no token ever issued",
    ),
    sc(
        "connection_refused_provider_down",
        "provider",
        provider_down_then_back,
        notes="emulator stopped at the refresh, restarted on the same port",
    ),
    sc(
        "connection_reset_mid_body",
        "provider",
        mid_body("reset"),
        endpoint="proxy",
        notes="raw socket: headers + half the body, then RST",
    ),
    sc(
        "connection_closed_mid_body",
        "provider",
        mid_body("truncate"),
        endpoint="proxy",
        notes="raw socket: headers + half the body, then FIN",
    ),
    sc(
        "tls_self_signed_rejected",
        "provider",
        tls_untrusted,
        endpoint="tls",
        i1_na="no token ever issued",
    ),
    sc(
        "tls_custom_ca_file",
        "provider",
        tls_with_ca_file,
        endpoint="tls-ca",
        notes="server cert from the emulator's throw-away CA, trusted via ca_file",
    ),
    sc("429_retry_after_seconds", "provider", retry_after_seconds),
    sc("429_retry_after_http_date", "provider", retry_after_http_date),
    sc(
        "429_retry_after_absurd", "provider", retry_after_absurd, refresh={"max_retry_after": "10m"}
    ),
    sc(
        "429_retry_after_date_in_past",
        "provider",
        retry_after_in_the_past,
        setup=lambda ctx: setattr(ctx.emulator, "skew", -300),
        notes="provider clock 5 min behind sends Retry-After: <its now + 30 s> (HTTP date)",
    ),
    sc("malformed_json_200", "provider", malformed_json),
    sc("html_error_page_200", "provider", html_200),
    sc("huge_body_8MiB", "provider", huge_8mib),
    sc("huge_body_64MiB_streamed", "provider", huge_streamed, endpoint="proxy"),
    sc("expires_in_zero", "provider", expires_in(0, "'expires_in' must be positive")),
    sc("expires_in_negative", "provider", expires_in(-30, "'expires_in' must be positive")),
    sc("expires_in_string", "provider", expires_in("an hour", "'expires_in' must be a number")),
    sc(
        "access_token_line_injection",
        "provider",
        unsafe_grant("whitespace", value_suffix="\nLD_PRELOAD=/tmp/evil.so"),
    ),
    sc(
        "token_type_line_injection",
        "provider",
        unsafe_grant("token_type", token_type="Bearer\nPATH=/tmp/evil"),
    ),
    sc("access_token_lone_surrogate", "provider", unsafe_grant("control", value_suffix="\ud800")),
    sc(
        "jwt_exp_in_past",
        "provider",
        jwt_exp_in_past,
        notes="signed JWT, exp 100 s ago, expires_in 3600",
    ),
    sc(
        "gooclaim_wrong_audience",
        "provider",
        gooclaim_knob("wrong_audience", "wrong audience"),
        provider="gooclaim",
    ),
    sc(
        "gooclaim_wrong_issuer",
        "provider",
        gooclaim_knob("wrong_issuer", "wrong issuer"),
        provider="gooclaim",
    ),
    sc(
        "gooclaim_bad_signature",
        "provider",
        gooclaim_knob("bad_signature", "signature does not verify"),
        provider="gooclaim",
    ),
    sc(
        "gooclaim_expired_jwt",
        "provider",
        gooclaim_knob("expired", "already expired"),
        provider="gooclaim",
    ),
    sc(
        "clock_skew_provider_ahead_5m",
        "provider",
        skewed(3600),
        provider="gooclaim",
        setup=lambda ctx: setattr(ctx.emulator, "skew", +300),
        notes="iat/exp 5 min in the future: expires_in (3600) is the earlier bound",
    ),
    sc(
        "clock_skew_provider_behind_5m",
        "provider",
        skewed(3300),
        setup=lambda ctx: setattr(ctx.emulator, "skew", -300),
        notes="exp 5 min early on our clock: lifetime shortened to 3300 s, still no gap",
    ),
    sc(
        "401_after_secret_rotation",
        "provider",
        unauthorized_after_rotation,
        setup=rotation_setup,
        command_notifier=True,
    ),
    sc(
        "debitura_tenant_refused_at_mint",
        "provider",
        debitura_tenant_refused_at_mint,
        provider="debitura",
        lifetime=1800,
        burst=2,
    ),
    sc(
        "dutyclaims_5xx_storm_json_sink",
        "provider",
        storm_short,
        provider="dutyclaims",
        fmt="json",
        notes="opaque token: expiry read from the json sink",
    ),
    sc(
        "dutyclaims_403_capability",
        "provider",
        dutyclaims_forbidden,
        provider="dutyclaims",
        fmt="json",
    ),
    # -------------------------------------------------------------- sink side
    sc("sink_dir_read_only", "sink", sink_readonly),
    sc("sink_dir_removed", "sink", sink_dir_removed),
    sc("sink_enospc_at_write", "sink", enospc("enospc-write")),
    sc("sink_enospc_at_fsync", "sink", enospc("enospc-fsync")),
    sc("sink_enospc_real_tmpfs", "sink", sink_tmpfs_full, setup=tmpfs_setup),
    sc("sink_file_replaced_by_symlink", "sink", sink_symlink),
    sc(
        "sink_mode_0600_before_first_byte",
        "sink",
        mode_before_first_byte,
        sink_cfg={"mode": "0640"},
        notes="configured mode 0640",
    ),
    sc(
        "sink_dir_world_writable_warns",
        "sink",
        world_writable_dir,
        setup=lambda ctx: ctx.sink_dir.chmod(0o777),
    ),
    sc(
        "stale_temp_swept_on_restart",
        "sink",
        stale_temp_after_crash,
        fmt="json",
    ),
]


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(
            s, id=s.id, marks=[pytest.mark.xfail(strict=True, reason=s.xfail)] if s.xfail else []
        )
        for s in SCENARIOS
    ],
)
async def test_fault_matrix(scenario: Scenario, env: Env) -> None:
    await run_scenario(scenario, env)
