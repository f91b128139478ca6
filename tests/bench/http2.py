"""HTTP/2 against HTTP/1.1 keep-alive, same TLS server, same run:
``python -m tests.bench.http2 [--rounds 5] [--n 300]``.

The server is hypercorn over TLS (ALPN ``h2``, ``http/1.1``) in its own process,
serving the Debitura token route with the fast bench server's token logic
(`tests.bench.server.State`). In this process, per round and in rotating order, a
block of `n` requests at c=16 each:

* raw ``httpx2.AsyncClient`` with ``http2=False`` and with ``http2=True``;
* refresher's ``DebituraProvider.fetch`` (built from config, its shared client pool)
  with ``http2: false`` and ``http2: true``;

and the idle-connection cost: after a burst at c=100 the refresher client's pool holds
its idle connections (HTTP/1.1: up to 20 kept alive; HTTP/2: one), and a block at c=1
then pays for probing them before every request. CPU per request is this process's
CPU over the block's requests; a ratio is the median over rounds of the ratio within
a round (neighbouring blocks see the same noise on a shared machine).

``python -m tests.bench.http2 serve`` is the server: first stdout line
``PORT <n> <ca file>``, exits when stdin closes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import httpx2
import psutil

from tests.bench.common import API_KEY, process_cpu, quiet_logging
from tests.bench.server import State

TOKEN_PATH = "/oauth/token"
CONCURRENCY = 16
BURST = 100

Fetch = Callable[[int], Awaitable[None]]


# ------------------------------------------------------------------------ server


def serve() -> None:
    from tests.emulators.h2server import HypercornServer

    state = State(3600.0)
    peers: list[HypercornServer] = []

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        state.connections = len(peers[0].connections())
        status, out = state.handle(scope["method"], scope["path"], headers, body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(out)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": out})

    with HypercornServer(app) as server:
        peers.append(server)
        print(f"PORT {server.port} {server.ca_file}", flush=True)
        sys.stdin.read()


class H2ServerProcess:
    """`serve` in a child process; stopped on exit."""

    def __enter__(self) -> H2ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.http2", "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 3 or line[0] != "PORT":
            self.__exit__()
            raise RuntimeError(f"hypercorn bench server did not start: {line!r}")
        self.url = f"https://127.0.0.1:{line[1]}"
        self.ca_file = line[2]
        self._ps = psutil.Process(self.proc.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def cpu(self) -> float:
        times = self._ps.cpu_times()
        return times.user + times.system

    def connections(self) -> int:
        context = ssl.create_default_context(cafile=self.ca_file)
        with httpx2.Client(base_url=self.url, verify=context) as client:
            return int(client.get("/_stats").json()["connections"])


# ------------------------------------------------------------------------ clients


async def drive(fetch: Fetch, n: int, concurrency: int) -> None:
    """`n` calls of `fetch` over `concurrency` workers."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await fetch(i)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)


@contextlib.asynccontextmanager
async def open_raw(server: H2ServerProcess, http2: bool) -> AsyncIterator[Fetch]:
    context = ssl.create_default_context(cafile=server.ca_file)
    headers = {"XApiKey": API_KEY}
    async with httpx2.AsyncClient(base_url=server.url, verify=context, http2=http2) as client:

        async def fetch(i: int) -> None:
            response = await client.post(
                TOKEN_PATH, headers=headers, json={"externalTenantId": f"t-{i:05d}"}
            )
            response.raise_for_status()
            if not response.json()["accessToken"]:
                raise AssertionError("no token")

        yield fetch


@contextlib.asynccontextmanager
async def open_refresher(server: H2ServerProcess, http2: bool) -> AsyncIterator[Fetch]:
    from refresher.clock import SystemClock
    from refresher.config import load_settings
    from refresher.providers.base import HTTPClients
    from refresher.providers.debitura import DebituraProvider

    provider_config = {
        "kind": "debitura",
        "base_url": server.url,
        "api_key": API_KEY,
        "tenants": ["t-00000"],
        "ca_file": server.ca_file,
        "http2": http2,
    }
    settings = load_settings(
        data={"jobs": [{"name": "deb", "provider": provider_config, "sinks": [_SINK]}]}
    )
    clients = HTTPClients()
    provider = DebituraProvider(settings.jobs[0].provider, clients=clients, clock=SystemClock())  # type: ignore[arg-type]
    provider.starting("deb")
    try:

        async def fetch(i: int) -> None:
            await provider.fetch(f"t-{i:05d}")

        fetch.client = provider.client  # type: ignore[attr-defined]
        yield fetch
    finally:
        await clients.aclose()


_SINK = {"kind": "file", "path": "/dev/null/{tenant}"}


def pool_size(fetch: Fetch) -> int:
    client: httpx2.AsyncClient = fetch.client  # type: ignore[attr-defined]
    return len(client._transport._pool.connections)  # type: ignore[attr-defined]


async def cpu_per_request(fetch: Fetch, n: int, concurrency: int) -> tuple[float, float]:
    """(client CPU µs per request, wall seconds) of `n` requests."""
    cpu, started = process_cpu(), time.perf_counter()
    await drive(fetch, n, concurrency)
    return (process_cpu() - cpu) / n * 1e6, time.perf_counter() - started


# ------------------------------------------------------------------------ run


VARIANTS = [
    ("raw httpx2 HTTP/1.1", open_raw, False),
    ("raw httpx2 HTTP/2", open_raw, True),
    ("refresher HTTP/1.1", open_refresher, False),
    ("refresher HTTP/2", open_refresher, True),
]


async def run(rounds: int, n: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    server_cpu: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    rates: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    idle: dict[str, list[float]] = {}
    pools: dict[str, int] = {}
    with H2ServerProcess() as server, quiet_logging():
        async with contextlib.AsyncExitStack() as stack:
            fetches = {
                name: await stack.enter_async_context(opener(server, http2))
                for name, opener, http2 in VARIANTS
            }
            for fetch in fetches.values():  # connections, TLS, imports
                await drive(fetch, 100, CONCURRENCY)
            for round_ in range(rounds):
                order = VARIANTS[round_ % len(VARIANTS) :] + VARIANTS[: round_ % len(VARIANTS)]
                for name, _, _ in order:
                    before = server.cpu()
                    us, seconds = await cpu_per_request(fetches[name], n, CONCURRENCY)
                    samples[name].append(us)
                    server_cpu[name].append((server.cpu() - before) / n * 1e6)
                    rates[name].append(n / seconds)
        # Idle connections: fresh clients, a burst at c=100, then c=1 on that pool.
        for round_ in range(rounds):
            for http2 in (False, True) if round_ % 2 == 0 else (True, False):
                label = "HTTP/2" if http2 else "HTTP/1.1"
                async with open_refresher(server, http2) as fetch:
                    await drive(fetch, 20, 1)
                    fresh, _ = await cpu_per_request(fetch, n // 4, 1)
                    await drive(fetch, 2 * BURST, BURST)
                    pools[label] = pool_size(fetch)
                    after, _ = await cpu_per_request(fetch, n // 4, 1)
                idle.setdefault(f"{label} c=1 fresh", []).append(fresh)
                idle.setdefault(f"{label} c=1 after burst", []).append(after)
        connections = server.connections()
    return {
        "cpu_us": samples,
        "server_cpu_us": server_cpu,
        "requests_per_s": rates,
        "idle_cpu_us": idle,
        "pool_after_burst": pools,
        "server_connections": connections,
    }


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def report(result: dict[str, Any]) -> None:
    cpu, srv, rps = result["cpu_us"], result["server_cpu_us"], result["requests_per_s"]
    h1 = "raw httpx2 HTTP/1.1"
    print(
        f"{'c=16, TLS':<22} {'client CPU/req':>15} {'/ raw HTTP/1.1':>15} {'server CPU/req':>15} {'req/s':>7}"
    )
    for name in cpu:
        print(
            f"{name:<22} {statistics.median(cpu[name]):>12.0f} µs {ratio(cpu[name], cpu[h1]):>15.2f}"
            f" {statistics.median(srv[name]):>12.0f} µs {statistics.median(rps[name]):>7.0f}"
        )
    print(
        f"HTTP/2 / HTTP/1.1: raw {ratio(cpu['raw httpx2 HTTP/2'], cpu[h1]):.2f}, refresher "
        f"{ratio(cpu['refresher HTTP/2'], cpu['refresher HTTP/1.1']):.2f} (client CPU per request)"
    )
    idle, pools = result["idle_cpu_us"], result["pool_after_burst"]
    print(f"\nidle connections (refresher client, burst at c={BURST}, then c=1)")
    for label in ("HTTP/1.1", "HTTP/2"):
        fresh, after = idle[f"{label} c=1 fresh"], idle[f"{label} c=1 after burst"]
        print(
            f"{label:<9} pool after burst {pools[label]:>3}   c=1 CPU/req fresh "
            f"{statistics.median(fresh):.0f} µs, after burst {statistics.median(after):.0f} µs "
            f"({ratio(after, fresh):.2f}x)"
        )
    print(f"server saw {result['server_connections']} connections in all")


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve()
        return
    parser = argparse.ArgumentParser(prog="python -m tests.bench.http2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=300, help="requests per block")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    result = anyio.run(run, args.rounds, args.n)
    report(result)
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
