"""Debitura emulator: the referral partner's token endpoint and the Customer API
call it exists for.

* ``POST /oauth/token`` with header ``XApiKey`` and JSON ``{"externalTenantId": …}``
  → ``{accessToken, tokenType, expiresIn, externalTenantId, creditorId}``: an HS256
  JWT signed with this emulator's secret, 1800 s by default, no refresh token.
  Unknown API keys → 401; tenants in `mint_refused` → 401 at the mint too (the
  contract does not say what the mint answers for an unlinked tenant; this models
  the case where it refuses).
* ``POST /cases`` (the Customer API) with ``Authorization: Bearer <token>`` → 201,
  or 401 for a token that is expired, revoked (`revoke`), minted under an API key
  since removed, or for a tenant in `unlinked` (its client link is invalid: every
  token for it is rejected, however fresh).
"""

from __future__ import annotations

import uuid
from typing import Any

import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refresher.demo.base import Emulator, problem, read_body
from refresher.token import fingerprint

_CREDITOR_NS = uuid.UUID("6f1c1b52-3f7e-4c55-9a43-0d3c6c1f7a10")


class DebituraEmulator(Emulator):
    name = "debitura"
    token_path = "/oauth/token"
    cases_path = "/cases"

    def __init__(
        self, api_keys: set[str] | None = None, *, token_lifetime: float = 1800.0, **kwargs: object
    ) -> None:
        super().__init__(token_lifetime=token_lifetime, **kwargs)  # type: ignore[arg-type]
        self.api_keys = set(api_keys or {"debitura-demo-api-key"})
        #: Tenants whose client link is invalid: the Customer API rejects their tokens.
        self.unlinked: set[str] = set()
        #: Tenants the mint itself answers 401 for.
        self.mint_refused: set[str] = set()
        #: Fingerprints of tokens the Customer API rejects from now on.
        self.revoked: set[str] = set()
        self.cases: list[dict[str, Any]] = []

    def routes(self) -> list[Route]:
        return [
            Route(self.token_path, self.token, methods=["POST"]),
            Route(self.cases_path, self.create_case, methods=["POST"]),
        ]

    @staticmethod
    def creditor_id(tenant: str) -> str:
        return str(uuid.uuid5(_CREDITOR_NS, tenant))

    def revoke(self, token: str) -> None:
        """The Customer API rejects `token` from now on (as after a key rotation)."""
        self.revoked.add(fingerprint(token))

    async def token(self, request: Request) -> Response:
        body, data = await read_body(request)
        tenant = data.get("externalTenantId") if isinstance(data, dict) else None
        response = await self.apply_fault() or self._mint(request, data)
        self.record(
            request, body, response.status_code, tenant if isinstance(tenant, str) else None
        )
        return response

    def _mint(self, request: Request, data: object) -> Response:
        api_key = request.headers.get("xapikey")
        if api_key not in self.api_keys:
            return problem(401, "missing or invalid XApiKey")
        if not isinstance(data, dict) or not isinstance(data.get("externalTenantId"), str):
            return problem(400, "body must be JSON with externalTenantId")
        tenant = data["externalTenantId"]
        if tenant in self.mint_refused:
            return problem(401, "tenant is not linked to a creditor")
        now = int(self.now())
        creditor = self.creditor_id(tenant)
        token = self.sign_hs256(
            {
                "sub": tenant,
                "externalTenantId": tenant,
                "creditorId": creditor,
                "key": fingerprint(api_key),
                "jti": self.new_jti(),
                "iat": now,
                "exp": now + int(self.token_lifetime),
            }
        )
        return JSONResponse(
            {
                "accessToken": token,
                "tokenType": "Bearer",
                "expiresIn": int(self.token_lifetime),
                "externalTenantId": tenant,
                "creditorId": creditor,
            }
        )

    async def create_case(self, request: Request) -> Response:
        """The Customer API: accepts a case for the token's tenant, or 401."""
        body, data = await read_body(request)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        verdict = self._customer_verdict(token if scheme.lower() == "bearer" else "")
        tenant = verdict if not verdict.startswith("401:") else None
        if tenant is None:
            response = problem(401, verdict[4:])
        else:
            case = {"caseId": uuid.uuid4().hex, "externalTenantId": tenant, "case": data}
            self.cases.append(case)
            response = JSONResponse(case, status_code=201)
        self.record(request, body, response.status_code, tenant)
        return response

    def _customer_verdict(self, token: str) -> str:
        """The token's tenant, or ``401:<why>``."""
        try:
            # Times are judged below on the emulator's (injectable) clock.
            claims = jwt.decode(
                token,
                self.hmac_key,
                algorithms=["HS256"],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError:
            return "401:invalid token"
        tenant = claims.get("externalTenantId")
        if not isinstance(tenant, str):
            return "401:invalid token"
        if float(claims.get("exp", 0)) <= self.now():
            return "401:token expired"
        if fingerprint(token) in self.revoked:
            return "401:token revoked"
        if not any(claims.get("key") == fingerprint(key) for key in self.api_keys):
            return "401:API key revoked"
        if tenant in self.unlinked:
            return "401:client link is invalid"
        return tenant
