"""What every emulator shares: the server thread, fault injection, the request log,
key material and JWT signing, a sliding-window rate limiter, and a small control API
(``/_emulator/...``) for out-of-process use (demo, benchmark).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refresher.clock import Clock, SystemClock


@dataclass
class Fault:
    """One injected misbehaviour, applied to the next `count` token requests."""

    status: int = 500
    count: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    content_type: str = "application/problem+json"
    delay: float = 0.0
    #: Answer normally after `delay` (a slow but successful response).
    passthrough: bool = False

    @classmethod
    def server_error(cls, count: int = 1) -> Fault:
        return cls(status=503, count=count)

    @classmethod
    def rate_limited(cls, retry_after: str | None = "7", count: int = 1) -> Fault:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return cls(status=429, count=count, headers=headers)

    @classmethod
    def unauthorized(cls, count: int = 1) -> Fault:
        return cls(status=401, count=count)

    @classmethod
    def forbidden(cls, count: int = 1) -> Fault:
        return cls(status=403, count=count)

    @classmethod
    def slow(cls, seconds: float, count: int = 1) -> Fault:
        return cls(count=count, delay=seconds, passthrough=True)

    @classmethod
    def malformed(cls, count: int = 1) -> Fault:
        return cls(
            status=200,
            count=count,
            body=b'{"access_token": "abc", ',
            content_type="application/json",
        )

    @classmethod
    def html(cls, count: int = 1) -> Fault:
        return cls(
            status=200,
            count=count,
            body=b"<html><body>Maintenance</body></html>",
            content_type="text/html",
        )

    @classmethod
    def huge(cls, size: int = 8 << 20, count: int = 1) -> Fault:
        return cls(status=200, count=count, body=b"x" * size, content_type="application/json")

    @classmethod
    def body_json(cls, body: Mapping[str, Any], count: int = 1) -> Fault:
        return cls(
            status=200, count=count, body=json.dumps(body).encode(), content_type="application/json"
        )


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the emulator saw it."""

    at: float
    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    status: int
    client: str | None = None


class WindowLimiter:
    """Server-side sliding window: at most `limit` requests per `period` per key."""

    def __init__(self, limit: int, period: float = 60.0) -> None:
        self.limit = limit
        self.period = period
        self._hits: dict[str, deque[float]] = {}
        self.max_in_window = 0

    def check(self, key: str, now: float) -> float | None:
        """None if allowed (and counted); else seconds until allowed."""
        hits = self._hits.setdefault(key, deque())
        while hits and hits[0] <= now - self.period:
            hits.popleft()
        if len(hits) >= self.limit:
            return hits[0] + self.period - now
        hits.append(now)
        self.max_in_window = max(self.max_in_window, len(hits))
        return None


def problem(status: int, detail: str, *, headers: Mapping[str, str] | None = None) -> Response:
    """An RFC 9457 problem response."""
    body = {
        "type": "about:blank",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    return JSONResponse(
        body, status_code=status, headers=dict(headers or {}), media_type="application/problem+json"
    )


class Emulator:
    """Base class: subclasses add routes via `routes()` and token logic.

    Use as a context manager (``with Emulator() as emu: emu.url``) or call
    `start()`/`stop()`. `clock` drives ``iat``/``exp`` and rate limiting, so tests
    with a `ManualClock` see consistent time on both sides.
    """

    name = "emulator"

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        token_lifetime: float = 3600.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.clock = clock or SystemClock()
        self.token_lifetime = token_lifetime
        self.host = host
        self.port = port
        self.faults: deque[Fault] = deque()
        self.requests: list[RecordedRequest] = []
        self.issued: list[str] = []
        #: Seconds added to the emulator's notion of "now" (clock-skew scenarios).
        self.skew = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self.rsa_key = _rsa_key()
        self.hmac_key = secrets.token_bytes(32)

    # ---------------------------------------------------------------- lifecycle

    def routes(self) -> list[Route]:  # pragma: no cover - abstract
        raise NotImplementedError

    def app(self) -> Starlette:
        control = [
            Route("/_emulator/faults", self._control_faults, methods=["POST", "DELETE"]),
            Route("/_emulator/requests", self._control_requests, methods=["GET"]),
            Route("/_emulator/public-key", self._control_public_key, methods=["GET"]),
        ]
        return Starlette(routes=self.routes() + control)

    scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def server_options(self) -> dict[str, Any]:
        """Extra uvicorn settings (a subclass serving HTTPS adds its certificate)."""
        return {}

    def cleanup(self) -> None:
        """Called once the server stopped (a subclass removes what it wrote)."""

    def start(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: no 40 ms Nagle stall on kept-alive responses.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(),
            log_level="error",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
            **self.server_options(),
        )
        server = uvicorn.Server(config)
        self._server = server

        def serve() -> None:
            asyncio.run(server.serve(sockets=[sock]))
            sock.close()

        self._thread = threading.Thread(target=serve, name=f"{self.name}-emulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{self.name} emulator did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread = None
        self._server = None
        self.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- helpers for subclasses

    def now(self) -> float:
        return self.clock.now() + self.skew

    def inject(self, fault: Fault) -> None:
        """Queue a fault for the next token requests."""
        with self._lock:
            self.faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _next_fault(self) -> Fault | None:
        with self._lock:
            if not self.faults:
                return None
            fault = self.faults[0]
            fault.count -= 1
            if fault.count <= 0:
                self.faults.popleft()
            return fault

    async def apply_fault(self) -> Response | None:
        """The injected response for this request, or None to answer normally."""
        fault = self._next_fault()
        if fault is None:
            return None
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.passthrough:
            return None
        if fault.body is not None:
            return Response(
                fault.body,
                status_code=fault.status,
                headers=fault.headers,
                media_type=fault.content_type,
            )
        return problem(fault.status, f"injected fault: HTTP {fault.status}", headers=fault.headers)

    def record(self, request: Request, body: bytes, status: int, client: str | None) -> None:
        entry = RecordedRequest(
            at=self.clock.now(),
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            status=status,
            client=client,
        )
        with self._lock:
            self.requests.append(entry)

    def count(
        self, path: str | None = None, *, client: str | None = None, status: int | None = None
    ) -> int:
        """How many requests matched (all filters optional)."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (path is None or r.path == path)
                and (client is None or r.client == client)
                and (status is None or r.status == status)
            )

    def sign_rs256(self, claims: Mapping[str, Any]) -> str:
        token = jwt.encode(
            dict(claims), self.rsa_key, algorithm="RS256", headers={"kid": self.key_id}
        )
        with self._lock:
            self.issued.append(token)
        return token

    def sign_hs256(self, claims: Mapping[str, Any]) -> str:
        token = jwt.encode(dict(claims), self.hmac_key, algorithm="HS256")
        with self._lock:
            self.issued.append(token)
        return token

    @property
    def key_id(self) -> str:
        return f"{self.name}-1"

    def public_key_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @staticmethod
    def new_jti() -> str:
        return uuid.uuid4().hex

    # ---------------------------------------------------------------- control API

    async def _control_faults(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.clear_faults()
            return JSONResponse({"faults": 0})
        data = await request.json()
        body = data.pop("body", None)
        fault = Fault(**data)
        if body is not None:
            fault.body = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.inject(fault)
        return JSONResponse({"faults": len(self.faults)})

    async def _control_requests(self, request: Request) -> Response:
        with self._lock:
            counts = Counter((r.path, r.status) for r in self.requests)
        return JSONResponse(
            {
                "total": sum(counts.values()),
                "by_path_status": [
                    {"path": p, "status": s, "count": c} for (p, s), c in sorted(counts.items())
                ],
            }
        )

    async def _control_public_key(self, request: Request) -> Response:
        return Response(self.public_key_pem(), media_type="application/x-pem-file")


_KEY_CACHE: list[rsa.RSAPrivateKey] = []


def _rsa_key() -> rsa.RSAPrivateKey:
    # Generating RSA keys is slow: emulators in one process share one key pair
    # unless a test asks for a fresh one (see GooclaimEmulator.rotate_key).
    if not _KEY_CACHE:
        _KEY_CACHE.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _KEY_CACHE[0]


async def read_body(request: Request) -> tuple[bytes, Any]:
    """The raw body and its parsed form (JSON or urlencoded form), or None."""
    body = await request.body()
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    parsed: Any = None
    if content_type == "application/json":
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
    elif content_type == "application/x-www-form-urlencoded":
        from urllib.parse import parse_qsl

        parsed = dict(parse_qsl(body.decode(errors="replace"), keep_blank_values=True))
    return body, parsed
