"""Part 3: 2,000 Gooclaim jobs sharing one client id (60 token requests/min).

Simulated time: one `ManualClock` drives the daemon and the in-process
`GooclaimEmulator` (its sliding-window limiter and the ``iat``/``exp`` of its RS256
tokens read the same clock), so 33 simulated minutes take seconds. The driver
advances the clock from one sleeper's deadline to the next, and before each step
waits (in real time) until no request is in flight, so every request is stamped
with the simulated moment it was sent.

Phase A, cold start: every job needs a token; how long (simulated) until all are
valid, against the arithmetic (2,000 / 60 per min = 33.3 min; with a sliding window
the first 60 go at once, so the tight bound is 33 full windows = 33.0 min).
Phase B, one refresh round: the daemon keeps running until every job refreshed
once more. Throughout: requests over the limit at the emulator (its window
maximum and 429 answers), tokens that expired before their refresh, and the order
of service: at each token request, how many *other* jobs were already waiting
(dispatched, not yet sent) whose current token expires sooner ("inversions":
0 means strictly earliest-expiring first).
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from tests.bench.common import (
    DelegatingProvider,
    emit,
    nodelay,
    quiet_logging,
    sink_root,
    wrapped_providers,
)

CLIENT_ID = "bench-gooclaim"
CLIENT_SECRET = "bench-gooclaim-secret-value"


class OrderRecorder:
    def __init__(self) -> None:
        self.scheduler: Any = None
        self.sent: dict[Any, Any] = {}
        self.fetches = 0
        self.missed = 0
        self.inversions = 0
        self.contended = 0
        self.track = False


class OrderedProvider(DelegatingProvider):
    """Delegates to the real provider; records order of service at fetch start."""

    async def fetch(self, tenant: str | None) -> Any:
        rec = self._rec
        now = self._clock.now()
        runtime = rec.scheduler.jobs[(self._job, tenant)]
        rec.fetches += 1
        rec.sent[runtime.key] = runtime.refreshing
        mine = _expiry(runtime)
        if runtime.token is not None and not runtime.token.is_valid(now):
            rec.missed += 1
        if rec.track:
            waiting = [
                r
                for r in rec.scheduler.jobs.values()
                if r.refreshing is not None and rec.sent.get(r.key) is not r.refreshing
            ]
            if waiting:
                rec.contended += 1
            rec.inversions += sum(1 for r in waiting if _expiry(r) < mine)
        return await self._inner.fetch(tenant)


def _expiry(runtime: Any) -> float:
    token = runtime.token
    if token is None or token.expires_at is None:
        return -math.inf
    return float(token.expires_at)


async def settle(scheduler: Any) -> None:
    """Real-time wait until nothing is in flight for a few consecutive looks."""
    quiet = 0
    with anyio.fail_after(60):
        while quiet < 3:
            await anyio.sleep(0.001)
            quiet = quiet + 1 if scheduler.requests_in_flight == 0 else 0


async def drive(clock: Any, scheduler: Any, until: Any, horizon: float) -> bool:
    while True:
        await settle(scheduler)
        if until():
            return True
        deadline = None
        for _ in range(200):
            deadline = clock.next_deadline()
            if deadline is not None:
                break
            await anyio.sleep(0.001)
        if deadline is None or deadline > horizon:
            return False
        await clock.set(deadline)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from refresher.clock import ManualClock
    from refresher.config import load_settings
    from refresher.daemon import Daemon
    from refresher.demo.gooclaim import GooclaimEmulator

    jobs, limit = args.jobs, args.limit
    clock = ManualClock(start=math.floor(time.time()))
    root = Path(tempfile.mkdtemp(prefix="refresher-ratelimit-", dir=sink_root()))
    emulator = GooclaimEmulator(
        {CLIENT_ID: CLIENT_SECRET}, clock=clock, token_limit=limit, token_lifetime=args.lifetime
    )
    recorder = OrderRecorder()
    ordered = wrapped_providers(
        lambda provider, job, clock: OrderedProvider(provider, job.name, clock, recorder)
    )
    result: dict[str, Any] = {"jobs": jobs, "limit_per_min": limit, "lifetime_s": args.lifetime}
    try:
        with ordered:
            emulator.start()
            nodelay(emulator)
            key_file = root / "gooclaim.pem"
            key_file.write_bytes(emulator.public_key_pem())
            settings = load_settings(
                data={
                    "server": {"listen": "127.0.0.1:0"},
                    "refresh": {} if args.coalesce is None else {"coalesce": args.coalesce},
                    "jobs": [
                        {
                            "name": f"goo-{i:04d}",
                            "provider": {
                                "kind": "gooclaim",
                                "base_url": emulator.url,
                                "client_id": CLIENT_ID,
                                "client_secret": CLIENT_SECRET,
                                "issuer": emulator.issuer,
                                "public_key_file": str(key_file),
                                "requests_per_minute": limit,
                            },
                            "sinks": [{"kind": "file", "path": str(root / f"goo-{i:04d}.token")}],
                        }
                        for i in range(jobs)
                    ],
                }
            )
            with quiet_logging():
                real_start = time.monotonic()
                daemon = Daemon(settings, clock=clock, serve_http=False, rng=random.Random(7))
                async with daemon.running():
                    scheduler = daemon.scheduler
                    recorder.scheduler = scheduler
                    t0 = clock.now()
                    horizon = t0 + 3 * args.lifetime + 2 * 60 * math.ceil(jobs / limit)
                    ok = await drive(clock, scheduler, scheduler.ready, horizon)
                    all_valid_at = clock.now() - t0 if ok else math.nan
                    phase_a_requests = emulator.count(emulator.token_path)
                    # Phase B: one more refresh for every job.
                    recorder.track = True
                    first = {
                        key: r.token.obtained_at for key, r in scheduler.jobs.items() if r.token
                    }

                    def refreshed_all() -> bool:
                        return all(
                            r.token is not None and r.token.obtained_at > first.get(key, math.inf)
                            for key, r in scheduler.jobs.items()
                        )

                    ok_b = await drive(clock, scheduler, refreshed_all, horizon)
                    phase_b_s = clock.now() - t0 - all_valid_at
                    invalid = sum(1 for r in scheduler.jobs.values() if not r.valid(clock.now()))
                    failures = sum(r.failures for r in scheduler.jobs.values())
                real_s = time.monotonic() - real_start
            full_windows = math.ceil(jobs / limit) - 1
            result.update(
                {
                    "all_valid_sim_s": all_valid_at,
                    "all_valid_sim_min": all_valid_at / 60,
                    "arithmetic_min": jobs / limit,
                    "tight_bound_min": full_windows * 60 / 60,
                    "refresh_round_done": ok_b,
                    "refresh_round_sim_s": phase_b_s,
                    "token_requests": emulator.count(emulator.token_path),
                    "phase_a_requests": phase_a_requests,
                    "http_429": emulator.count(emulator.token_path, status=429),
                    "max_in_window": emulator.token_limiter.max_in_window,
                    "over_limit": max(0, emulator.token_limiter.max_in_window - limit),
                    "missed": recorder.missed,
                    "invalid_at_end": invalid,
                    "failures": failures,
                    "order_inversions": recorder.inversions,
                    "contended_requests": recorder.contended,
                    "phase_b_requests": recorder.fetches - phase_a_requests,
                    "real_s": real_s,
                }
            )
            return result
    finally:
        emulator.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--lifetime", type=float, default=3600.0)
    parser.add_argument(
        "--coalesce", type=float, default=None, help="refresh.coalesce (default: the daemon's)"
    )
    emit(anyio.run(run, parser.parse_args()))


if __name__ == "__main__":
    main()
