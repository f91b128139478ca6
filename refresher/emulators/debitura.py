"""Debitura emulator (seeds/001).

``POST /oauth/token`` with header ``XApiKey`` and JSON ``{"externalTenantId": …}`` →
``{accessToken, tokenType, expiresIn, externalTenantId, creditorId}``: an HS256 JWT
signed with this emulator's secret, 1800 s by default, no refresh token. Unknown API
keys → 401; tenants in `unlinked` → 401 every time (an invalid link).
"""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refresher.emulators.base import Emulator, problem, read_body

_CREDITOR_NS = uuid.UUID("6f1c1b52-3f7e-4c55-9a43-0d3c6c1f7a10")


class DebituraEmulator(Emulator):
    name = "debitura"
    token_path = "/oauth/token"

    def __init__(
        self, api_keys: set[str] | None = None, *, token_lifetime: float = 1800.0, **kwargs: object
    ) -> None:
        super().__init__(token_lifetime=token_lifetime, **kwargs)  # type: ignore[arg-type]
        self.api_keys = set(api_keys or {"debitura-demo-api-key"})
        self.unlinked: set[str] = set()

    def routes(self) -> list[Route]:
        return [Route(self.token_path, self.token, methods=["POST"])]

    @staticmethod
    def creditor_id(tenant: str) -> str:
        return str(uuid.uuid5(_CREDITOR_NS, tenant))

    async def token(self, request: Request) -> Response:
        body, data = await read_body(request)
        tenant = data.get("externalTenantId") if isinstance(data, dict) else None
        response = await self.apply_fault() or self._mint(request, data)
        self.record(
            request, body, response.status_code, tenant if isinstance(tenant, str) else None
        )
        return response

    def _mint(self, request: Request, data: object) -> Response:
        if request.headers.get("xapikey") not in self.api_keys:
            return problem(401, "missing or invalid XApiKey")
        if not isinstance(data, dict) or not isinstance(data.get("externalTenantId"), str):
            return problem(400, "body must be JSON with externalTenantId")
        tenant = data["externalTenantId"]
        if tenant in self.unlinked:
            return problem(401, f"tenant {tenant} is not linked to a creditor")
        now = int(self.now())
        creditor = self.creditor_id(tenant)
        token = self.sign_hs256(
            {
                "sub": tenant,
                "externalTenantId": tenant,
                "creditorId": creditor,
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
