"""DutyClaims emulator (docs/contracts.md).

* ``POST /v1/oauth/token``: form-encoded client credentials only (JSON → 415 problem);
  opaque ``dcs_sbx_…`` bearer tokens; requested scopes must be in the documented
  vocabulary (else 400) and in the client's grant: else a 403 problem
  (capability-gated), or, with `narrow_scopes`, a grant of only what the client
  has (``scope`` says which, RFC 6749 §3.3). `omit_scope` leaves ``scope`` out of
  the answer (RFC 6749 §5.1: granted as requested).
* ``GET /v1/clients``: the managed credential as ``Authorization: Bearer`` (the
  documented pair), or a live sandbox token; needs ``clients.read``.
  ``GET /v1/claims/status?claimId=…``: the route documented to take ``X-API-Key``
  (``Authorization: Bearer`` works too). A revoked or unknown credential → 401, a
  credential without the route's scope → 403, injected faults (429 + ``Retry-After``)
  apply to these routes as to the token endpoint.
* Every error is an ``application/problem+json`` response.
"""

from __future__ import annotations

import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refresher.demo.base import Emulator, problem, read_body
from refresher.providers.dutyclaims import DUTYCLAIMS_SCOPES
from refresher.token import fingerprint


class DutyClaimsEmulator(Emulator):
    name = "dutyclaims"
    token_path = "/v1/oauth/token"
    clients_path = "/v1/clients"
    claim_status_path = "/v1/claims/status"

    def __init__(
        self,
        clients: dict[str, str] | None = None,
        *,
        granted_scopes: dict[str, set[str]] | None = None,
        managed_credentials: set[str] | None = None,
        credential_scopes: dict[str, set[str]] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.clients = dict(clients or {"dc_client_id": "dc_client_secret"})
        self.granted_scopes = granted_scopes or {c: set(DUTYCLAIMS_SCOPES) for c in self.clients}
        self.managed_credentials = set(managed_credentials or {"dcp_live_demo_credential"})
        #: Scopes per managed credential; a credential not listed has every scope.
        self.credential_scopes = dict(credential_scopes or {})
        self.revoked: set[str] = set()
        self.live_tokens: dict[str, float] = {}
        #: Grant only what the client has instead of refusing the request (403).
        self.narrow_scopes = False
        #: Leave ``scope`` out of token answers.
        self.omit_scope = False

    def routes(self) -> list[Route]:
        return [
            Route(self.token_path, self.token, methods=["POST"]),
            Route(self.clients_path, self.clients_endpoint, methods=["GET"]),
            Route(self.claim_status_path, self.claim_status, methods=["GET"]),
        ]

    def revoke(self, credential: str) -> None:
        """The partner withdraws a managed credential (or a sandbox token): 401 from now."""
        with self._lock:
            self.revoked.add(credential)

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
        have = self.granted_scopes.get(client_id, set())
        missing = requested - have
        if missing and not self.narrow_scopes:
            return problem(403, f"partner capability does not include: {' '.join(sorted(missing))}")
        granted = requested & have if requested else have
        token = "dcs_sbx_" + secrets.token_urlsafe(24)
        with self._lock:
            self.issued.append(token)
            self.live_tokens[token] = self.now() + self.token_lifetime
        answer: dict[str, object] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": int(self.token_lifetime),
        }
        if not self.omit_scope:
            answer["scope"] = " ".join(sorted(granted))
        return JSONResponse(answer)

    async def clients_endpoint(self, request: Request) -> Response:
        return await self._api_call(request, bearer_only=True, scope="clients.read")

    async def claim_status(self, request: Request) -> Response:
        return await self._api_call(request, bearer_only=False, scope=None)

    async def _api_call(
        self, request: Request, *, bearer_only: bool, scope: str | None
    ) -> Response:
        auth = request.headers.get("authorization", "")
        credential = auth[7:] if auth.lower().startswith("bearer ") else None
        if credential is None and not bearer_only:
            credential = request.headers.get("x-api-key")
        response = await self.apply_fault() or self._authorize(credential, scope, bearer_only)
        self.record(
            request, b"", response.status_code, fingerprint(credential) if credential else None
        )
        return response

    def _authorize(self, credential: str | None, scope: str | None, bearer_only: bool) -> Response:
        if credential is None:
            detail = "send the managed credential as Authorization: Bearer"
            if not bearer_only:
                detail += " or X-API-Key"
            return problem(401, detail)
        with self._lock:
            revoked = credential in self.revoked
        managed = credential in self.managed_credentials
        live = self.live_tokens.get(credential, 0) > self.now()
        if revoked or not (managed or live):
            return problem(401, "missing, revoked or invalid managed credential")
        if scope is not None and managed:
            scopes = self.credential_scopes.get(credential, DUTYCLAIMS_SCOPES)
            if scope not in scopes:
                return problem(403, f"partner capability does not include: {scope}")
        return JSONResponse({"clients": []} if scope else {"status": "open"})
