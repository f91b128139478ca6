"""Part 2 (and 5): many Debitura tenants on the real clock, in steady state.

One child process per run (so RSS is this daemon's alone):

1. starts the token server (separate process) issuing `lifetime`-second tokens;
2. measures the raw-httpx2 reference in this process: CPU per Debitura-format token
   request (POST JSON + parse) at concurrency 16 (before and again after the run, the
   mean of both is the reference), and paced at the run's expected steady-state
   request rate (one task per request, like a scheduler would);
3. seeds steady state: one JSON token file per tenant (the FileSink format),
   obtained at a uniformly random moment of the last mean refresh interval, so
   refreshes come due evenly as in a long-running daemon (a cold start instead mints
   all tenants at once and then refreshes them in synchronized waves: that is part
   4's cold start, not steady state);
4. runs a `Daemon` (no HTTP server, SystemClock) for `duration` seconds: it adopts
   the seeded tokens and refreshes each one several times.

Measuring: every provider is wrapped by `TimedProvider`, which, before delegating to
the real `fetch`, records ``clock.now() − runtime.next_refresh_at`` (the planned
moment the scheduler dispatched from) as the scheduler lag (for refreshes planned
after a warm-up of min(10 s, 20 % of the run), so the tokens already due at start
do not count), and counts a miss when
the job's current token has already expired. Tokens still invalid at the end
count as missed too. RSS is sampled every second (psutil); CPU is this process's
user+system time while the daemon runs, divided by the refreshes it made.
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import hmac
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from tests.bench.common import (
    API_KEY,
    DelegatingProvider,
    ServerProcess,
    emit,
    percentile,
    process_cpu,
    quiet_logging,
    rss_mb,
    sink_root,
    wrapped_providers,
)


class Recorder:
    def __init__(self) -> None:
        self.lags: list[float] = []
        self.first_mints = 0
        self.refreshes = 0
        self.missed = 0
        self.runtimes: dict[Any, Any] = {}
        #: Lag counts for refreshes planned from this moment on (after warm-up).
        self.measure_from = math.inf


class TimedProvider(DelegatingProvider):
    """Delegates to the real provider; notes lag and misses at fetch start."""

    async def fetch(self, tenant: str | None) -> Any:
        now = self._clock.now()
        rec = self._rec
        runtime = rec.runtimes.get((self._job, tenant))
        if runtime is None or runtime.token is None:
            rec.first_mints += 1
        else:
            rec.refreshes += 1
            planned = runtime.next_refresh_at
            if planned is not None and planned >= rec.measure_from:
                rec.lags.append(now - planned)
            if not runtime.token.is_valid(now):
                rec.missed += 1
        return await self._inner.fetch(tenant)


class GCPauses:
    """Wall time of each garbage collection while the daemon runs."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._started)

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        return {
            f"gen{g}": {"n": len(p), "max_ms": max(p) * 1e3 if p else 0.0}
            for g, p in self.pauses.items()
        }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def seed_tokens(
    sink_dir: Path, tenants: list[str], *, lifetime: float, spread: float, now: float
) -> None:
    """Write each tenant's JSON token file as FileSink would, obtained at a random
    moment within the last `spread` seconds (the tokens are HS256 JWTs with iat/exp)."""
    from refresher.config import FileSinkConfig
    from refresher.sinks.file import render
    from refresher.token import Token

    config = FileSinkConfig(kind="file", path=str(sink_dir / "{tenant}.json"), format="json")
    key = os.urandom(32)
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    rng = random.Random(42)
    for tenant in tenants:
        obtained = now - rng.uniform(0, spread)
        expires = math.floor(obtained + lifetime)
        claims = {"sub": tenant, "externalTenantId": tenant, "iat": int(obtained), "exp": expires}
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = _b64(hmac.new(key, f"{header}.{body}".encode(), hashlib.sha256).digest())
        token = Token(
            value=f"{header}.{body}.{signature}",
            token_type="Bearer",
            obtained_at=obtained,
            expires_at=float(expires),
            extra={"externalTenantId": tenant},
        )
        (sink_dir / f"{tenant}.json").write_bytes(render(token, config))


def debitura_settings(
    url: str, tenants: list[str], sink_dir: Path, *, coalesce: float | None = None
) -> Any:
    from refresher.config import load_settings

    refresh = {} if coalesce is None else {"coalesce": coalesce}
    return load_settings(
        data={
            "server": {"listen": "127.0.0.1:0"},
            "refresh": refresh,
            "jobs": [
                {
                    "name": "debitura",
                    "provider": {
                        "kind": "debitura",
                        "base_url": url,
                        "api_key": API_KEY,
                        "tenants": tenants,
                    },
                    "sinks": [
                        {"kind": "file", "path": f"{sink_dir}/{{tenant}}.json", "format": "json"}
                    ],
                }
            ],
        }
    )


async def raw_paced_cpu(url: str, rate: float, seconds: float) -> dict[str, float]:
    """Raw httpx2 CPU per request when requests are spread at `rate`/s (one task
    each, started at its planned moment), as the scheduler's steady state sends them."""
    import httpx2

    headers = {"XApiKey": API_KEY}
    n = max(20, int(rate * seconds))
    async with httpx2.AsyncClient(base_url=url) as client:

        async def one(i: int) -> None:
            response = await client.post(
                "/oauth/token", headers=headers, json={"externalTenantId": f"p-{i:06d}"}
            )
            response.raise_for_status()
            if not response.json()["accessToken"]:
                raise AssertionError("no token")

        await one(-1)
        rng = random.Random(3)
        start = time.monotonic()
        moments = sorted(rng.uniform(0, n / rate) for _ in range(n))
        cpu = process_cpu()
        async with anyio.create_task_group() as tg:
            for i, moment in enumerate(moments):
                delay = start + moment - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(one, i)
        return {
            "cpu_per_request_ms": (process_cpu() - cpu) / n * 1e3,
            "rate": n / (time.monotonic() - start),
        }


def mean_refresh_interval(lifetime: float) -> float:
    """Seconds between a tenant's refreshes with the default policy: at 0.75 × lifetime
    ± 10 % jitter, capped at expiry − 25 %, i.e. between 0.675 and 0.75 of it."""
    return 0.7125 * lifetime


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.bench.throughput import raw_debitura_cpu

    lifetime = float(args.lifetime)
    jobs = args.jobs
    interval = mean_refresh_interval(lifetime)
    steady_rate = jobs / interval
    result: dict[str, Any] = {"jobs": jobs, "lifetime_s": lifetime, "duration_s": args.duration}
    root = Path(tempfile.mkdtemp(prefix="refresher-scale-", dir=args.sink_root or sink_root()))
    result["sink_fs"] = str(root.parent)
    try:
        recorder = Recorder()
        timed = wrapped_providers(
            lambda provider, job, clock: TimedProvider(provider, job.name, clock, recorder)
        )
        with quiet_logging(), timed, ServerProcess("fast", lifetime) as server:
            if args.raw_n:
                result["raw_saturated"] = await raw_debitura_cpu(server.url, args.raw_n)
                result["raw_paced"] = await raw_paced_cpu(
                    server.url, min(steady_rate, 400.0), args.raw_paced_s
                )
            tenants = [f"tenant-{i:05d}" for i in range(jobs)]
            # Obtained uniformly over one mean refresh interval, as in a daemon that has
            # run for a while; the few already due when loading ends are refreshed at
            # once, so lag counts only refreshes planned after a warm-up.
            seed_tokens(root, tenants, lifetime=lifetime, spread=interval, now=time.time())
            from refresher.daemon import Daemon

            gc.collect()
            rss_before = rss_mb()
            server_cpu0 = server.cpu()
            requests0 = server.stats()["total"]
            cpu0 = process_cpu()
            t0 = time.time()
            daemon = Daemon(
                debitura_settings(server.url, tenants, root, coalesce=args.coalesce),
                serve_http=False,
            )
            profiler = _profiler(args.profile)
            async with daemon.running():
                if profiler is not None:
                    profiler.start()
                scheduler = daemon.scheduler
                recorder.runtimes = scheduler.jobs
                loaded = time.time()
                cpu_loaded = process_cpu()
                warmup = min(10.0, 0.2 * args.duration)
                recorder.measure_from = loaded + warmup
                result["load_s"] = loaded - t0
                result["recovered"] = sum(1 for r in scheduler.jobs.values() if r.token)
                rss_samples: list[float] = []
                pauses = GCPauses()
                deadline = loaded + args.duration
                while time.time() < deadline:
                    await anyio.sleep(1.0)
                    rss_samples.append(rss_mb())
                pauses.stop()
                cpu_run = process_cpu() - cpu_loaded
                elapsed = time.time() - loaded
                if profiler is not None:
                    profiler.stop()
                    Path(args.profile).write_text(
                        profiler.output_text(unicode=False, color=False, show_all=True)
                    )
                now = daemon.clock.now()
                invalid_at_end = sum(1 for r in scheduler.jobs.values() if not r.valid(now))
                failures = sum(r.failures for r in scheduler.jobs.values())
                peak_inflight = scheduler.peak_requests_in_flight
            server_cpu = server.cpu() - server_cpu0
            stats = server.stats()
            if args.raw_n:
                # Again after the run: the reference is the mean of both sides, so a
                # neighbour's load during one of them does not decide the ratio.
                before = result["raw_saturated"]
                after = await raw_debitura_cpu(server.url, args.raw_n)
                result["raw_saturated"] = {
                    key: (before[key] + after[key]) / 2 for key in before
                } | {"samples_ms": [before["cpu_per_request_ms"], after["cpu_per_request_ms"]]}
        fetches = recorder.first_mints + recorder.refreshes
        lags_ms = [lag * 1e3 for lag in recorder.lags]
        steady = rss_samples[len(rss_samples) // 2 :] or rss_samples
        result.update(
            {
                "lag_warmup_s": warmup,
                "rss_before_daemon_mb": rss_before,
                "rss_steady_mb": max(steady) if steady else math.nan,
                "rss_end_mb": rss_samples[-1] if rss_samples else math.nan,
                "load_cpu_s": cpu_loaded - cpu0,
                "run_s": elapsed,
                "refreshes": recorder.refreshes,
                "first_mints": recorder.first_mints,
                "refreshes_per_job": recorder.refreshes / jobs,
                "refresh_rate_per_s": fetches / elapsed,
                "cpu_run_s": cpu_run,
                "cpu_per_refresh_ms": cpu_run / fetches * 1e3 if fetches else math.nan,
                "cpu_share": cpu_run / elapsed,
                "lag_ms": {
                    "p50": percentile(lags_ms, 50),
                    "p99": percentile(lags_ms, 99),
                    "max": max(lags_ms) if lags_ms else math.nan,
                    "n": len(lags_ms),
                },
                # A token that expired before its refresh is either caught when that
                # refresh starts, or still invalid at the end.
                "missed": recorder.missed + invalid_at_end,
                "gc": pauses.summary(),
                "invalid_at_end": invalid_at_end,
                "failures": failures,
                "peak_inflight": peak_inflight,
                "server_requests": stats["total"] - requests0,
                "server_status_counts": stats["counts"],
                "server_cpu_share": server_cpu / (time.time() - t0),
            }
        )
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _profiler(path: str | None) -> Any:
    """pyinstrument over the daemon's run (``--profile out.txt``), if installed."""
    if not path:
        return None
    from pyinstrument import Profiler

    return Profiler(interval=0.001, async_mode="disabled")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--lifetime", type=float, default=60.0)
    parser.add_argument("--duration", type=float, default=100.0)
    parser.add_argument("--raw-n", type=int, default=2000)
    parser.add_argument("--raw-paced-s", type=float, default=8.0)
    parser.add_argument("--sink-root", default=None)
    parser.add_argument("--profile", default=None, help="write a pyinstrument profile here")
    parser.add_argument(
        "--coalesce", type=float, default=None, help="refresh.coalesce (default: the daemon's)"
    )
    emit(anyio.run(run, parser.parse_args()))


if __name__ == "__main__":
    main()
