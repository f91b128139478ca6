"""A generic OAuth2 client-credentials server issuing RS256 JWTs.

``POST /oauth/token`` takes RFC 6749 form bodies (client auth in the body or HTTP
Basic) or JSON; answers ``{access_token, token_type, expires_in, scope}``.
"""

from __future__ import annotations

import base64
import binascii

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refresher.demo.base import Emulator, problem, read_body
from tests.emulators.tls import ServesTLS


class OAuth2Emulator(ServesTLS, Emulator):
    """Client credentials → RS256 JWT; `clients` maps client id → secret."""

    name = "oauth2"
    token_path = "/oauth/token"
    issuer = "https://emulator.refresher.invalid"
    audience = "refresher-emulator"

    def __init__(self, clients: dict[str, str] | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.clients = dict(clients or {"demo-client": "demo-secret"})

    @property
    def token_url(self) -> str:
        return self.url + self.token_path

    def routes(self) -> list[Route]:
        return [Route(self.token_path, self.token, methods=["POST"])]

    async def token(self, request: Request) -> Response:
        body, fields = await read_body(request)
        client_id, secret = _basic(request.headers.get("authorization"))
        if isinstance(fields, dict):
            client_id = client_id or fields.get("client_id")
            secret = secret or fields.get("client_secret")
        response = await self.apply_fault() or self._grant(fields, client_id, secret)
        self.record(request, body, response.status_code, client_id)
        return response

    def _grant(self, fields: object, client_id: object, secret: object) -> Response:
        if not isinstance(fields, dict) or fields.get("grant_type") != "client_credentials":
            return problem(400, "grant_type must be client_credentials")
        if not isinstance(client_id, str) or self.clients.get(client_id) != secret:
            return problem(401, "invalid client credentials")
        now = int(self.now())
        scope = fields.get("scope") or "default"
        claims = {
            "iss": self.issuer,
            "aud": fields.get("audience") or self.audience,
            "sub": client_id,
            "scope": scope,
            "iat": now,
            "exp": now + int(self.token_lifetime),
            "jti": self.new_jti(),
        }
        return JSONResponse(
            {
                "access_token": self.sign_rs256(claims),
                "token_type": "Bearer",
                "expires_in": int(self.token_lifetime),
                "scope": scope,
            }
        )


def _basic(header: str | None) -> tuple[str | None, str | None]:
    if not header or not header.lower().startswith("basic "):
        return None, None
    try:
        decoded = base64.b64decode(header[6:]).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    user, _, password = decoded.partition(":")
    return user, password
