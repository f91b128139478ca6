"""The shared scenario runner: builds the emulator, the daemon config and the sink
reader for a `Scenario`, runs its `run(ctx)`, then judges the five invariants and
records the scenario's row of the summary table (see harness.py for the invariants).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest

from refresher.demo.debitura import DebituraEmulator
from refresher.demo.dutyclaims import DutyClaimsEmulator
from refresher.demo.gooclaim import GooclaimEmulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.emulators.oauth2 import OAuth2Emulator
from tests.reliability.harness import (
    INVARIANTS,
    Ctx,
    Observer,
    Row,
    Scenario,
    SinkReader,
    burst_violations,
    record,
    requests_summary,
)
from tests.reliability.servers import RawServer, WebhookReceiver, closed_port, nodelay

GOO_SECRET = "gooclaim-client-secret-reliability"
DEB_KEY = "debitura-api-key-reliability-0042"
DC_SECRET = "dutyclaims-sandbox-secret-reliability"
EXT = {"raw": "token", "json": "json"}


def _verifier(kind: str, emu: Any) -> Callable[[str], bool]:
    options = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}

    def rs256(value: str) -> bool:
        try:
            jwt.decode(
                value,
                emu.rsa_key.public_key(),
                algorithms=["RS256"],
                audience=emu.audience,
                issuer=emu.issuer,
                options=options,
            )
        except jwt.PyJWTError:
            return False
        return True

    def hs256(value: str) -> bool:
        try:
            jwt.decode(value, emu.hmac_key, algorithms=["HS256"], options=options)
        except jwt.PyJWTError:
            return False
        return True

    if kind in ("oauth2", "gooclaim"):
        return rs256
    if kind == "debitura":
        return hs256
    return lambda value: value in emu.issued


def _provider(ctx: Ctx, env: Any, stack: ExitStack) -> dict[str, Any]:
    """Start the scenario's emulator (and misbehaving peer) and return the provider config."""
    sc, clock = ctx.sc, ctx.clock

    def make(cls: type, **kwargs: Any) -> Any:
        return nodelay(env.make_emulator(cls, **kwargs))

    if sc.provider == "oauth2":
        kwargs: dict[str, Any] = {
            "clients": {CLIENT_ID: CLIENT_SECRET},
            "clock": clock,
            "token_lifetime": sc.lifetime,
        }
        # tls: the emulator's own throw-away CA (its server certificate is not publicly trusted)
        ctx.emulator = make(OAuth2Emulator, tls=sc.endpoint in ("tls", "tls-ca"), **kwargs)
        url = ctx.emulator.token_url
        if sc.endpoint == "proxy":
            ctx.proxy = stack.enter_context(RawServer(ctx.emulator.port, clock, ctx.proxy_plan))
            url = ctx.proxy.url + "/oauth/token"
        elif sc.endpoint == "closed":
            url = f"http://127.0.0.1:{stack.enter_context(closed_port())}/oauth/token"
        provider = {
            "kind": "oauth2",
            "token_url": url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
        if sc.endpoint == "tls-ca":
            provider["ca_file"] = str(ctx.emulator.ca_file)
    elif sc.provider == "gooclaim":
        env.leak_guard.secrets.add(GOO_SECRET)
        ctx.emulator = make(
            GooclaimEmulator,
            clients={"goo-client": GOO_SECRET},
            tenants={"goo-client": "tn_42"},
            clock=clock,
            token_lifetime=sc.lifetime,
        )
        pem = ctx.tmp_path / "gooclaim.pem"
        pem.write_bytes(ctx.emulator.public_key_pem())
        provider = {
            "kind": "gooclaim",
            "base_url": ctx.emulator.url,
            "client_id": "goo-client",
            "client_secret": GOO_SECRET,
            "issuer": ctx.emulator.issuer,
            "public_key_file": str(pem),
        }
        ctx.token_path = "/v1/auth/token"
    elif sc.provider == "debitura":
        env.leak_guard.secrets.add(DEB_KEY)
        ctx.emulator = make(
            DebituraEmulator, api_keys={DEB_KEY}, clock=clock, token_lifetime=sc.lifetime
        )
        provider = {
            "kind": "debitura",
            "base_url": ctx.emulator.url,
            "api_key": DEB_KEY,
            "tenants": list(sc.tenants),
        }
    else:
        env.leak_guard.secrets.add(DC_SECRET)
        ctx.emulator = make(
            DutyClaimsEmulator,
            clients={"dc_client": DC_SECRET},
            clock=clock,
            token_lifetime=sc.lifetime,
        )
        provider = {
            "kind": "dutyclaims",
            "mode": "sandbox",
            "base_url": ctx.emulator.url,
            "client_id": "dc_client",
            "client_secret": DC_SECRET,
            "scopes": ["clients.read"],
        }
        ctx.token_path = "/v1/oauth/token"
    # Tokens signed while a "bad token" knob is on must never be published.
    for name in ("sign_rs256", "sign_hs256"):
        original = getattr(ctx.emulator, name)

        def signing(claims: Any, _original: Any = original) -> str:
            token = _original(claims)
            if ctx.minting_bad:
                ctx.rejected.add(token)
            return token

        setattr(ctx.emulator, name, signing)
    provider.update(sc.provider_cfg)
    return provider


class Env:
    def __init__(self, **fixtures: Any) -> None:
        self.__dict__.update(fixtures)


async def run_scenario(sc: Scenario, env: Env) -> None:
    ctx = Ctx(sc, env.clock, env.tmp_path)
    ctx.env = env
    failures: list[str] = []
    specific: BaseException | None = None
    status = dict.fromkeys(INVARIANTS, "ok")
    with ExitStack() as stack:
        # Last out: undo what setup did to the machine (e.g. umount a tmpfs), even on errors.
        stack.callback(lambda: [cleanup() for cleanup in reversed(ctx.cleanups)])
        provider = _provider(ctx, env, stack)
        hook = stack.enter_context(WebhookReceiver())
        name = f"{{tenant}}.{EXT[sc.fmt]}" if sc.provider == "debitura" else f"api.{EXT[sc.fmt]}"
        job: dict[str, Any] = {
            "name": "api",
            "provider": provider,
            "sinks": [
                {"kind": "file", "path": str(ctx.sink_dir / name), "format": sc.fmt, **sc.sink_cfg}
            ],
            "notify": [{"kind": "webhook", "url": hook.url, "retries": 0}],
            **sc.job_cfg,
        }
        dump = ctx.tmp_path / "notify-env.txt"
        if sc.command_notifier:
            job["notify"].append(
                {
                    "kind": "command",
                    "env": {"DUMP": str(dump)},
                    "argv": [
                        "/bin/sh",
                        "-c",
                        'echo "ARGV $0 $*" >> "$DUMP"; env >> "$DUMP"',
                        "notify-cmd",
                        "--job",
                        "api",
                    ],
                }
            )
        tenants = sc.tenants if sc.provider == "debitura" else (None,)
        paths = [ctx.sink_dir / name.replace("{tenant}", t or "") for t in tenants]
        ctx.config = {"refresh": sc.refresh, "jobs": [job]}
        if sc.setup is not None:
            try:
                sc.setup(ctx)
            except pytest.skip.Exception:
                record(
                    env.nodeid,
                    Row(
                        sc.id, sc.group, dict.fromkeys(INVARIANTS, "-"), "-", "skipped: " + sc.notes
                    ),
                )
                raise
        ctx.observer = Observer(paths, sc.fmt, env.clock.now, _verifier(sc.provider, ctx.emulator))
        if sc.i1_na:
            ctx.observer.exempt()
        async with AsyncExitStack() as astack:
            reader = astack.enter_context(SinkReader(ctx.observer))
            ctx._start = env.start_daemon
            await ctx.start()
            try:
                try:
                    await sc.run(ctx)
                except (AssertionError, Exception) as exc:  # reported after the invariants
                    specific = exc
                with anyio.move_on_after(5):
                    await ctx.settle()
                for path in ("/v1/tokens", "/metrics", "/readyz"):
                    await ctx.get(path)
                final = [(r, r.token, list(r.unwritten)) for r in ctx.runtimes]
                held = {}
                for runtime in ctx.runtimes:
                    for sink in runtime.sinks:
                        try:
                            held[sink.target] = ctx.file_value(Path(sink.target))
                        except (OSError, ValueError) as exc:
                            held[sink.target] = repr(exc)
                lines = env.leak_guard.lines()
                starts = [i for i, line in enumerate(lines) if line.get("event") == "jobs loaded"]
                refreshed = sum(
                    1
                    for line in lines[starts[-1] if starts else 0 :]
                    if line.get("event") == "token refreshed"
                )
                with anyio.move_on_after(2):
                    while len(hook.calls) < refreshed or (
                        sc.command_notifier
                        and (not dump.exists() or dump.read_text().count("ARGV ") < refreshed)
                    ):
                        await anyio.sleep(0.01)
            finally:
                await ctx.stop()
        if reader.error is not None:
            failures.append(f"reader thread crashed: {reader.error!r}")

    obs = ctx.observer
    # I1 ------------------------------------------------------------------
    if sc.i1_na:
        status["I1"] = "n/a"
    elif obs.expired:
        status["I1"] = "FAIL"
        failures += obs.expired[:3]
    # I2 ------------------------------------------------------------------
    if obs.torn:
        status["I2"] = "FAIL"
        failures += obs.torn[:3]
    elif obs.reads == 0:
        status["I2"] = "ok (no file)"
    # I3 ------------------------------------------------------------------
    lost = obs.lost + obs.regressions + obs.bad
    leaked_bad = obs.seen() & ctx.rejected
    if leaked_bad:
        lost.append(f"{len(leaked_bad)} rejected token(s) were published")
    now = env.clock.now()
    for runtime, token, unwritten in final:
        if token is None or unwritten or not token.is_valid(now):
            continue
        for sink in runtime.sinks:
            if held[sink.target] != token.value:
                lost.append(f"{Path(sink.target).name} does not hold the current token")
    if lost:
        status["I3"] = "FAIL"
        failures += lost[:3]
    # I4 ------------------------------------------------------------------
    for runtime, _, _ in final:
        if runtime.failure_message:
            ctx.errors_seen.add(runtime.failure_message)
    outputs = [*ctx.outputs, *sorted(ctx.errors_seen), hook.text()]
    if dump.exists():
        outputs.append(dump.read_text())
    env.leak_guard.extra_outputs.extend(outputs)
    try:
        for text in [env.leak_guard.buffer.getvalue(), *outputs]:
            env.leak_guard.check(text)
    except AssertionError as exc:
        status["I4"] = "FAIL"
        failures.append(str(exc))
    # I5 ------------------------------------------------------------------
    count = ctx.pressure() if ctx.pressure else ctx.emulator.count(ctx.token_path)
    bursts = burst_violations(ctx.emulator, ctx.token_path, sc.burst) if sc.burst else []
    if ctx.bound is None:
        failures.append("scenario did not state its request bound")
        status["I5"] = "FAIL"
    elif count > ctx.bound or bursts:
        status["I5"] = "FAIL"
        failures.append(
            f"{count} requests > bound {ctx.bound} ({ctx.bound_why})"
            if count > ctx.bound
            else bursts[0]
        )
    else:
        status["I5"] = f"ok ≤{ctx.bound}"
    requests = requests_summary(ctx.emulator, ctx.token_path)
    if ctx.pressure_label:
        requests += f"; {count} {ctx.pressure_label}"
    if specific is not None:
        failures.insert(0, f"scenario assertion: {type(specific).__name__}: {specific}")
    notes = "; ".join(filter(None, [sc.notes, *ctx.notes]))
    record(env.nodeid, Row(sc.id, sc.group, status, requests, notes))
    if failures:
        raise AssertionError(f"[{sc.id}] " + "\n".join(failures))
