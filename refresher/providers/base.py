"""What every provider shares: the `TokenProvider` protocol, the HTTP client pool,
and the one place where HTTP outcomes become `ProviderError`s.

A provider module only says *what* to send and *which* fields of the answer mean
what; sending, bounded reading, ``Retry-After`` and problem-response parsing, and
error classification all live here.
"""

from __future__ import annotations

import json
import math
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable
from urllib.parse import quote_plus

import httpx2

from refresher.clock import Clock
from refresher.errors import (
    BadResponseError,
    ConfigError,
    ForbiddenError,
    Problem,
    ProviderError,
    ProviderTimeoutError,
    RateLimitedError,
    SecretUnusableError,
    ServerError,
    TransportError,
    UnauthorizedError,
)
from refresher.fields import HTTPProviderConfig, SecretSource
from refresher.ratelimit import SlidingWindowLimiter
from refresher.scopes import check_scopes
from refresher.token import Token
from refresher.transport import use_socket_caching_backend

#: Token endpoints answer with a few hundred bytes; anything past this is not a token.
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class RateLimit:
    """A provider-side request budget shared by every job with the same `key`."""

    key: str
    requests: int
    period: float = 60.0


@runtime_checkable
class TokenProvider(Protocol):
    """Mints tokens for one configured credential.

    `fetch` returns a fresh `Token` for the credential (and, for per-tenant
    providers, the tenant) or raises a `ProviderError`.

    Optional, looked up with ``getattr``: ``environment`` (``"sandbox"``,
    ``"production"`` or None: shown in ``/v1/tokens`` and ``refresher_job_info``) and
    ``watched_files()`` (files whose change should retry the job's failed refreshes at
    once without meaning the credential rotated, e.g. a signing key).
    """

    kind: str

    @property
    def credential(self) -> str:
        """Identifies the credential (client id, API key): jobs sharing it share its fate."""
        ...

    @property
    def rate_limit(self) -> RateLimit | None:
        """The provider's request budget this credential shares with others, if any."""
        ...

    @property
    def max_concurrency(self) -> int | None:
        """At most this many requests in flight for this credential, if limited."""
        ...

    def secrets(self) -> list[str]:
        """Current secret values, so logging can redact them."""
        ...

    def secret_files(self) -> list[Path]:
        """Files whose change means the credential rotated."""
        ...

    async def fetch(self, tenant: str | None) -> Token:
        """Mint a new token."""
        ...

    def starting(self, job: str) -> None:
        """Called once when the job using this provider starts (or is rebuilt)."""
        ...


class ProviderClass(Protocol):
    """How `refresher.providers.PROVIDERS` builds a provider from its config section."""

    def __call__(self, config: Any, *, clients: HTTPClients, clock: Clock) -> TokenProvider: ...


@dataclass(frozen=True)
class ClientCertificate:
    """A TLS client certificate (RFC 8705) as read now: `digest` tells contents apart,
    so a rotated certificate or key gets a client of its own; `owner` keeps one
    provider's client from being retired under another."""

    cert_file: Path
    key_file: Path
    digest: str
    owner: str


class HTTPClients:
    """One `httpx2.AsyncClient` per (base URL, TLS settings, HTTP version), reused
    across jobs, and the partner-side request budgets that jobs sharing a client id share."""

    def __init__(self) -> None:
        self._clients: dict[
            tuple[str, str | None, float, ClientCertificate | None, bool], httpx2.AsyncClient
        ] = {}
        self._limiters: dict[str, SlidingWindowLimiter] = {}
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def close_with(self, close: Callable[[], Awaitable[None]]) -> None:
        """Also call `close` when the pool closes (a provider's own API clients)."""
        self._closers.append(close)

    def limiter(self, key: str, limit: int, period: float, clock: Clock) -> SlidingWindowLimiter:
        """The budget every provider naming `key` shares (e.g. Gooclaim's introspection
        limit per ``client_id``); when jobs configure different limits, the lowest wins."""
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = self._limiters[key] = SlidingWindowLimiter(limit, period, clock)
        elif limit < limiter.limit:
            limiter.limit = limit
        return limiter

    def get(
        self,
        base_url: str,
        *,
        ca_file: Path | None = None,
        timeout: float = 10.0,
        client_cert: ClientCertificate | None = None,
        http2: bool = False,
    ) -> httpx2.AsyncClient:
        """The shared client; with `client_cert`, one presenting that certificate
        (`SecretUnusableError` when the certificate and key do not load); with `http2`,
        one offering HTTP/2 by ALPN, so an https host that accepts it multiplexes every
        request on one connection."""
        key = (base_url, str(ca_file) if ca_file else None, timeout, client_cert, http2)
        client = self._clients.get(key)
        if client is None:
            verify: ssl.SSLContext | bool = True
            if ca_file is not None or client_cert is not None:
                verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if client_cert is not None:
                assert isinstance(verify, ssl.SSLContext)
                _load_certificate(verify, client_cert)
            client = httpx2.AsyncClient(
                base_url=base_url,
                timeout=timeout,
                verify=verify,
                follow_redirects=False,
                http2=http2,
                limits=httpx2.Limits(max_connections=100, max_keepalive_connections=20),
                headers={"User-Agent": _user_agent()},
            )
            use_socket_caching_backend(client)
            self._clients[key] = client
        return client

    async def retire(self, client: httpx2.AsyncClient) -> None:
        """Close `client` and forget it (its certificate was rotated)."""
        for key, held in list(self._clients.items()):
            if held is client:
                del self._clients[key]
        await client.aclose()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
        closers, self._closers = self._closers, []
        for close in closers:
            await close()


def _load_certificate(context: ssl.SSLContext, certificate: ClientCertificate) -> None:
    try:
        context.load_cert_chain(str(certificate.cert_file), str(certificate.key_file))
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise SecretUnusableError(
            f"tls_client_cert_file {certificate.cert_file} / tls_client_key_file "
            f"{certificate.key_file}: cannot use them ({reason}; a certificate and key "
            "that do not match, or a rotation half done?)"
        ) from None


def _user_agent() -> str:
    from refresher import __version__

    return f"refresher/{__version__}"


@dataclass(frozen=True)
class Response:
    """A fully read, size-bounded HTTP answer."""

    status: int
    headers: httpx2.Headers
    body: bytes
    received_at: float = field(default=0.0)

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object, or `BadResponseError` naming what was wrong."""
        content_type = self.headers.get("content-type", "")
        try:
            data = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            kind = content_type.split(";")[0] or "no content type"
            raise BadResponseError(
                f"HTTP {self.status} body is not JSON ({kind}, {len(self.body)} bytes)",
                status=self.status,
            ) from None
        if not isinstance(data, dict):
            raise BadResponseError(
                f"HTTP {self.status} body is JSON but not an object", status=self.status
            )
        return data


async def request(
    client: httpx2.AsyncClient,
    method: str,
    url: str | httpx2.URL,
    *,
    clock: Clock,
    headers: Mapping[str, str] | None = None,
    data: Mapping[str, str | list[str]] | None = None,
    json_body: Any = None,
    auth: tuple[str, str] | None = None,
) -> Response:
    """Send one request; transport failures become `TransportError`/`ProviderTimeoutError`.

    The body is read up to `MAX_BODY_BYTES`: a provider that streams megabytes gets
    a `BadResponseError`, not our memory. HTTP error statuses are *not* raised here,
    see `raise_for_status`.
    """
    try:
        async with client.stream(
            method,
            url,
            headers=dict(headers or {}),
            data=dict(data) if data is not None else None,
            json=json_body,
            auth=auth,
        ) as response:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise BadResponseError(
                        f"HTTP {response.status_code} body exceeds {MAX_BODY_BYTES} bytes",
                        status=response.status_code,
                    )
                chunks.append(chunk)
            return Response(response.status_code, response.headers, b"".join(chunks), clock.now())
    except httpx2.TimeoutException as exc:
        what = f"{method} {_path(url)}: timed out ({type(exc).__name__})"
        raise ProviderTimeoutError(what) from None
    except httpx2.TransportError as exc:
        raise TransportError(f"{method} {_path(url)}: {_describe_transport(exc)}") from None


def _path(url: str | httpx2.URL) -> str:
    # Never echo a query string: a misconfigured partner might put secrets there.
    if isinstance(url, httpx2.URL):
        return url.path
    return url.split("?", 1)[0]


def _describe_transport(exc: httpx2.TransportError) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return f"TLS error: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def parse_problem(response: Response) -> Problem | None:
    """An RFC 9457 problem (``application/problem+json``) or a JSON error body, if any."""
    try:
        data = json.loads(response.body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    title = data.get("title") or data.get("error")
    detail = data.get("detail") or data.get("error_description") or data.get("message")
    status = data.get("status")
    kind = data.get("type")
    return Problem(
        status=status if isinstance(status, int) else None,
        title=str(title)[:200] if title else None,
        detail=str(detail)[:500] if detail else None,
        type=str(kind) if kind else None,
    )


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """``Retry-After`` as seconds from `now`: delta-seconds or an HTTP date."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    return max(0.0, moment.timestamp() - now)


def raise_for_status(response: Response, what: str) -> None:
    """Map a non-2xx answer to the error tree; 2xx passes."""
    status = response.status
    if 200 <= status < 300:
        return
    problem = parse_problem(response)
    message = f"{what}: HTTP {status}"
    error: ProviderError
    if status == 429:
        retry_after = parse_retry_after(
            response.headers.get("retry-after"), now=response.received_at
        )
        error = RateLimitedError(message, retry_after=retry_after, problem=problem)
    elif status == 401:
        error = UnauthorizedError(message, status=status, problem=problem)
    elif status == 403:
        error = ForbiddenError(message, status=status, problem=problem)
    elif status >= 500:
        error = ServerError(message, status=status, problem=problem)
    else:
        # Other 4xx (400 invalid_client, 404 wrong URL): a config problem, not transient.
        error = BadResponseError(message, status=status, problem=problem)
    raise error


def require_str(data: Mapping[str, Any], key: str, what: str) -> str:
    """A non-empty string field of a JSON answer, or `BadResponseError` naming it."""
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise BadResponseError(f"{what}: response has no usable {key!r}")
    return value


ConfigT = TypeVar("ConfigT", bound=HTTPProviderConfig)


class HTTPProvider(Generic[ConfigT]):
    """Shared plumbing for providers that mint over HTTP, generic over the provider's
    own config section (`config`).

    Subclasses implement `fetch` using `self.post(...)` and `self.token_from(...)`.
    """

    kind = "http"
    #: ``sandbox`` / ``production`` where the partner has both, else None.
    environment: str | None = None

    def __init__(
        self,
        config: ConfigT,
        *,
        base_url: str,
        clients: HTTPClients,
        clock: Clock,
        secrets: Mapping[str, SecretSource | None],
        rate_limit_key: str | None = None,
        default_requests_per_minute: int | None = None,
    ) -> None:
        self.config = config
        self.base_url = base_url
        self.clock = clock
        self.client = clients.get(
            base_url, ca_file=config.ca_file, timeout=config.timeout, http2=config.http2
        )
        self._secrets = {name: src for name, src in secrets.items() if src is not None}
        self._urls: dict[str, httpx2.URL] = {}
        self._credential = f"{self.kind}:{base_url}:{rate_limit_key or ''}"
        per_minute = config.requests_per_minute or default_requests_per_minute
        self._rate_limit = (
            RateLimit(key=self._credential, requests=per_minute) if per_minute else None
        )

    @property
    def credential(self) -> str:
        return self._credential

    def starting(self, job: str) -> None:
        """Called once when the job that uses this provider starts (or restarts)."""

    @property
    def rate_limit(self) -> RateLimit | None:
        return self._rate_limit

    @property
    def max_concurrency(self) -> int | None:
        return self.config.max_concurrency

    def secret(self, name: str) -> str:
        """Read the named secret now (files are re-read, so rotation takes effect);
        `SecretUnusableError` when it cannot be read or is not a usable secret."""
        try:
            return self._secrets[name].read()
        except ConfigError as exc:
            raise SecretUnusableError(exc.errors[0]) from None

    def secrets(self) -> list[str]:
        """Current secret values (for redaction), with the ``client_id:secret`` pair
        HTTP Basic authentication would encode, as is and form-encoded (RFC 6749 §2.3.1)."""
        values = []
        client_id = getattr(self.config, "client_id", None)
        for source in self._secrets.values():
            try:
                value = source.read()
            except ConfigError:
                continue
            values.append(value)
            if isinstance(client_id, str):
                values.append(f"{client_id}:{value}")
                values.append(f"{quote_plus(client_id)}:{quote_plus(value)}")
        return values

    def secret_files(self) -> list[Path]:
        return [s.file for s in self._secrets.values() if s.file is not None]

    def watched_files(self) -> list[Path]:
        """Files (not secrets) whose change should retry failed refreshes at once."""
        return []

    def scoped(
        self, token: Token, wanted: list[str], *, require: bool, requested: bool = True
    ) -> Token:
        """`token` checked against the scopes the job `wanted` (see `refresher.scopes`)."""
        return check_scopes(
            token, wanted, require=require, requested=requested, what=f"{self.kind} grant"
        )

    def url(self, path: str) -> httpx2.URL:
        """`path` merged with the base URL, once: httpx2 re-parses and re-merges a
        relative URL on every request. The merge is httpx2's own (a base path prefix
        is kept), via `build_request`."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self.client.build_request("POST", path).url
        return url

    async def post(
        self,
        path: str,
        what: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Mapping[str, str | list[str]] | None = None,
        json_body: Any = None,
        auth: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """POST to `path` (or an absolute URL), classify the status, and return the
        JSON object body."""
        response = await request(
            self.client,
            "POST",
            self.url(path),
            clock=self.clock,
            headers=headers,
            data=data,
            json_body=json_body,
            auth=auth,
        )
        raise_for_status(response, what)
        return response.json_object()

    async def get_json(self, url: str, what: str) -> dict[str, Any]:
        """GET `url` (a JWKS, server metadata): its JSON object, or a `ProviderError`."""
        response = await request(self.client, "GET", url, clock=self.clock)
        raise_for_status(response, what)
        return response.json_object()

    def token_from(
        self,
        body: Mapping[str, Any],
        *,
        obtained_at: float,
        value: str = "access_token",
        token_type: str = "token_type",
        expires_in: str = "expires_in",
        scope: str = "scope",
        extra: Mapping[str, Any] | None = None,
    ) -> Token:
        """Build a `Token` from a grant body whose field names are given."""
        if body.get(value) in (None, ""):
            raise BadResponseError(f"response has no usable {value!r}")
        return Token.from_grant(
            body.get(value),
            obtained_at=obtained_at,
            token_type=body.get(token_type) or "Bearer",
            expires_in=body.get(expires_in),
            scope=body.get(scope),
            extra=extra,
            assume_lifetime=self.config.assume_lifetime,
            field_names=(value, expires_in),
        )
