"""The HTTP face of the daemon (Starlette on uvicorn):

``/metrics`` Prometheus text · ``/healthz`` event loop alive · ``/readyz`` 200 only when
every job holds a valid token (a follower in leader election is ready too) ·
``/v1/tokens`` status per job, never a token · ``POST /v1/tokens/{job}/refresh``
forces a refresh (single-flight, rate limited; bearer-authenticated when the
listener is not loopback).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import socket
from collections.abc import Callable, Generator
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refresher.metrics import Metrics
from refresher.scheduler import Scheduler, TooSoonError


def is_loopback(host: str) -> bool:
    """True for a listen host only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(
    scheduler: Scheduler,
    metrics: Metrics,
    *,
    admin_token: Callable[[], str | None] | None = None,
    is_leader: Callable[[], bool] | None = None,
) -> Starlette:
    """The ASGI app. `admin_token` returns the bearer secret refresh calls need
    (None = no auth, only for loopback listeners)."""

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if is_leader is not None and not is_leader():
            return JSONResponse({"status": "ready", "role": "follower"})
        # No jobs is ready: nothing is missing (`helm install --wait` with `jobs: []`).
        if scheduler.ready() or not scheduler.jobs:
            return JSONResponse({"status": "ready"})
        now = scheduler.clock.now()
        waiting = [
            {"job": r.job, "tenant": r.tenant, "state": r.display_state(now)}
            for r in scheduler.jobs.values()
            if not r.valid(now)
        ]
        return JSONResponse(
            {"status": "not ready", "jobs_not_valid": len(waiting), "jobs": waiting[:50]},
            status_code=503,
        )

    async def tokens(request: Request) -> Response:
        return JSONResponse({"jobs": scheduler.statuses()})

    async def refresh(request: Request) -> Response:
        if admin_token is not None:
            expected = admin_token()
            given = request.headers.get("authorization", "")
            scheme, _, credential = given.partition(" ")
            if (
                not expected
                or scheme.lower() != "bearer"
                or not hmac.compare_digest(credential.encode(), expected.encode())
            ):
                return JSONResponse(
                    {"error": "unauthorized"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        job = request.path_params["job"]
        tenant = request.query_params.get("tenant")
        try:
            runtime = await scheduler.force(job, tenant)
        except KeyError:
            return JSONResponse(
                {"error": f"no job {job!r}" + (f" tenant {tenant!r}" if tenant else "")},
                status_code=404,
            )
        except TooSoonError as exc:
            seconds = max(1, int(exc.retry_after + 0.999))
            return JSONResponse(
                {"error": "too soon", "retry_after": seconds},
                status_code=429,
                headers={"Retry-After": str(seconds)},
            )
        body = runtime.status(scheduler.clock.now())
        return JSONResponse(body, status_code=200 if runtime.valid(scheduler.clock.now()) else 502)

    return Starlette(
        routes=[
            Route("/metrics", metrics_endpoint),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/v1/tokens", tokens),
            Route("/v1/tokens/{job}/refresh", refresh, methods=["POST"]),
        ]
    )


def admin_token_reader(path: Path | None) -> Callable[[], str | None]:
    """Reads the admin bearer secret at each request, so rotating the file works."""

    def read() -> str | None:
        if path is None:
            return None
        try:
            return path.read_text().strip() or None
        except OSError:
            return None

    return read


class Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so port 0 works and errors come early."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: no 40 ms Nagle stall on kept-alive responses.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def make_server(app: Starlette) -> Server:
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    return Server(config)
