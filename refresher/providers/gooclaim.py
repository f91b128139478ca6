"""Gooclaim (docs/contracts.md): JSON client credentials → RS256 machine JWT (1 h).

* ``POST /v1/auth/token`` with ``{"grant_type", "client_id", "client_secret"}``;
  the secret only ever travels in the body.
* Every token is checked before anything is written (`refresher.jwtverify`): header
  ``alg`` RS256 always; ``aud`` (``gooclaim-api``), ``iss`` when configured (the seed
  names no value: the issuer your onboarding names), ``exp``; ``sub`` must be the
  ``client_id`` (a machine token) and ``tenant_id``, when configured, the claim's. The
  signature is verified with ``public_key_file`` (re-read when it changes) or
  ``jwks_url`` (re-fetched for an unknown ``kid``); without either it is not, and
  ``refresher check`` says so. A token that fails is never written (``bad_response``).
* 60 token requests per minute per ``client_id`` (shared by every job using it), 429 +
  ``Retry-After`` honoured exactly; never retried on 401 in a loop.
* Optional introspection (``POST /v1/auth/introspect``): its 600/min budget is per
  ``client_id``, shared by every job with that client id. ``active`` must be true and
  ``tenant_id``, ``exp`` and ``scope`` must be the token's. A 429 there waits
  ``Retry-After`` and asks again, keeping the minted token and leaving the token
  budget alone.
* ``expected_scopes`` (Gooclaim requests none) are compared with the granted ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import Field, field_validator, model_validator

from refresher.clock import Clock
from refresher.errors import BadResponseError, RateLimitedError
from refresher.fields import (
    ClientSecretFields,
    PartnerProviderConfig,
    checking_files,
    existing_file,
    optional_http_url,
    require_needs_scopes,
    scope_tokens,
    secret_fields,
    secret_source,
)
from refresher.jwtverify import JWKSCache, JWTVerifier, KeySource, PublicKeyFile, shown
from refresher.providers.base import HTTPClients, HTTPProvider
from refresher.token import Token

log = structlog.get_logger("refresher.providers.gooclaim")

#: Introspection asks at most this often per mint when answered 429.
INTROSPECT_ATTEMPTS = 3
#: A longer ``Retry-After`` from introspection is the scheduler's to wait (as a 429),
#: not this mint's: a waiting mint holds a concurrency slot.
INTROSPECT_MAX_WAIT = 60.0


class GooclaimProviderConfig(PartnerProviderConfig, ClientSecretFields):
    """Gooclaim: JSON client credentials → RS256 machine JWT (1 h), 60 requests/min."""

    kind: Literal["gooclaim"]
    base_url: str = "https://api.gooclaim.com"
    client_id: str
    issuer: str | None = None
    audience: str = "gooclaim-api"
    public_key_file: Path | None = None
    jwks_url: str | None = None
    tenant_id: str | None = None
    introspect: bool = False
    requests_per_minute: int | None = Field(default=60, gt=0)
    #: Per ``client_id``: shared by every job with this client id and base_url.
    introspect_requests_per_minute: int = Field(default=600, gt=0)
    #: Gooclaim grants what onboarding set up (no ``scope`` is requested): compare with this.
    expected_scopes: list[str] = Field(default_factory=list)
    #: A token lacking an expected scope fails (reason ``scope_missing``) instead of a warning.
    require_scopes: bool = False

    @field_validator("expected_scopes")
    @classmethod
    def _check_scopes(cls, scopes: list[str]) -> list[str]:
        return scope_tokens(scopes)

    _jwks_http = field_validator("jwks_url")(optional_http_url)

    _check_files = field_validator("public_key_file")(existing_file)

    @field_validator("public_key_file")
    @classmethod
    def _pem(cls, value: Path | None) -> Path | None:
        if value is None or not checking_files.get():
            return value
        if b"-----BEGIN" not in value.read_bytes()[:4096]:
            raise ValueError("not a PEM public key")
        return value

    @model_validator(mode="after")
    def _verification(self) -> GooclaimProviderConfig:
        secret_fields(self, "client_secret", required=True)
        if self.public_key_file is not None and self.jwks_url is not None:
            raise ValueError("set only one of public_key_file, jwks_url")
        if (self.public_key_file or self.jwks_url) and not self.issuer:
            raise ValueError(
                "issuer is required to verify tokens (the contract says verify aud and iss; "
                "use the issuer your Gooclaim onboarding names)"
            )
        require_needs_scopes(self.require_scopes, self.expected_scopes, "expected_scopes")
        return self


class GooclaimProvider(HTTPProvider[GooclaimProviderConfig]):
    kind = "gooclaim"
    token_path = "/v1/auth/token"
    introspect_path = "/v1/auth/introspect"

    def __init__(
        self, config: GooclaimProviderConfig, *, clients: HTTPClients, clock: Clock
    ) -> None:
        super().__init__(
            config,
            base_url=config.base_url,
            clients=clients,
            clock=clock,
            secrets={"client_secret": secret_source(config, "client_secret")},
            rate_limit_key=config.client_id,
            default_requests_per_minute=60,
        )
        keys: KeySource | None = None
        if config.public_key_file is not None:
            keys = PublicKeyFile(config.public_key_file)
        elif config.jwks_url is not None:
            keys = JWKSCache(self._fetch_jwks, clock=clock)
        self.keys = keys
        self.verifier = JWTVerifier(
            what="Gooclaim token",
            clock=clock,
            keys=keys,
            audience=config.audience,
            issuer=config.issuer,
            algorithms=("RS256",),
        )
        self.introspection_limiter = clients.limiter(
            f"gooclaim-introspect:{config.base_url}:{config.client_id}",
            config.introspect_requests_per_minute,
            60.0,
            clock,
        )

    def watched_files(self) -> list[Path]:
        """A new signing key retries failed verifications at once."""
        key_file = self.config.public_key_file
        return [key_file] if key_file is not None else []

    async def fetch(self, tenant: str | None) -> Token:
        cfg = self.config
        started = self.clock.now()
        body = await self.post(
            self.token_path,
            "Gooclaim token request",
            json_body={
                "grant_type": "client_credentials",
                "client_id": cfg.client_id,
                "client_secret": self.secret("client_secret"),
            },
        )
        token = self.token_from(body, obtained_at=started)
        claims = (await self.verifier.verify(token.value)).claims
        self._check_identity(claims)
        scope = token.scope or claims.get("scope")
        token = Token(
            value=token.value,
            token_type=token.token_type,
            obtained_at=token.obtained_at,
            expires_at=token.expires_at,
            scope=scope if isinstance(scope, str) else None,
            extra={k: claims[k] for k in ("tenant_id", "sub") if k in claims},
        )
        token = self.scoped(token, cfg.expected_scopes, require=cfg.require_scopes, requested=False)
        if cfg.introspect:
            await self.introspect(token, claims)
        return token

    def _check_identity(self, claims: Mapping[str, Any]) -> None:
        """A machine token for our client id and (when configured) our tenant."""
        cfg = self.config
        if claims.get("sub") != cfg.client_id:
            raise BadResponseError(
                f"Gooclaim token sub {shown(claims.get('sub'))} is not the client_id "
                f"{cfg.client_id!r} (not a machine token for this client)"
            )
        tenant = claims.get("tenant_id")
        if not isinstance(tenant, str) or not tenant:
            raise BadResponseError("Gooclaim token has no tenant_id claim")
        if cfg.tenant_id is not None and tenant != cfg.tenant_id:
            raise BadResponseError(f"Gooclaim token tenant_id {shown(tenant)} != {cfg.tenant_id!r}")

    async def _fetch_jwks(self) -> dict[str, Any]:
        url = self.config.jwks_url
        assert url is not None
        return await self.get_json(url, "Gooclaim JWKS request")

    async def introspect(self, token: Token, claims: Mapping[str, Any]) -> None:
        """Ask Gooclaim whether the token is active and is what it claims to be.

        Within the shared per-``client_id`` budget; a 429 blocks that budget until
        ``Retry-After`` for every job sharing it, and this mint asks again then.
        """
        limiter = self.introspection_limiter
        for attempt in range(1, INTROSPECT_ATTEMPTS + 1):
            await limiter.acquire()
            try:
                body = await self.post(
                    self.introspect_path,
                    "Gooclaim introspection",
                    headers={"Authorization": f"Bearer {token.value}"},
                    json_body={"token": token.value},
                )
            except RateLimitedError as exc:
                wait = exc.retry_after if exc.retry_after else 1.0
                limiter.block_until(self.clock.now() + wait)
                if attempt == INTROSPECT_ATTEMPTS or wait > INTROSPECT_MAX_WAIT:
                    raise RateLimitedError(
                        f"Gooclaim introspection: HTTP 429 ({attempt} attempt(s)); "
                        "the token is not written unverified",
                        retry_after=wait,
                        problem=exc.problem,
                    ) from None
                log.warning(
                    "introspection rate-limited: asking again after Retry-After",
                    retry_in=round(wait, 3),
                    attempt=attempt,
                    fingerprint=token.fingerprint(),
                )
                continue
            self._check_introspection(body, token, claims)
            return

    def _check_introspection(
        self, body: Mapping[str, Any], token: Token, claims: Mapping[str, Any]
    ) -> None:
        if body.get("active") is not True:
            raise BadResponseError("Gooclaim introspection says the token is not active")
        expected = self.config.tenant_id or claims.get("tenant_id")
        if body.get("tenant_id") != expected:
            raise BadResponseError(
                f"Gooclaim introspection tenant_id {shown(body.get('tenant_id'))} != {expected!r}"
            )
        exp = body.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, (int, float)) or exp != claims["exp"]:
            raise BadResponseError(
                f"Gooclaim introspection exp {shown(exp)} is not the token's {claims['exp']!r}"
            )
        claimed = claims.get("scope")
        claimed = claimed if isinstance(claimed, str) else token.scope or ""
        scope = body.get("scope")
        if not isinstance(scope, str) or set(scope.split()) != set(claimed.split()):
            raise BadResponseError(
                f"Gooclaim introspection scope {shown(scope)} is not the token's {claimed!r}"
            )
