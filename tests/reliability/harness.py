"""The shared scenario runner of the fault matrix.

A `Scenario` is data (provider, sink format, policy, how the endpoint misbehaves)
plus a short async `run(ctx)` that drives the injected clock through the fault and
makes the scenario's own assertions. `run_scenario` does everything else and checks
the five invariants of the reliability matrix for every scenario:

I1  no expired-token window while the outage is shorter than the refresh margin:
    a reader thread polls every sink file throughout (expiry judged on the injected
    clock) and the driver checks, before every jump of the clock, that the file's
    token survives until the moment it jumps to;
I2  no torn or empty file: every read is parsed (JWT decoded unverified, or the
    json format's ``expires_at``); symlinks are not followed (O_NOFOLLOW);
I3  no valid token lost: a file never disappears or goes back to an older token,
    never holds a token that fails verification or was rejected, and at the end
    holds the daemon's current token;
I4  no secret in any output: captured logs (leak_guard), ``/v1/tokens``,
    ``/metrics``, ``/readyz``, every error message the daemon held, webhook
    payloads and (where enabled) the notifier command's argv and environment;
I5  bounded provider pressure: token requests at the emulator within the bound the
    scenario derives from the backoff / Retry-After arithmetic, and never more than
    `burst` requests for one client at the same simulated instant.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from refresher.clock import ManualClock
from refresher.demo.base import Emulator, Fault
from refresher.server import create_app

# ------------------------------------------------------------------ results table

INVARIANTS = ("I1", "I2", "I3", "I4", "I5")


@dataclass
class Row:
    scenario: str
    group: str
    invariants: dict[str, str]
    requests: str
    notes: str
    outcome: str = "?"


#: nodeid → row, filled by every scenario (in-process and process-level).
RESULTS: dict[str, Row] = {}


def record(nodeid: str, row: Row) -> None:
    RESULTS[nodeid] = row


def render_table(rows: list[Row]) -> str:
    lines = [
        "| scenario | group | I1 expiry | I2 torn | I3 lost | I4 leak | I5 pressure "
        "| requests at emulator | result | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row.invariants.get(i, "-") for i in INVARIANTS]
        lines.append(
            f"| {row.scenario} | {row.group} | "
            + " | ".join(cells)
            + f" | {row.requests} | {row.outcome} | {row.notes} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ reading sinks


class Torn(Exception):
    """The content of a sink file is not a complete token document."""


def unverified_claims(value: str) -> dict[str, Any] | None:
    if value.count(".") != 2:
        return None
    try:
        claims = jwt.decode(value, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None


def parse_rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def parse_sink(content: bytes, fmt: str) -> tuple[str, float]:
    """(token value, expiry) of a sink file, or `Torn`."""
    if not content:
        raise Torn("empty file")
    try:
        text = content.decode()
    except UnicodeDecodeError:
        raise Torn("not UTF-8") from None
    if not text.endswith("\n"):
        raise Torn(f"no final newline ({len(text)} bytes)")
    if fmt == "raw":
        value = text[:-1]
        claims = unverified_claims(value)
        if claims is None or not isinstance(claims.get("exp"), (int, float)):
            raise Torn(f"not a JWT with exp ({len(text)} bytes)")
        return value, float(claims["exp"])
    if fmt == "json":
        try:
            doc = json.loads(text)
            value = doc["value"]
            expiry = parse_rfc3339(doc["expires_at"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Torn(f"json sink unreadable: {type(exc).__name__}") from None
        if not isinstance(value, str) or not value:
            raise Torn("json sink without value")
        claims = unverified_claims(value)
        if claims is not None and isinstance(claims.get("exp"), (int, float)):
            expiry = min(expiry, float(claims["exp"]))
        return value, expiry
    raise ValueError(f"reader does not know format {fmt!r}")


def read_nofollow(path: Path) -> bytes:
    """Read a sink file the way the matrix judges it: never through a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class Observer:
    """Judges every read of the sink files (from the reader thread and the driver)."""

    def __init__(
        self,
        paths: list[Path],
        fmt: str,
        now: Callable[[], float],
        token_ok: Callable[[str], bool],
    ) -> None:
        self.paths = paths
        self.fmt = fmt
        self.now = now
        self.token_ok = token_ok
        self.lock = threading.Lock()
        self.reads = 0
        self.torn: list[str] = []
        self.expired: list[str] = []
        self.lost: list[str] = []
        self.regressions: list[str] = []
        self.bad: list[str] = []
        self.foreign = 0
        self.history: dict[Path, list[str]] = {p: [] for p in paths}
        self.expiry_exempt: set[Path] = set()
        self.missing_ok: set[Path] = set()
        self._verified: dict[str, bool] = {}

    def exempt(self, paths: list[Path] | None = None, *, missing: bool = False) -> None:
        with self.lock:
            for path in paths or self.paths:
                self.expiry_exempt.add(path)
                if missing:
                    self.missing_ok.add(path)

    def unexempt(self, paths: list[Path] | None = None) -> None:
        with self.lock:
            for path in paths or self.paths:
                self.expiry_exempt.discard(path)
                self.missing_ok.discard(path)

    def observe(self, path: Path, at: float | None = None, where: str = "reader") -> None:
        moment = self.now() if at is None else at
        try:
            content = read_nofollow(path)
        except FileNotFoundError:
            self._missing(path, moment)
            return
        except NotADirectoryError:
            self._missing(path, moment)
            return
        except OSError as exc:
            if exc.errno == 40:  # ELOOP: a symlink now stands where the file was
                with self.lock:
                    self.foreign += 1
                return
            raise
        with self.lock:
            self.reads += 1
            try:
                value, expiry = parse_sink(content, self.fmt)
            except Torn as exc:
                self.torn.append(f"{path.name} ({where}): {exc}")
                return
            history = self.history[path]
            if not history or history[-1] != value:
                if value in history:
                    self.regressions.append(f"{path.name}: went back to an older token")
                history.append(value)
            ok = self._verified.get(value)
            if ok is None:
                ok = self._verified[value] = self.token_ok(value)
            if not ok:
                self.bad.append(f"{path.name}: published a token that fails verification")
            if expiry <= moment and path not in self.expiry_exempt:
                self.expired.append(
                    f"{path.name} ({where}): token expired {moment - expiry:.1f}s before "
                    f"t+{moment % 100000:.1f}"
                )

    def _missing(self, path: Path, moment: float) -> None:
        with self.lock:
            if self.history[path] and path not in self.missing_ok:
                self.lost.append(f"{path.name}: file disappeared at t={moment:.1f}")

    def observe_all(self, at: float | None = None, where: str = "driver") -> None:
        for path in self.paths:
            self.observe(path, at, where)

    def seen(self) -> set[str]:
        with self.lock:
            return {v for values in self.history.values() for v in values}


class SinkReader:
    """A thread that reads every sink file in a loop for the whole scenario."""

    def __init__(self, observer: Observer, interval: float = 0.001) -> None:
        self.observer = observer
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sink-reader", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for path in self.observer.paths:
                    self.observer.observe(path)
                time.sleep(self.interval)
        except BaseException as exc:  # surfaced by the runner
            self.error = exc

    def __enter__(self) -> SinkReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# ------------------------------------------------------------------ pressure arithmetic


def backoff_budget(duration: float, initial: float, cap: float, *, halving: bool = True) -> int:
    """An upper bound on attempts during an outage of `duration` seconds under
    full-jitter exponential backoff (delay uniform in [0, min(cap, initial·2ⁿ)],
    floored at initial/10): twice the expected count (ramp while the cap doubles,
    then one attempt per cap/2 on average), plus the halving steps the scheduler
    takes to land a retry before expiry (about log2 of the remaining lifetime)."""
    ramp = math.ceil(math.log2(max(cap / initial, 1))) + 1
    steady = math.ceil(2 * duration / cap)
    extra = math.ceil(math.log2(max(duration, 2))) + 1 if halving else 0
    return 2 * (ramp + steady) + extra


# ------------------------------------------------------------------ scenario data


@dataclass
class Scenario:
    id: str
    group: str
    run: Callable[[Ctx], Awaitable[None]]
    provider: str = "oauth2"  # oauth2 | gooclaim | debitura | dutyclaims
    endpoint: str = "emulator"  # emulator | tls | tls-ca | proxy | closed
    fmt: str = "raw"
    lifetime: int = 3600
    refresh: dict[str, Any] = field(default_factory=dict)
    provider_cfg: dict[str, Any] = field(default_factory=dict)
    job_cfg: dict[str, Any] = field(default_factory=dict)
    sink_cfg: dict[str, Any] = field(default_factory=dict)
    #: Runs after the emulator started, before the daemon does (may edit ctx.config).
    setup: Callable[[Ctx], None] | None = None
    tenants: tuple[str, ...] = ("t-good", "t-bad")
    command_notifier: bool = False
    #: Serve the daemon's HTTP API on a real socket (else /v1/tokens etc. in process).
    http: bool = False
    #: None: I1 is checked; otherwise the reason it does not apply.
    i1_na: str | None = None
    burst: int = 1
    xfail: str | None = None
    notes: str = ""


class Ctx:
    """What a scenario's `run` works with."""

    def __init__(self, sc: Scenario, clock: ManualClock, tmp_path: Path) -> None:
        self.sc = sc
        self.clock = clock
        self.tmp_path = tmp_path
        self.sink_dir = tmp_path / "sink"
        self.sink_dir.mkdir()
        self.emulator: Any = None
        self.proxy: Any = None
        self.daemon: Any = None
        self.observer: Observer = None  # type: ignore[assignment]
        self.outputs: list[str] = []
        self.errors_seen: set[str] = set()
        self.rejected: set[str] = set()
        self.bound: int | None = None
        self.bound_why = ""
        self.pressure: Callable[[], int] | None = None
        self.pressure_label = ""
        self.notes: list[str] = []
        self.active_writes = 0
        self.proxy_windows: list[tuple[float, float, str]] = []
        self.token_path = "/oauth/token"
        self.config: dict[str, Any] = {}
        self.env: Any = None
        self.cleanups: list[Callable[[], None]] = []
        self.minting_bad = False
        self.secret_file: Path | None = None
        self._hooks: dict[int, list[Callable[[Any, float], None]]] = {}
        self._start: Any = None
        self._daemon_cm: Any = None

    async def start(self) -> None:
        self._daemon_cm = self._start(self.config, serve_http=self.sc.http)
        self.daemon = await self._daemon_cm.__aenter__()
        instrument_writes(self)

    async def stop(self) -> None:
        await self._daemon_cm.__aexit__(None, None, None)

    async def restart(self) -> None:
        """Stop the daemon (gracefully) and start a new one on the same config and files."""
        await self.stop()
        await self.start()

    # ---------------------------------------------------------- views

    @property
    def sched(self) -> Any:
        return self.daemon.scheduler

    @property
    def runtimes(self) -> list[Any]:
        return list(self.sched.jobs.values())

    @property
    def rt(self) -> Any:
        (runtime,) = [r for r in self.runtimes if r.tenant is None] or self.runtimes[:1]
        return runtime

    def runtime(self, tenant: str | None) -> Any:
        return next(r for r in self.runtimes if r.tenant == tenant)

    @property
    def paths(self) -> list[Path]:
        return self.observer.paths

    @property
    def path(self) -> Path:
        return self.observer.paths[0]

    def path_of(self, tenant: str) -> Path:
        return next(p for p in self.observer.paths if p.name.startswith(tenant + "."))

    def file_value(self, path: Path | None = None) -> str:
        return parse_sink(read_nofollow(path or self.path), self.sc.fmt)[0]

    def metric(self, name: str, **labels: str) -> float | None:
        text = generate_latest(self.daemon.metrics.registry).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return sample.value
        return None

    async def get(self, path: str) -> tuple[int, str]:
        """GET from the daemon's HTTP app: over its real listener when the scenario
        serves HTTP, else in process (the same Starlette app, without uvicorn)."""
        if self.daemon.port is not None:
            client = httpx2.AsyncClient(
                base_url=f"http://127.0.0.1:{self.daemon.port}", verify=False
            )
        else:
            app = create_app(self.sched, self.daemon.metrics)
            client = httpx2.AsyncClient(
                transport=httpx2.ASGITransport(app=app), base_url="http://refresher.test"
            )
        async with client:
            response = await client.get(path)
        self.outputs.append(response.text)
        return response.status_code, response.text

    def expect_max(self, bound: int, why: str) -> None:
        self.bound, self.bound_why = bound, why

    def note(self, text: str) -> None:
        self.notes.append(text)

    # ---------------------------------------------------------- faults on simulated time

    def _patch(self, emu: Emulator) -> list[Callable[[Any, float], None]]:
        hooks = self._hooks.get(id(emu))
        if hooks is None:
            hooks = self._hooks[id(emu)] = []
            original = emu.apply_fault

            async def apply_fault() -> Any:
                now = emu.clock.now()
                for hook in hooks:
                    hook(emu, now)
                return await original()

            emu.apply_fault = apply_fault  # type: ignore[method-assign]
        return hooks

    def fault_window(
        self,
        start: float,
        end: float,
        factory: Callable[[Any], Fault],
        *,
        limit: int | None = None,
        emulator: Emulator | None = None,
    ) -> None:
        """Every token request in [start, end) on the injected clock gets `factory(emu)`
        (at most `limit` of them)."""
        hits = [0]

        def hook(emu: Any, now: float) -> None:
            if start <= now < end and (limit is None or hits[0] < limit):
                hits[0] += 1
                emu.inject(factory(emu))

        self._patch(emulator or self.emulator).append(hook)

    def knob_window(self, start: float, end: float, apply: Callable[[Any, bool], None]) -> None:
        """`apply(emu, on)` before every token request: on inside [start, end)."""
        self._patch(self.emulator).append(lambda emu, now: apply(emu, start <= now < end))

    def proxy_window(self, start: float, end: float, mode: str) -> None:
        self.proxy_windows.append((start, end, mode))

    def proxy_plan(self, now: float) -> str:
        for start, end, mode in self.proxy_windows:
            if start <= now < end:
                return mode
        return "pass"

    # ---------------------------------------------------------- driving the clock

    def _quiet(self) -> bool:
        sched = self.sched
        if sched.requests_in_flight or self.active_writes:
            return False
        if any(r.refreshing is not None for r in list(sched.jobs.values())):
            return False
        now = self.clock.now()
        heap = sched._heap
        if heap and heap[0][0] <= now:
            return False
        if heap:
            armed = self.clock.next_deadline()
            if armed is None or armed > heap[0][0] + 1e-9:
                return False
        return True

    async def settle(self, timeout: float = 20.0) -> None:
        """Wait (real time) until nothing is in flight and the scheduler re-armed."""
        give_up = time.monotonic() + timeout
        stable = 0
        while stable < 2:
            await anyio.sleep(0.001)
            stable = stable + 1 if self._quiet() else 0
            if time.monotonic() > give_up:
                raise AssertionError("the daemon did not settle")
        for runtime in self.runtimes:
            if runtime.failure_message:
                self.errors_seen.add(runtime.failure_message)

    async def run_until(self, target: float, until: Callable[[], bool] | None = None) -> bool:
        """Advance the clock deadline by deadline up to `target` (or until `until()`),
        checking before each jump that every sink's token survives the jump."""
        while True:
            await self.settle()
            self.observer.observe_all(where="driver")
            if until is not None and until():
                return True
            now = self.clock.now()
            if now >= target:
                return until is None
            armed = self.clock.next_deadline()
            step = target if armed is None or armed > target else armed
            self.observer.observe_all(at=step, where="driver, before jump")
            await self.clock.set(step)

    async def first_token(self) -> Any:
        await self.settle()
        for runtime in self.runtimes:
            assert runtime.token is not None and not runtime.unwritten, (
                f"no first token: {runtime.failure_message}"
            )
        return self.runtimes[0].token


# ------------------------------------------------------------------ instrumentation


def instrument_writes(ctx: Ctx) -> None:
    """Count sink writes in progress, so the driver never jumps during one."""
    for runtime in ctx.runtimes:
        for sink in runtime.sinks:
            original = sink.write

            async def write(token: Any, _original: Any = original) -> None:
                ctx.active_writes += 1
                try:
                    await _original(token)
                finally:
                    ctx.active_writes -= 1

            sink.write = write


def requests_summary(emu: Emulator, path: str) -> str:
    with emu._lock:
        statuses = Counter(r.status for r in emu.requests if r.path == path)
    total = sum(statuses.values())
    detail = ", ".join(f"{s}×{n}" for s, n in sorted(statuses.items()))
    return f"{total} ({detail})" if total else "0"


def burst_violations(emu: Emulator, path: str, burst: int) -> list[str]:
    with emu._lock:
        moments = Counter((r.client, round(r.at, 6)) for r in emu.requests if r.path == path)
    return [
        f"{n} requests from {client!r} at the same simulated instant"
        for (client, _), n in moments.items()
        if n > burst
    ]
