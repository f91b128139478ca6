"""Authorization server metadata from the issuer identifier: OpenID Connect
Discovery 1.0 §4 first, then RFC 8414 §3.

* ``{issuer}/.well-known/openid-configuration`` (a terminating ``/`` of the issuer
  removed first); when that answers anything but a JSON document (404 on a plain
  OAuth server), ``{origin}/.well-known/oauth-authorization-server{path}`` (RFC 8414
  §3.1: the well-known part goes between host and path).
* The document's ``issuer`` must be the configured one exactly (OIDC Discovery §4.3,
  RFC 8414 §3.3): metadata for another issuer is refused, not trusted.
* Fetched at first use, kept for `MAX_AGE`, fetched again sooner after `invalidate`
  (a token request failed); a re-fetch that fails keeps the copy held.

Errors name the URL and, for a document missing something, the field.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import structlog

from refresher.clock import Clock
from refresher.errors import BadResponseError, ProviderError, ServerError, TransportError

log = structlog.get_logger("refresher.discovery")

#: Metadata is fetched again after this many seconds (a day).
MAX_AGE = 86400.0
#: After a failure, metadata is fetched again at most this often (seconds).
RETRY_INTERVAL = 30.0

OIDC_PATH = "/.well-known/openid-configuration"
RFC8414_PATH = "/.well-known/oauth-authorization-server"


@dataclass(frozen=True)
class ServerMetadata:
    """What refresher uses of an authorization server's metadata."""

    issuer: str
    #: Where it was found.
    url: str
    token_endpoint: str
    jwks_uri: str | None = None
    #: None when the document does not say (RFC 8414 §2: then ``client_secret_basic``).
    auth_methods: tuple[str, ...] | None = None
    #: None when the document does not say.
    grant_types: tuple[str, ...] | None = None
    #: RFC 8705 §5: the token endpoint to use with a client certificate, if different.
    mtls_token_endpoint: str | None = None

    def supports_auth(self, method: str) -> bool | None:
        """Whether the server lists `method` (None: it lists nothing)."""
        return None if self.auth_methods is None else method in self.auth_methods

    def supports_grant(self, grant_type: str) -> bool | None:
        return None if self.grant_types is None else grant_type in self.grant_types


def metadata_urls(issuer: str) -> list[str]:
    """Where the metadata of `issuer` is published: OIDC first, then RFC 8414."""
    url = httpx2.URL(issuer)
    path = url.path.rstrip("/")
    origin = f"{url.scheme}://{url.netloc.decode()}"
    return [origin + path + OIDC_PATH, origin + RFC8414_PATH + path]


def _url(
    document: Mapping[str, Any], name: str, where: str, *, required: bool, https: bool
) -> str | None:
    value = document.get(name)
    if value is None and not required:
        return None
    schemes = ("https://",) if https else ("https://", "http://")
    if not isinstance(value, str) or not value.startswith(schemes):
        what = "no" if value is None else "no usable"
        kind = "an https URL, as the issuer's" if https else "an http(s) URL"
        raise BadResponseError(f"discovery {where}: {what} {name!r} ({kind})")
    return value


def _strings(document: Mapping[str, Any], name: str, where: str) -> tuple[str, ...] | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadResponseError(f"discovery {where}: {name!r} is not a list of strings")
    return tuple(value)


def parse_metadata(document: Mapping[str, Any], *, issuer: str, url: str) -> ServerMetadata:
    """`document` checked and reduced to `ServerMetadata`; `BadResponseError` naming
    `url` and the field otherwise."""
    found = document.get("issuer")
    if found != issuer:
        shown = repr(found)[:80] if found is not None else "no 'issuer'"
        raise BadResponseError(
            f"discovery {url}: issuer {shown} is not the configured issuer {issuer!r}"
        )
    https = issuer.startswith("https://")
    token_endpoint = _url(document, "token_endpoint", url, required=True, https=https)
    assert token_endpoint is not None
    aliases = document.get("mtls_endpoint_aliases")
    mtls = None
    if isinstance(aliases, dict):
        where = f"{url} mtls_endpoint_aliases"
        mtls = _url(aliases, "token_endpoint", where, required=False, https=https)
    return ServerMetadata(
        issuer=issuer,
        url=url,
        token_endpoint=token_endpoint,
        jwks_uri=_url(document, "jwks_uri", url, required=False, https=https),
        auth_methods=_strings(document, "token_endpoint_auth_methods_supported", url),
        grant_types=_strings(document, "grant_types_supported", url),
        mtls_token_endpoint=mtls,
    )


#: GET a URL and return its JSON object, or raise a `ProviderError`.
Fetch = Callable[[str], Awaitable[dict[str, Any]]]


class Discovery:
    """The metadata of one issuer, fetched with `fetch` and cached (module docstring)."""

    def __init__(self, issuer: str, fetch: Fetch, *, clock: Clock, max_age: float = MAX_AGE):
        self.issuer = issuer
        self._fetch = fetch
        self.clock = clock
        self.max_age = max_age
        self._metadata: ServerMetadata | None = None
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._stale = False
        self._lock = anyio.Lock()
        #: Documents requested (for tests and logs).
        self.fetches = 0

    def invalidate(self) -> None:
        """Fetch again before the next use (a token request failed: the endpoint may
        have moved)."""
        self._stale = True

    async def metadata(self) -> ServerMetadata:
        async with self._lock:
            now = self.clock.now()
            held = self._metadata
            due = self._stale or now - self._fetched_at >= self.max_age
            if held is not None and (not due or now - self._attempted_at < RETRY_INTERVAL):
                return held
            self._attempted_at = now
            try:
                found = await self.discover()
            except ProviderError as exc:
                if held is None:
                    raise
                log.warning(
                    "discovery failed: keeping the metadata held",
                    issuer=self.issuer,
                    error=str(exc),
                )
                return held
            if held is not None and found.token_endpoint != held.token_endpoint:
                log.info("discovery: token endpoint changed", issuer=self.issuer, url=found.url)
            self._metadata, self._fetched_at, self._stale = found, now, False
            return found

    async def discover(self) -> ServerMetadata:
        """Fetch and check the metadata now, OIDC first, then RFC 8414."""
        problems: list[str] = []
        transient = False
        for url in metadata_urls(self.issuer):
            self.fetches += 1
            try:
                document = await self._fetch(url)
            except TransportError:
                raise  # the server is down: the other well-known URL is on it too
            except ProviderError as exc:
                problems.append(f"{url}: {exc}")
                transient = transient or isinstance(exc, ServerError)
                continue
            return parse_metadata(document, issuer=self.issuer, url=url)
        message = f"discovery of {self.issuer} failed: " + "; ".join(problems)
        # A 5xx is the server's passing trouble: retried with backoff, not a config error.
        raise ServerError(message) if transient else BadResponseError(message)
