"""Gooclaim emulator (docs/contracts.md).

* ``POST /v1/auth/token``: JSON client credentials → RS256 JWT with ``sub``,
  ``tenant_id``, ``scope``, ``iat``, ``exp``, ``aud = gooclaim-api``, ``iss``; 1 h.
  The seed names no ``iss`` value: the emulator's `issuer` is its own placeholder,
  as a deployment's is whatever its onboarding names.
* ``POST /v1/auth/introspect``: ``{"token"}`` (+ bearer) → ``active``, ``tenant_id``,
  ``scope``, ``exp``; a `revoke`d token (or every token, with `revoke_on_issue`) is
  ``active: false``; `introspect_overrides`
  replace fields of the answer (a lying or confused introspection endpoint).
* ``GET /.well-known/jwks.json``: the signing keys (the current one, and the previous
  one after `rotate_key(keep_old=True)`; with `jwks_lag` not yet the current one). Not
  in the seed: a JWKS is how a deployment may distribute the key.
* Real sliding-window limits per ``client_id``: 60/min on the token endpoint, 600/min
  on introspection; over the limit → 429 with ``Retry-After`` (whole seconds).
* Token faults: `wrong_audience`, `wrong_issuer`, `bad_signature`, `expired`, `alg`
  (``HS256`` signed with the public key as HMAC secret, or ``none``), `sub` (another
  subject, e.g. a human user's id), `skew`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refresher.demo.base import Emulator, WindowLimiter, problem, read_body


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class GooclaimEmulator(Emulator):
    name = "gooclaim"
    token_path = "/v1/auth/token"
    introspect_path = "/v1/auth/introspect"
    jwks_path = "/.well-known/jwks.json"
    #: A placeholder: the seed gives no ``iss``; a deployment uses what its onboarding names.
    default_issuer = "https://issuer.gooclaim-emulator.invalid"
    audience = "gooclaim-api"

    def __init__(
        self,
        clients: dict[str, str] | None = None,
        *,
        tenants: dict[str, str] | None = None,
        token_limit: int = 60,
        introspect_limit: int = 600,
        issuer: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.clients = dict(clients or {"gooclaim-demo-client": "gooclaim-demo-secret"})
        self.tenants = dict(tenants or {})
        self.issuer = issuer or self.default_issuer
        self.token_limiter = WindowLimiter(token_limit)
        self.introspect_limiter = WindowLimiter(introspect_limit)
        self.scope = "workflow:read audit:read"
        self.wrong_audience = False
        self.wrong_issuer = False
        self.bad_signature = False
        self.expired = False
        #: The header ``alg`` of issued tokens: RS256, or a forgery (``HS256``, ``none``).
        self.alg = "RS256"
        #: Issue tokens for this subject instead of the client id.
        self.sub: str | None = None
        self.revoked: set[str] = set()
        #: Revoke every token as it is issued (introspection: ``active: false``).
        self.revoke_on_issue = False
        self.introspect_overrides: dict[str, Any] = {}
        #: The JWKS lags behind a rotation: it does not list the current key yet.
        self.jwks_lag = False
        self._generation = 1
        #: kid → private key, every key whose tokens still verify (JWKS and introspection).
        self.keys: dict[str, rsa.RSAPrivateKey] = {self.key_id: self.rsa_key}

    @property
    def key_id(self) -> str:
        return f"{self.name}-{self._generation}"

    def tenant_of(self, client_id: str) -> str:
        return self.tenants.get(client_id, f"tenant-{client_id}")

    def rotate_key(self, *, keep_old: bool = True) -> None:
        """Sign with a fresh key under a new ``kid``; the JWKS keeps the old one if asked."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with self._lock:
            if not keep_old:
                self.keys.clear()
            self._generation += 1
            self.rsa_key = key
            self.keys[self.key_id] = key

    def revoke(self, token: str) -> None:
        """Introspection answers ``active: false`` for `token` from now on."""
        with self._lock:
            self.revoked.add(token)

    def routes(self) -> list[Route]:
        return [
            Route(self.token_path, self.token, methods=["POST"]),
            Route(self.introspect_path, self.introspect, methods=["POST"]),
            Route(self.jwks_path, self.jwks, methods=["GET"]),
        ]

    async def token(self, request: Request) -> Response:
        body, data = await read_body(request)
        client_id = data.get("client_id") if isinstance(data, dict) else None
        client = client_id if isinstance(client_id, str) else None
        wait = self.token_limiter.check(client or "-", self.clock.now())
        if wait is not None:
            response: Response = problem(
                429,
                "60 token requests per minute per client_id",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        else:
            response = await self.apply_fault() or self._mint(request, data)
        self.record(request, body, response.status_code, client)
        return response

    def _mint(self, request: Request, data: object) -> Response:
        if request.headers.get("content-type", "").split(";")[0] != "application/json":
            return problem(415, "token requests must be JSON")
        if not isinstance(data, dict) or data.get("grant_type") != "client_credentials":
            return problem(400, "grant_type must be client_credentials")
        client_id = data.get("client_id")
        if not isinstance(client_id, str) or self.clients.get(client_id) != data.get(
            "client_secret"
        ):
            return problem(401, "invalid client credentials")
        now = int(self.now())
        lifetime = int(self.token_lifetime)
        claims = {
            "sub": self.sub or client_id,
            "tenant_id": self.tenant_of(client_id),
            "scope": self.scope,
            "iat": now - (2 * lifetime if self.expired else 0),
            "exp": now + (-lifetime if self.expired else lifetime),
            "aud": "someone-else" if self.wrong_audience else self.audience,
            "iss": "https://evil.example" if self.wrong_issuer else self.issuer,
        }
        if self.alg != "RS256":
            token = self._forged(claims)
        elif self.bad_signature:
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            token = jwt.encode(claims, other, algorithm="RS256", headers={"kid": self.key_id})
            with self._lock:
                self.issued.append(token)
        else:
            token = self.sign_rs256(claims)
        if self.revoke_on_issue:
            self.revoke(token)
        return JSONResponse(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": lifetime,
                "scope": self.scope,
            }
        )

    def _forged(self, claims: Mapping[str, Any]) -> str:
        """A token with `alg`: ``none`` (no signature) or HMAC keyed with the public PEM."""
        header = {"alg": self.alg, "typ": "JWT", "kid": self.key_id}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = b""
        if self.alg.startswith("HS"):
            digest = getattr(hashlib, f"sha{self.alg[2:]}")
            signature = hmac.new(self.public_key_pem(), signing_input.encode(), digest).digest()
        token = f"{signing_input}.{_b64(signature)}"
        with self._lock:
            self.issued.append(token)
        return token

    async def introspect(self, request: Request) -> Response:
        body, data = await read_body(request)
        token = data.get("token") if isinstance(data, dict) else None
        claims = self._verified(token) if isinstance(token, str) else {}
        client = str(claims.get("sub")) if claims else None
        wait = self.introspect_limiter.check(client or "-", self.clock.now())
        if wait is not None:
            response: Response = problem(
                429, "introspection limit", headers={"Retry-After": str(math.ceil(wait))}
            )
        elif not claims:
            response = JSONResponse({"active": False})
        else:
            with self._lock:
                revoked = token in self.revoked
            active = float(str(claims["exp"])) > self.now() and not revoked
            answer = {
                "active": active,
                "tenant_id": claims.get("tenant_id"),
                "scope": claims.get("scope"),
                "exp": claims.get("exp"),
                "sub": claims.get("sub"),
            }
            answer.update(self.introspect_overrides)
            response = JSONResponse(answer)
        self.record(request, body, response.status_code, client)
        return response

    def _verified(self, token: str) -> dict[str, Any]:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self.keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                return {}
            return dict(
                jwt.decode(
                    token,
                    key.public_key(),
                    algorithms=["RS256"],
                    audience=self.audience,
                    options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
                )
            )
        except jwt.PyJWTError:
            return {}

    async def jwks(self, request: Request) -> Response:
        with self._lock:
            lagging = self.key_id if self.jwks_lag else None
            keys = [(kid, key) for kid, key in self.keys.items() if kid != lagging]
        jwks = []
        for kid, key in keys:
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk.update(kid=kid, use="sig", alg="RS256")
            jwks.append(jwk)
        self.record(request, b"", 200, None)
        return JSONResponse({"keys": jwks})
