"""Part 4: restart cost with many valid tokens on disk.

``prepare``: a cold start: a daemon mints every tenant's token (JSON file sinks, the
server issues long-lived tokens, 30 min like Debitura's), waits until all are valid,
then stops gracefully (exactly what SIGTERM does). This is also the cold-start
throughput at scale (all tenants due at once).

``restart``: a new process starts a daemon on the same config and files. Reported:
time to ready, from process start (interpreter, imports, config) and from
`Daemon()`: (a) `scheduler.ready()`, i.e. every job holds a valid token, which is
what ``/readyz`` reports; (b) `scheduler.first_round`, which gates systemd
``READY=1``; and the token requests the server saw during the first `observe`
seconds (target 0: every token on disk is valid and not due).
The child prints ``READY {...}`` when (a) holds, then ``RESULT {...}`` at the end.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import psutil

from tests.bench.common import emit, process_cpu, quiet_logging, rss_mb


def server_total(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_stats", timeout=10) as response:
        return int(json.loads(response.read())["total"])


async def prepare(args: argparse.Namespace) -> dict[str, Any]:
    from refresher.daemon import Daemon
    from tests.bench.scale import debitura_settings

    tenants = [f"tenant-{i:05d}" for i in range(args.jobs)]
    directory = Path(args.dir)
    requests0 = server_total(args.url)
    cpu0 = process_cpu()
    with quiet_logging():
        daemon = Daemon(debitura_settings(args.url, tenants, directory), serve_http=False)
        started = time.monotonic()
        async with daemon.running():
            scheduler = daemon.scheduler
            with anyio.fail_after(args.timeout):
                while not scheduler.ready():
                    await anyio.sleep(0.05)
            cold_start = time.monotonic() - started
            peak = scheduler.peak_requests_in_flight
        stopped = time.monotonic() - started - cold_start
    files = sum(1 for p in directory.iterdir() if p.suffix == ".json")
    mints = server_total(args.url) - requests0
    return {
        "jobs": args.jobs,
        "cold_start_s": cold_start,
        "cold_start_mints_per_s": mints / cold_start,
        "cold_start_cpu_per_mint_ms": (process_cpu() - cpu0) / max(mints, 1) * 1e3,
        "cold_start_peak_inflight": peak,
        "stop_s": stopped,
        "mints": mints,
        "files": files,
    }


async def restart(args: argparse.Namespace) -> dict[str, Any]:
    from refresher.daemon import Daemon
    from tests.bench.scale import debitura_settings

    process_start = psutil.Process().create_time()
    tenants = [f"tenant-{i:05d}" for i in range(args.jobs)]
    requests0 = server_total(args.url)
    with quiet_logging():
        before_daemon = time.time()
        cpu0 = process_cpu()
        daemon = Daemon(debitura_settings(args.url, tenants, Path(args.dir)), serve_http=False)
        async with daemon.running():
            loaded = time.time()
            scheduler = daemon.scheduler
            recovered = sum(1 for r in scheduler.jobs.values() if r.token is not None)
            ready_at = first_round_at = mints = None
            deadline = before_daemon + args.observe
            give_up = loaded + args.observe + 60
            # Poll until the observation window is over and ready was seen (or never).
            while True:
                now = time.time()
                if ready_at is None and scheduler.ready():
                    ready_at = now
                    load_cpu = process_cpu() - cpu0
                    print(
                        "READY " + json.dumps({"since_process_start_s": now - process_start}),
                        flush=True,
                    )
                if first_round_at is None and scheduler.first_round.is_set():
                    first_round_at = now
                if mints is None and now >= deadline:
                    # Loading may outlast the window: then this counts what the
                    # daemon sent before it even started its scheduler (nothing).
                    mints = server_total(args.url) - requests0
                if mints is not None and (ready_at is not None or now >= give_up):
                    break
                await anyio.sleep(0.05)
            rss = rss_mb()
    if ready_at is None:
        print("READY " + json.dumps({"since_process_start_s": None}), flush=True)
        load_cpu = process_cpu() - cpu0
    return {
        "jobs": args.jobs,
        "recovered": recovered,
        "observe_s": args.observe,
        "mints_in_window": mints,
        "mints_total": server_total(args.url) - requests0,
        "load_s": loaded - before_daemon,
        "load_cpu_s": load_cpu,
        "ready_since_daemon_s": ready_at - before_daemon if ready_at else None,
        "ready_since_process_start_s": ready_at - process_start if ready_at else None,
        "first_round_since_daemon_s": first_round_at - before_daemon if first_round_at else None,
        "rss_mb": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["prepare", "restart"])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--observe", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    emit(anyio.run(prepare if args.mode == "prepare" else restart, args))


if __name__ == "__main__":
    main()
