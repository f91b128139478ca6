"""The HTTP face of the daemon (Starlette on uvicorn):

``/metrics`` Prometheus text · ``/healthz`` event loop alive · ``/readyz`` 200 only when
every job holds a valid token (a follower in leader election is ready too) ·
``/v1/tokens`` status per job, never a token · ``POST /v1/tokens/{job}/refresh``
forces a refresh (single-flight, rate limited; bearer-authenticated when the
listener is not loopback). Under leader election a follower refuses it with 503,
naming the leader: only the leader mints and writes.

The listener is bounded, so no client can take the descriptors the daemon needs for
its secrets and sinks: `Listener` accepts at most ``server.max_connections`` (cut down
to fit RLIMIT_NOFILE, see `connection_cap`) and drops connections that do not send a
complete request head within ``server.header_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import math
import re
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
import uvicorn
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from refresher.config import Settings
from refresher.errors import ListenError, NotActiveError, TooSoonError
from refresher.leader import LeaderElector
from refresher.metrics import Metrics
from refresher.runtime import Rejection
from refresher.scheduler import Scheduler
from refresher.token import rfc3339

log = structlog.get_logger("refresher")

#: Descriptors kept from the listener for the rest of the daemon: interpreter and
#: stdio, event loop, inotify, log files, keep-alive pools to providers and Kubernetes.
BASE_RESERVE = 128
#: ... plus, per refresh running at once: its provider connection, the secret file it
#: reads, the sink's temporary file and the directory fsynced after the rename.
RESERVE_PER_REFRESH = 4
#: A failed accept() (EMFILE, ENFILE, ENOBUFS ...) is retried after this long ...
ACCEPT_RETRY_DELAY = 0.1
#: ... and logged at most once per this many seconds.
ACCEPT_ERROR_LOG_INTERVAL = 10.0


def is_loopback(host: str) -> bool:
    """True for a listen host only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(
    scheduler: Scheduler,
    metrics: Metrics,
    *,
    access: Access | None = None,
    is_leader: Callable[[], bool] | None = None,
    leader: Callable[[], str | None] | None = None,
    retry_after: float = 2.0,
) -> Starlette:
    """The ASGI app; `access` says who may force refreshes and report rejections.
    Under leader election, `is_leader` says whether this replica leads, `leader` who
    does (the Lease's holder), and `retry_after` how long a refused caller should wait."""
    api = TokenApi(scheduler, metrics, access or Access(), is_leader, leader, retry_after)
    return Starlette(
        routes=[
            Route("/metrics", api.guarded(api.metrics_endpoint)),
            Route("/healthz", api.guarded(api.healthz)),
            Route("/readyz", api.guarded(api.readyz)),
            Route("/v1/tokens", api.guarded(api.tokens)),
            Route("/v1/tokens/{job}/refresh", api.guarded(api.refresh), methods=["POST"]),
        ]
    )


@dataclass(frozen=True)
class TokenApi:
    """The endpoints of `create_app`."""

    scheduler: Scheduler
    metrics: Metrics
    access: Access
    is_leader: Callable[[], bool] | None
    leader: Callable[[], str | None] | None
    retry_after: float

    def guarded(self, endpoint: Endpoint) -> Endpoint:
        """A bug in a handler is a 500 for that request, logged and counted like any
        internal error (through the redacting log, not the server's own traceback)."""

        async def handle(request: Request) -> Response:
            try:
                return await endpoint(request)
            except Exception as exc:
                self.scheduler.internal_error("server", exc)
                return JSONResponse({"error": "internal error"}, status_code=500)

        return handle

    def leadership_refusal(self) -> Response | None:
        """503 naming the leader when this replica must not mint or write (a
        follower); None when it may. Every consumer endpoint that writes asks this."""
        if self.is_leader is None or self.is_leader():
            return None
        return self.not_refreshing()

    def not_refreshing(self, error: str = "not the leader") -> Response:
        seconds = max(1, math.ceil(self.retry_after))
        holder = self.leader() if self.leader is not None else None
        body: dict[str, Any] = {"error": error, "leader": holder or None}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(seconds)})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if self.is_leader is not None and not self.is_leader():
            return JSONResponse({"status": "ready", "role": "follower"})
        scheduler = self.scheduler
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

    async def tokens(self, request: Request) -> Response:
        return JSONResponse({"jobs": self.scheduler.statuses()})

    async def refresh(self, request: Request) -> Response:
        """A forced refresh, or (``?rejected=FP``) a consumer's rejection report."""
        rejected = request.query_params.get("rejected")
        if not self.access.allows(request, rejection=rejected is not None):
            return JSONResponse(
                {"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        if rejected is not None and not FINGERPRINT.fullmatch(rejected):
            return JSONResponse(
                {"error": "rejected must be a token fingerprint: 12 lowercase hex digits"},
                status_code=400,
            )
        refusal = self.leadership_refusal()
        if refusal is not None:
            return refusal
        job, tenant = request.path_params["job"], request.query_params.get("tenant")
        feedback, now = self.scheduler.feedback, self.scheduler.clock.now
        try:
            if rejected is not None:
                return _rejection_answer(
                    await feedback.report_rejected(job, tenant, rejected), now()
                )
            runtime = await feedback.force(job, tenant)
        except NotActiveError:  # leadership lost or not yet taken over, or stopping
            return self.not_refreshing("not refreshing now")
        except KeyError:
            return JSONResponse(
                {"error": f"no job {job!r}" + (f" tenant {tenant!r}" if tenant else "")},
                status_code=404,
            )
        except TooSoonError as exc:
            seconds = max(1, int(exc.retry_after + 0.999))
            return JSONResponse(
                {"error": "too soon", "budget": exc.scope, "retry_after": seconds},
                status_code=429,
                headers={"Retry-After": str(seconds)},
            )
        return JSONResponse(runtime.status(now()), status_code=200 if runtime.valid(now()) else 502)


#: A token fingerprint as `/v1/tokens` shows it.
FINGERPRINT = re.compile(r"[0-9a-f]{12}")


def _rejection_answer(outcome: Rejection, now: float) -> Response:
    runtime = outcome.runtime
    if outcome.invalid_link:
        return JSONResponse(
            {"state": "invalid_link", "job": runtime.job, "tenant": runtime.tenant},
            status_code=409,
        )
    token = runtime.token
    body = {
        "fingerprint": token.fingerprint() if token else None,
        "expires_at": rfc3339(token.expires_at) if token else None,
        "minted": outcome.minted,
    }
    if runtime.valid(now):
        return JSONResponse(body)
    return JSONResponse({**body, "error": runtime.failure_reason}, status_code=502)


def token_reader(path: Path | None) -> Callable[[], str | None] | None:
    """Reads a bearer secret at each request, so rotating the file works."""
    if path is None:
        return None

    def read() -> str | None:
        try:
            return path.read_text().strip() or None
        except OSError:
            return None

    return read


@dataclass(frozen=True)
class Access:
    """Who may force refreshes and report rejected tokens.

    With no secret configured, a loopback listener lets everyone on this machine do
    both, and any other listener nobody. Once a secret is configured: a forced
    refresh needs the admin secret; a rejection report the admin or the consumer
    secret (which can do nothing else).
    """

    admin: Callable[[], str | None] | None = None
    consumer: Callable[[], str | None] | None = None
    loopback: bool = True

    def allows(self, request: Request, *, rejection: bool) -> bool:
        if self.admin is None and self.consumer is None:
            return self.loopback
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        readers = [self.admin, self.consumer] if rejection else [self.admin]
        return any(_same(given, reader) for reader in readers if reader is not None)


def _same(given: str, reader: Callable[[], str | None]) -> bool:
    expected = reader()
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


# ---------------------------------------------------------------- descriptor budget


def fd_reserve(concurrency: int) -> int:
    """Descriptors kept for the daemon's own work when `concurrency` refreshes run at once."""
    return BASE_RESERVE + RESERVE_PER_REFRESH * concurrency


def connection_cap(wanted: int, nofile: int, reserve: int) -> int:
    """Connections the listener may hold under an open-files limit of `nofile`: `wanted`,
    but never into the `reserve` and never more than half the limit (at least one)."""
    return max(1, min(wanted, nofile - reserve, nofile // 2))


def nofile_needed(wanted: int, reserve: int) -> int:
    """The open-files limit under which `connection_cap` grants all `wanted` connections."""
    return max(wanted + reserve, 2 * wanted)


def raise_nofile_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to `needed` if it is lower, never past the hard
    limit (child processes inherit it, so no further); return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed if soft == resource.RLIM_INFINITY else soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


# ---------------------------------------------------------------- listening


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so port 0 works and errors come early.

    Raises `ListenError` naming the address ("cannot listen on 127.0.0.1:9464:
    address already in use").
    """
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: no 40 ms Nagle stall on kept-alive responses.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ListenError(address, reason[:1].lower() + reason[1:]) from None
    return sock


class Server(uvicorn.Server):
    """uvicorn without its own signal handling (the daemon owns SIGTERM/SIGHUP) and
    without listening sockets: `Listener` hands it accepted connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = anyio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(app: Starlette) -> Server:
    # "error": a hostile client must not be able to write a warning per request.
    config = uvicorn.Config(
        app, http="h11", ws="none", log_level="error", access_log=False, lifespan="off"
    )
    return Server(config)


class Listener:
    """The daemon's HTTP listener: an accept loop of its own feeding uvicorn's HTTP/1.1
    protocol, bounded in connections and in time.

    While `max_connections` are open the loop does not call accept(): further clients
    wait in the kernel's backlog and cost no descriptor. (uvicorn's `limit_concurrency`
    accepts first and then answers 503, so it bounds work, not descriptors.) Every
    connection must send a complete request head within `header_timeout` of opening
    and of each response, and must keep reading what it asked for; otherwise it is
    dropped and its slot freed. accept() failures are logged, throttled, and retried.
    """

    def __init__(
        self, sock: socket.socket, app: Starlette, *, max_connections: int, header_timeout: float
    ) -> None:
        self.sock = sock
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        #: Connections held now, accepted since start, dropped by the timeout.
        self.open = 0
        self.accepted = 0
        self.timed_out = 0
        self.server = make_server(app)
        self._accepting = anyio.CancelScope()
        self._freed = anyio.Event()
        self._stopped = anyio.Event()
        self._error_logged_at = -ACCEPT_ERROR_LOG_INTERVAL
        self._errors_unlogged = 0

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until `close()`; started once connections are being accepted."""
        try:
            async with anyio.create_task_group() as tg:
                # No sockets for uvicorn: it runs the connections this loop accepts.
                tg.start_soon(self.server.serve, [])
                await self.server.ready.wait()
                tg.start_soon(self._accept_loop)
                host, port = self.sock.getsockname()[:2]
                log.info(
                    "listening",
                    address=f"{host}:{port}",
                    max_connections=self.max_connections,
                    header_timeout=self.header_timeout,
                )
                task_status.started()
        finally:
            self.sock.close()
            self._stopped.set()

    def close(self) -> None:
        """Stop accepting; close idle connections and let requests in flight finish."""
        self._accepting.cancel()
        self.server.should_exit = True

    async def aclose(self) -> None:
        """`close()`, and wait until the last request in flight has been answered."""
        self.close()
        await self._stopped.wait()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        with self._accepting:
            while True:
                while self.open >= self.max_connections:
                    self._freed = anyio.Event()
                    await self._freed.wait()
                await anyio.wait_readable(self.sock)
                await self._accept_pending(loop)

    async def _accept_pending(self, loop: asyncio.AbstractEventLoop) -> None:
        """Accept the connections the kernel holds, up to the cap."""
        while self.open < self.max_connections:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the backlog
            except OSError as exc:
                self._accept_failed(exc)
                await anyio.sleep(ACCEPT_RETRY_DELAY)
                return
            self.open += 1
            self.accepted += 1
            release = _once(self._release)
            protocol = functools.partial(self._protocol, release)
            try:
                conn.setblocking(False)
                await loop.connect_accepted_socket(protocol, conn)
            except Exception as exc:  # one connection must never stop the listener
                conn.close()
                release()
                if not isinstance(exc, OSError):  # OSError: reset before we got to it
                    self._accept_failed(exc)

    def _protocol(self, release: Callable[[], None]) -> _Connection:
        return _Connection(
            config=self.server.config,
            server_state=self.server.server_state,
            app_state=self.server.lifespan.state,
            listener=self,
            release=release,
        )

    def _release(self) -> None:
        self.open -= 1
        self._freed.set()

    def _accept_failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._error_logged_at < ACCEPT_ERROR_LOG_INTERVAL:
            self._errors_unlogged += 1
            return
        log.error(
            "cannot accept connections",
            error=getattr(exc, "strerror", None) or str(exc),
            open_connections=self.open,
            failures_not_logged=self._errors_unlogged,
            retry_in=ACCEPT_RETRY_DELAY,
        )
        self._error_logged_at = now
        self._errors_unlogged = 0


def _once(func: Callable[[], None]) -> Callable[[], None]:
    """`func`, callable any number of times, run at most once."""
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            func()

    return call


class _Connection(H11Protocol):
    """One accepted connection: uvicorn's HTTP/1.1 protocol with a deadline for each
    request head, which gives its listener slot back when it closes."""

    def __init__(
        self,
        *,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        listener: Listener,
        release: Callable[[], None],
    ) -> None:
        super().__init__(config=config, server_state=server_state, app_state=app_state)
        self._listener = listener
        self._release = release
        self._deadline: asyncio.TimerHandle | None = None
        self._unsent = 0
        self._lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._deadline is not None:
            self._deadline.cancel()
        self._release()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if not self._lost:
            self._deadline = self.loop.call_later(self._listener.header_timeout, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        unsent = self.transport.get_write_buffer_size()
        reading, self._unsent = unsent != self._unsent, unsent
        if unsent and reading:
            self._arm()  # still delivering a response, and the client is taking it
        elif unsent or self.cycle is None or self.cycle.response_complete:
            # No complete request head in time, or a client that stopped reading:
            # abort, not close, so the descriptor goes now, not after a flush.
            self._listener.timed_out += 1
            self.transport.abort()
        else:
            self._arm()  # the app is still working on the request (a forced refresh)


def listen(
    settings: Settings,
    scheduler: Scheduler,
    metrics: Metrics,
    *,
    is_leader: Callable[[], bool] | None,
    elector: LeaderElector | None,
) -> Listener:
    """Bind the configured address (`ListenError` if taken) and build the app behind
    a listener sized to the open-files limit, keeping a reserve of descriptors for
    secrets, sinks and HTTP clients."""
    config = settings.server
    wanted = config.max_connections
    reserve = fd_reserve(settings.refresh.concurrency)
    nofile = raise_nofile_limit(nofile_needed(wanted, reserve))
    cap = connection_cap(wanted, nofile, reserve)
    if cap < wanted:
        log.warning(
            "server.max_connections lowered to fit the open files limit",
            wanted=wanted,
            max_connections=cap,
            open_files_limit=nofile,
            reserved=reserve,
        )
    sock = bind(config.host, config.port)
    access = Access(
        admin=token_reader(config.admin_token_file),
        consumer=token_reader(config.consumer_token_file),
        loopback=is_loopback(config.host),
    )
    app = create_app(
        scheduler,
        metrics,
        access=access,
        is_leader=is_leader,
        leader=elector.leader if elector is not None else None,
        retry_after=elector.retry_period if elector is not None else 2.0,
    )
    return Listener(sock, app, max_connections=cap, header_timeout=config.header_timeout)
