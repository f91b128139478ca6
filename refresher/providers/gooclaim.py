"""Gooclaim (seeds/002): JSON client credentials → RS256 machine JWT (1 h).

* ``POST /v1/auth/token`` with ``{"grant_type", "client_id", "client_secret"}``;
  the secret only ever travels in the body.
* With ``public_key_file`` or ``jwks_url``: signature, ``aud`` and ``iss`` are verified
  before anything is written; without, ``aud`` and ``exp`` are still checked. A token
  that fails is never written (reason ``bad_response``).
* 60 token requests per minute per ``client_id`` (shared by every job using it), 429 +
  ``Retry-After`` honoured exactly; never retried on 401 in a loop.
* Optional introspection (``POST /v1/auth/introspect``, its own 600/min budget):
  ``active`` must be true and ``tenant_id`` must match.
"""

from __future__ import annotations

from typing import Any

import anyio
import jwt
from jwt.types import Options

from refresher.clock import Clock
from refresher.config import GooclaimProviderConfig, secret_source
from refresher.errors import BadResponseError
from refresher.providers.base import HTTPClients, HTTPProvider, raise_for_status, request
from refresher.ratelimit import SlidingWindowLimiter
from refresher.token import Token


class GooclaimProvider(HTTPProvider):
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
        self.gooclaim = config
        self._public_key: Any = None
        self._jwks: jwt.PyJWKSet | None = None
        self._jwks_lock = anyio.Lock()
        self.introspection_limiter = SlidingWindowLimiter(
            config.introspect_requests_per_minute, 60.0, clock
        )

    async def fetch(self, tenant: str | None) -> Token:
        cfg = self.gooclaim
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
        claims = await self.verify(token.value)
        token = Token(
            value=token.value,
            token_type=token.token_type,
            obtained_at=token.obtained_at,
            expires_at=token.expires_at,
            scope=token.scope or claims.get("scope"),
            extra={k: claims[k] for k in ("tenant_id", "sub") if k in claims},
        )
        if cfg.introspect:
            await self.introspect(token.value, claims)
        return token

    async def verify(self, value: str) -> dict[str, Any]:
        """Check signature (when a key is configured), ``aud``, ``iss`` and ``exp``."""
        cfg = self.gooclaim
        key = await self._verification_key(value)
        # Expiry is judged below on our (injectable) clock, not the library's.
        options: Options = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}
        if key is not None:
            options["require"] = ["exp", "aud", "iss"]
        else:
            # PyJWT turns every other check off with the signature check: turn the
            # claim checks the contract asks for back on explicitly.
            options["verify_signature"] = False
            options["verify_aud"] = True
            options["verify_iss"] = cfg.issuer is not None
            options["require"] = ["exp", "aud"]
        try:
            claims = jwt.decode(
                value,
                key,
                algorithms=["RS256"],
                audience=cfg.audience,
                issuer=cfg.issuer,
                options=options,
            )
        except jwt.InvalidAudienceError:
            raise BadResponseError(
                f"Gooclaim token has the wrong audience (want {cfg.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise BadResponseError(
                f"Gooclaim token has the wrong issuer (want {cfg.issuer!r})"
            ) from None
        except jwt.InvalidSignatureError:
            raise BadResponseError("Gooclaim token signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise BadResponseError(
                f"Gooclaim token rejected: {type(exc).__name__}: {exc}"
            ) from None
        if float(claims["exp"]) <= self.clock.now():
            raise BadResponseError("Gooclaim token is already expired (check clock skew)")
        return dict(claims)

    async def _verification_key(self, value: str) -> Any:
        cfg = self.gooclaim
        if cfg.public_key_file is not None:
            if self._public_key is None:
                self._public_key = cfg.public_key_file.read_bytes()
            return self._public_key
        if cfg.jwks_url is None:
            return None
        kid = jwt.get_unverified_header(value).get("kid")
        async with self._jwks_lock:
            if self._jwks is None or (kid and kid not in {k.key_id for k in self._jwks.keys}):
                response = await request(self.client, "GET", cfg.jwks_url, clock=self.clock)
                raise_for_status(response, "Gooclaim JWKS request")
                try:
                    self._jwks = jwt.PyJWKSet.from_dict(response.json_object())
                except jwt.PyJWTError as exc:
                    raise BadResponseError(f"Gooclaim JWKS unusable: {exc}") from None
        for jwk in self._jwks.keys:
            if kid is None or jwk.key_id == kid:
                return jwk.key
        raise BadResponseError(f"Gooclaim token key id {kid!r} is not in the JWKS")

    async def introspect(self, value: str, claims: dict[str, Any]) -> None:
        """Ask Gooclaim whether the token is active and belongs to the right tenant."""
        await self.introspection_limiter.acquire()
        body = await self.post(
            self.introspect_path,
            "Gooclaim introspection",
            headers={"Authorization": f"Bearer {value}"},
            json_body={"token": value},
        )
        if body.get("active") is not True:
            raise BadResponseError("Gooclaim introspection says the token is not active")
        expected = self.gooclaim.tenant_id or claims.get("tenant_id")
        if expected is not None and body.get("tenant_id") != expected:
            raise BadResponseError(
                f"Gooclaim introspection tenant_id {body.get('tenant_id')!r} != {expected!r}"
            )
