"""Token servers for the benchmark, run in their own process.

``python -m tests.bench.server fast`` serves a minimal HTTP/1.1 keep-alive server on
plain asyncio that speaks the same wire formats as the project's emulators:

* ``POST /oauth/token`` with an RFC 6749 client-credentials form (or JSON) body →
  ``{access_token, token_type, expires_in, scope}`` (like `OAuth2Emulator`);
* ``POST /oauth/token`` with ``XApiKey`` + JSON ``{"externalTenantId"}`` →
  ``{accessToken, tokenType, expiresIn, externalTenantId, creditorId}`` (like
  `DebituraEmulator`);

every token a fresh HS256 JWT with real ``iat``/``exp`` and a unique ``jti``. It costs a
few tens of microseconds per request, so the client side is what a run measures
(the benchmark reports this process's CPU to show it).

``python -m tests.bench.server emulator`` runs the project's `OAuth2Emulator`
(uvicorn + Starlette) instead, for comparison.

Control endpoints: ``GET /_stats`` (request counts by status, this process's CPU
seconds) and ``POST /_config`` (``{"token_lifetime": seconds}``).
The first stdout line is ``PORT <n>``; the process exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl

CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-client-secret-value"
API_KEY = "bench-debitura-api-key"
HMAC_KEY = os.urandom(32)
_CREDITOR_NS = uuid.UUID("6f1c1b52-3f7e-4c55-9a43-0d3c6c1f7a10")
_JWT_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found"}


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class State:
    def __init__(self, lifetime: float) -> None:
        self.lifetime = int(lifetime)
        self.counts: dict[int, int] = {}
        self.connections = 0
        self.seq = 0
        self.creditors: dict[str, str] = {}

    def jwt(self, claims: dict[str, Any]) -> str:
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = _JWT_HEADER + b"." + payload
        signature = _b64(hmac.new(HMAC_KEY, signing_input, hashlib.sha256).digest())
        return (signing_input + b"." + signature).decode()

    def creditor(self, tenant: str) -> str:
        found = self.creditors.get(tenant)
        if found is None:
            found = self.creditors[tenant] = str(uuid.uuid5(_CREDITOR_NS, tenant))
        return found

    def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        if path == "/_stats":
            cpu = os.times()
            return 200, json.dumps(
                {
                    "counts": {str(k): v for k, v in self.counts.items()},
                    "total": sum(self.counts.values()),
                    "cpu": cpu.user + cpu.system,
                    "connections": self.connections,
                }
            ).encode()
        if path == "/_config" and method == "POST":
            data = json.loads(body or b"{}")
            if "token_lifetime" in data:
                self.lifetime = int(data["token_lifetime"])
            return 200, b"{}"
        if path != "/oauth/token" or method != "POST":
            return 404, b'{"title": "Not Found"}'
        status, out = self._token(headers, body)
        self.counts[status] = self.counts.get(status, 0) + 1
        return status, out

    def _token(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        content_type = headers.get("content-type", "").split(";")[0].strip()
        fields: Any
        if content_type == "application/json":
            try:
                fields = json.loads(body)
            except ValueError:
                return 400, b'{"title": "Bad Request", "detail": "invalid JSON"}'
        else:
            fields = dict(parse_qsl(body.decode(errors="replace")))
        if not isinstance(fields, dict):
            return 400, b'{"title": "Bad Request"}'
        now = int(time.time())
        self.seq += 1
        if "xapikey" in headers or "externalTenantId" in fields:
            tenant = fields.get("externalTenantId")
            if headers.get("xapikey") != API_KEY:
                return 401, b'{"title": "Unauthorized", "detail": "missing or invalid XApiKey"}'
            if not isinstance(tenant, str):
                return 400, b'{"title": "Bad Request", "detail": "externalTenantId"}'
            creditor = self.creditor(tenant)
            token = self.jwt(
                {
                    "sub": tenant,
                    "externalTenantId": tenant,
                    "creditorId": creditor,
                    "iat": now,
                    "exp": now + self.lifetime,
                    "jti": self.seq,
                }
            )
            return 200, json.dumps(
                {
                    "accessToken": token,
                    "tokenType": "Bearer",
                    "expiresIn": self.lifetime,
                    "externalTenantId": tenant,
                    "creditorId": creditor,
                }
            ).encode()
        if fields.get("grant_type") != "client_credentials":
            return 400, b'{"error": "unsupported_grant_type"}'
        if fields.get("client_id") != CLIENT_ID or fields.get("client_secret") != CLIENT_SECRET:
            return 401, b'{"error": "invalid_client"}'
        scope = fields.get("scope") or "default"
        token = self.jwt(
            {
                "iss": "https://bench.refresher.invalid",
                "aud": "refresher-bench",
                "sub": CLIENT_ID,
                "scope": scope,
                "iat": now,
                "exp": now + self.lifetime,
                "jti": self.seq,
            }
        )
        return 200, json.dumps(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self.lifetime,
                "scope": scope,
            }
        ).encode()


class HTTPProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies (all our clients send)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            status, out = self.state.handle(method, path.split("?", 1)[0], headers, body)
            close = headers.get("connection", "").lower() == "close"
            response = (
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
                % (
                    status,
                    _REASONS.get(status, b"Error"),
                    len(out),
                    b"connection: close\r\n" if close else b"",
                )
            ) + out
            assert self.transport is not None
            self.transport.write(response)
            if close:
                self.transport.close()
                return


async def serve_fast(lifetime: float) -> None:
    state = State(lifetime)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HTTPProtocol(state), "127.0.0.1", 0, backlog=1024, reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    threading.Thread(target=_wait_stdin, args=(loop, stop), daemon=True).start()
    async with server:
        await stop.wait()


def _wait_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    try:
        sys.stdin.read()
    finally:
        loop.call_soon_threadsafe(stop.set)


def serve_emulator(lifetime: float) -> None:
    """The project's OAuth2Emulator (uvicorn + Starlette), same credentials."""
    from tests.emulators.oauth2 import OAuth2Emulator

    emulator = OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=lifetime)
    emulator.start()
    from tests.bench.common import nodelay

    nodelay(emulator)
    print(f"PORT {emulator.port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    emulator.stop()


def main(argv: list[str]) -> None:
    kind = argv[0] if argv else "fast"
    lifetime = float(argv[1]) if len(argv) > 1 else 3600.0
    if kind == "fast":
        asyncio.run(serve_fast(lifetime))
    elif kind == "emulator":
        serve_emulator(lifetime)
    else:
        raise SystemExit(f"unknown server kind {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
