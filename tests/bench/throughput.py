"""Part 1: mint throughput against the same out-of-process server, same concurrency.

(a) raw ``httpx2.AsyncClient``: POST the client-credentials form, parse the JSON;
(b) authlib ``AsyncOAuth2Client.fetch_token`` (authlib's httpx integration runs on
    httpx2 here), ``client_secret_post`` like the others;
(c) refresher: `Scheduler.refresh(runtime)` on the runtimes a `Daemon` (no HTTP
    server) built from config: OAuth2Provider.fetch → Token (expiry rule, JWT
    claims) → FileSink (atomic write + fsync) → metrics → structured log line
    (JSON, redacted, to /dev/null) → next refresh scheduled.

Each round runs a block of N mints per implementation, split over `concurrency`
worker tasks, in rotating order, after one warm-up block each (connections,
imports). A ratio is the median over rounds of the ratio within a round: these
machines are noisy, but neighbouring blocks see the same noise.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import httpx2

from tests.bench.common import (
    API_KEY,
    CLIENT_ID,
    CLIENT_SECRET,
    ServerProcess,
    emit,
    process_cpu,
    quiet_logging,
    sink_root,
)

TOKEN_PATH = "/oauth/token"
FORM = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}

Mint = Callable[[int], Awaitable[None]]


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


async def drive(mint: Mint, n: int, concurrency: int) -> None:
    """Run `n` mints over `concurrency` workers (worker i calls mint(i))."""

    async def worker(i: int, count: int) -> None:
        for _ in range(count):
            await mint(i)

    async with anyio.create_task_group() as tg:
        for i, count in enumerate(split(n, concurrency)):
            tg.start_soon(worker, i, count)


async def measure(mint: Mint, n: int, concurrency: int, server: ServerProcess) -> dict[str, float]:
    connections = server.stats().get("connections", 0)
    server_cpu = server.cpu()
    cpu = process_cpu()
    started = time.perf_counter()
    await drive(mint, n, concurrency)
    elapsed = time.perf_counter() - started
    cpu = process_cpu() - cpu
    server_cpu = server.cpu() - server_cpu
    return {
        "mints_per_s": n / elapsed,
        "seconds": elapsed,
        "cpu_per_mint_us": cpu / n * 1e6,
        "server_cpu_share": server_cpu / elapsed,
        "new_connections": server.stats().get("connections", 0) - connections,
    }


Minter = Callable[[str, int], contextlib.AbstractAsyncContextManager[Mint]]

# ------------------------------------------------------------------------ (a) raw httpx2


@contextlib.asynccontextmanager
async def open_raw(url: str, concurrency: int) -> AsyncIterator[Mint]:
    async with httpx2.AsyncClient(base_url=url) as client:

        async def mint(_: int) -> None:
            response = await client.post(TOKEN_PATH, data=FORM)
            response.raise_for_status()
            if not response.json()["access_token"]:
                raise AssertionError("no token")

        yield mint


async def raw_debitura_cpu(url: str, n: int, concurrency: int = 16) -> dict[str, float]:
    """Raw httpx2 CPU per request on the Debitura wire format (the scale reference)."""
    headers = {"XApiKey": API_KEY}
    async with httpx2.AsyncClient(base_url=url) as client:
        tenants = iter(range(10**9))

        async def mint(_: int) -> None:
            response = await client.post(
                TOKEN_PATH, headers=headers, json={"externalTenantId": f"t-{next(tenants):05d}"}
            )
            response.raise_for_status()
            if not response.json()["accessToken"]:
                raise AssertionError("no token")

        await drive(mint, min(200, n), concurrency)
        cpu = process_cpu()
        started = time.perf_counter()
        await drive(mint, n, concurrency)
        elapsed = time.perf_counter() - started
        return {
            "cpu_per_request_ms": (process_cpu() - cpu) / n * 1e3,
            "requests_per_s": n / elapsed,
        }


# ------------------------------------------------------------------------ (b) authlib


@contextlib.asynccontextmanager
async def open_authlib(url: str, concurrency: int) -> AsyncIterator[Mint]:
    from authlib.integrations.httpx_client import AsyncOAuth2Client

    token_url = url + TOKEN_PATH
    async with AsyncOAuth2Client(
        CLIENT_ID, CLIENT_SECRET, token_endpoint_auth_method="client_secret_post"
    ) as client:

        async def mint(_: int) -> None:
            token = await client.fetch_token(token_url, grant_type="client_credentials")
            if not token["access_token"]:
                raise AssertionError("no token")

        yield mint


# ------------------------------------------------------------------------ (c) refresher


def refresher_settings(url: str, jobs: int, sink_dir: str) -> Any:
    from refresher.config import load_settings

    return load_settings(
        data={
            "server": {"listen": "127.0.0.1:0"},
            "refresh": {"concurrency": 32},
            "jobs": [
                {
                    "name": f"mint-{i:02d}",
                    "provider": {
                        "kind": "oauth2",
                        "token_url": url + TOKEN_PATH,
                        "client_id": CLIENT_ID,
                        "client_secret": CLIENT_SECRET,
                    },
                    "sinks": [{"kind": "file", "path": f"{sink_dir}/mint-{i:02d}.token"}],
                }
                for i in range(jobs)
            ],
        }
    )


@contextlib.asynccontextmanager
async def open_refresher(url: str, concurrency: int) -> AsyncIterator[Mint]:
    from refresher.daemon import Daemon

    sink_dir = tempfile.mkdtemp(prefix="refresher-bench-", dir=sink_root())
    daemon = Daemon(
        refresher_settings(url, concurrency, sink_dir), serve_http=False, rng=random.Random(1)
    )
    try:
        await daemon.load_jobs()
        scheduler = daemon.scheduler
        runtimes = list(scheduler.jobs.values())

        async def mint(i: int) -> None:
            runtime = runtimes[i]
            await scheduler.refresh(runtime)
            if runtime.failure_reason is not None or runtime.token is None:
                raise RuntimeError(f"refresher: refresh failed: {runtime.failure_message}")

        yield mint
    finally:
        await daemon.clients.aclose()
        shutil.rmtree(sink_dir, ignore_errors=True)


IMPLEMENTATIONS: dict[str, Minter] = {
    "raw": open_raw,
    "authlib": open_authlib,
    "refresher": open_refresher,
}


async def run(
    n: int, concurrencies: list[int], rounds: int, server_kind: str
) -> dict[str, Any]:
    """Per concurrency: set the three up side by side, warm each up, then `rounds`
    rounds of one `n`-mint block each, in rotating order. Ratios are the median of
    the per-round ratios: neighbouring blocks share the machine's current speed, so
    the slow drift of a noisy VM cancels out of each pair."""
    blocks: dict[str, dict[str, list[dict[str, float]]]] = {
        impl: {str(c): [] for c in concurrencies} for impl in IMPLEMENTATIONS
    }
    warmup = max(20, min(200, n // 2))
    order = list(IMPLEMENTATIONS)
    with quiet_logging(), ServerProcess(server_kind) as server:
        for c in concurrencies:
            async with contextlib.AsyncExitStack() as stack:
                mints = {
                    impl: await stack.enter_async_context(opener(server.url, c))
                    for impl, opener in IMPLEMENTATIONS.items()
                }
                for mint in mints.values():
                    await drive(mint, warmup, c)
                for round_no in range(rounds):
                    shift = round_no % len(order)
                    for impl in order[shift:] + order[:shift]:
                        blocks[impl][str(c)].append(await measure(mints[impl], n, c, server))
        # (the OAuth2Emulator does not speak Debitura's wire format)
        raw_reference = await raw_debitura_cpu(server.url, n) if server_kind == "fast" else None
        stats = server.stats() if server_kind == "fast" else {}
    best = {
        impl: {c: max(runs, key=lambda r: r["mints_per_s"]) for c, runs in per.items()}
        for impl, per in blocks.items()
    }

    def paired(impl: str, baseline: str, c: str) -> float:
        return statistics.median(
            mine["mints_per_s"] / theirs["mints_per_s"]
            for mine, theirs in zip(blocks[impl][c], blocks[baseline][c], strict=True)
        )

    ratios = {
        c: {
            "refresher_over_raw": paired("refresher", "raw", c),
            "refresher_over_authlib": paired("refresher", "authlib", c),
            "authlib_over_raw": paired("authlib", "raw", c),
            "best_refresher_over_best_raw": best["refresher"][c]["mints_per_s"]
            / best["raw"][c]["mints_per_s"],
        }
        for c in map(str, concurrencies)
    }
    return {
        "n": n,
        "rounds": rounds,
        "server": server_kind,
        "best": best,
        "ratios": ratios,
        "raw_debitura_reference": raw_reference,
        "server_status_counts": stats.get("counts"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--server", default="fast", choices=["fast", "emulator"])
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    emit(anyio.run(run, args.n, concurrencies, args.rounds, args.server))


if __name__ == "__main__":
    main()
