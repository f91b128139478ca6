"""DutyClaims emulator (seeds/000).

* ``POST /v1/oauth/token``: form-encoded client credentials only (JSON → 415 problem);
  opaque ``dcs_sbx_…`` bearer tokens; requested scopes must be in the client's grant
  (else 403 problem: capability-gated), and in the documented vocabulary (else 400).
* ``GET /v1/clients``: accepts a managed credential as ``Authorization: Bearer`` or
  ``X-API-Key`` (to check what the managed mode publishes), or a sandbox token.
* Every error is an ``application/problem+json`` response; 429 carries ``Retry-After``.
"""

from __future__ import annotations

import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refresher.config import DUTYCLAIMS_SCOPES
from refresher.emulators.base import Emulator, problem, read_body


class DutyClaimsEmulator(Emulator):
    name = "dutyclaims"
    token_path = "/v1/oauth/token"

    def __init__(
        self,
        clients: dict[str, str] | None = None,
        *,
        granted_scopes: dict[str, set[str]] | None = None,
        managed_credentials: set[str] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.clients = dict(clients or {"dc_client_id": "dc_client_secret"})
        self.granted_scopes = granted_scopes or {c: set(DUTYCLAIMS_SCOPES) for c in self.clients}
        self.managed_credentials = set(managed_credentials or {"dcp_live_demo_credential"})
        self.live_tokens: dict[str, float] = {}

    def routes(self) -> list[Route]:
        return [
            Route(self.token_path, self.token, methods=["POST"]),
            Route("/v1/clients", self.clients_endpoint, methods=["GET"]),
        ]

    async def token(self, request: Request) -> Response:
        body, fields = await read_body(request)
        client_id = fields.get("client_id") if isinstance(fields, dict) else None
        response = await self.apply_fault() or self._grant(request, fields)
        self.record(
            request, body, response.status_code, client_id if isinstance(client_id, str) else None
        )
        return response

    def _grant(self, request: Request, fields: object) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0]
        if content_type != "application/x-www-form-urlencoded":
            return problem(415, "token requests must be application/x-www-form-urlencoded")
        assert isinstance(fields, dict)
        if fields.get("grant_type") != "client_credentials":
            return problem(400, "grant_type must be client_credentials")
        client_id = fields.get("client_id")
        if not client_id or self.clients.get(client_id) != fields.get("client_secret"):
            return problem(401, "invalid client credentials for the sandbox token endpoint")
        requested = set((fields.get("scope") or "").split())
        unknown = requested - DUTYCLAIMS_SCOPES
        if unknown:
            return problem(400, f"unknown scope(s): {' '.join(sorted(unknown))}")
        missing = requested - self.granted_scopes.get(client_id, set())
        if missing:
            return problem(403, f"partner capability does not include: {' '.join(sorted(missing))}")
        token = "dcs_sbx_" + secrets.token_urlsafe(24)
        with self._lock:
            self.issued.append(token)
            self.live_tokens[token] = self.now() + self.token_lifetime
        return JSONResponse(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(self.token_lifetime),
                "scope": " ".join(sorted(requested)),
            }
        )

    async def clients_endpoint(self, request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        credential = (
            auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        )
        if (
            credential in self.managed_credentials
            or self.live_tokens.get(credential or "", 0) > self.now()
        ):
            return JSONResponse({"clients": []})
        return problem(401, "missing or invalid managed credential")
