"""Gooclaim emulator (seeds/002).

* ``POST /v1/auth/token``: JSON client credentials → RS256 JWT with ``sub``,
  ``tenant_id``, ``scope``, ``iat``, ``exp``, ``aud = gooclaim-api``, ``iss``; 1 h.
* ``POST /v1/auth/introspect``: ``{"token"}`` (+ bearer) → ``active``, ``tenant_id``,
  ``scope``, ``exp``.
* Real sliding-window limits per ``client_id``: 60/min on the token endpoint, 600/min
  on introspection; over the limit → 429 with ``Retry-After`` (whole seconds).
* Token faults: `wrong_audience`, `wrong_issuer`, `bad_signature`, `expired`, `skew`.
"""

from __future__ import annotations

import math

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refresher.emulators.base import Emulator, WindowLimiter, problem, read_body


class GooclaimEmulator(Emulator):
    name = "gooclaim"
    token_path = "/v1/auth/token"
    introspect_path = "/v1/auth/introspect"
    issuer = "https://auth.gooclaim.com"
    audience = "gooclaim-api"

    def __init__(
        self,
        clients: dict[str, str] | None = None,
        *,
        tenants: dict[str, str] | None = None,
        token_limit: int = 60,
        introspect_limit: int = 600,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.clients = dict(clients or {"gooclaim-demo-client": "gooclaim-demo-secret"})
        self.tenants = dict(tenants or {})
        self.token_limiter = WindowLimiter(token_limit)
        self.introspect_limiter = WindowLimiter(introspect_limit)
        self.scope = "workflow:read audit:read"
        self.wrong_audience = False
        self.wrong_issuer = False
        self.bad_signature = False
        self.expired = False
        self.revoked: set[str] = set()

    def tenant_of(self, client_id: str) -> str:
        return self.tenants.get(client_id, f"tenant-{client_id}")

    def routes(self) -> list[Route]:
        return [
            Route(self.token_path, self.token, methods=["POST"]),
            Route(self.introspect_path, self.introspect, methods=["POST"]),
            Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
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
            "sub": client_id,
            "tenant_id": self.tenant_of(client_id),
            "scope": self.scope,
            "iat": now - (2 * lifetime if self.expired else 0),
            "exp": now + (-lifetime if self.expired else lifetime),
            "aud": "someone-else" if self.wrong_audience else self.audience,
            "iss": "https://evil.example" if self.wrong_issuer else self.issuer,
        }
        if self.bad_signature:
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            token = jwt.encode(claims, other, algorithm="RS256", headers={"kid": self.key_id})
            with self._lock:
                self.issued.append(token)
        else:
            token = self.sign_rs256(claims)
        return JSONResponse(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": lifetime,
                "scope": self.scope,
            }
        )

    async def introspect(self, request: Request) -> Response:
        body, data = await read_body(request)
        token = data.get("token") if isinstance(data, dict) else None
        claims: dict[str, object] = {}
        if isinstance(token, str):
            try:
                claims = jwt.decode(
                    token,
                    self.rsa_key.public_key(),
                    algorithms=["RS256"],
                    audience=self.audience,
                    options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
                )
            except jwt.PyJWTError:
                claims = {}
        client = str(claims.get("sub")) if claims else None
        wait = self.introspect_limiter.check(client or "-", self.clock.now())
        if wait is not None:
            response: Response = problem(
                429, "introspection limit", headers={"Retry-After": str(math.ceil(wait))}
            )
        elif not claims:
            response = JSONResponse({"active": False})
        else:
            active = float(str(claims["exp"])) > self.now() and token not in self.revoked
            response = JSONResponse(
                {
                    "active": active,
                    "tenant_id": claims.get("tenant_id"),
                    "scope": claims.get("scope"),
                    "exp": claims.get("exp"),
                    "sub": claims.get("sub"),
                }
            )
        self.record(request, body, response.status_code, client)
        return response

    async def jwks(self, request: Request) -> Response:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa_key.public_key(), as_dict=True)
        jwk.update(kid=self.key_id, use="sig", alg="RS256")
        return JSONResponse({"keys": [jwk]})
