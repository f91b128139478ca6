"""A generic OAuth 2.0 authorization server issuing RS256 JWT access tokens: the
project's own, for what the independent server of tests/idp lacks (RFC 8693 token
exchange, JWT bearer grants, refresh-token rotation it can be told to forget, mTLS
on demand) and for failure modes a real server will not produce on cue.

* ``POST /oauth/token``: ``client_credentials``, ``refresh_token`` (rotated at every
  use; a used one revokes its whole line and answers ``invalid_grant``, as RFC 9700
  §4.14.2 recommends), ``urn:ietf:params:oauth:grant-type:jwt-bearer`` (RFC 7523
  §2.1) and ``urn:ietf:params:oauth:grant-type:token-exchange`` (RFC 8693). Form
  bodies (or JSON). Client authentication: ``client_secret_basic`` (form-decoded,
  RFC 6749 §2.3.1), ``client_secret_post``, ``client_secret_jwt``,
  ``private_key_jwt``, ``tls_client_auth`` (with ``mtls=True``: the certificate's CN)
  and ``none`` for `public_clients`. Errors are RFC 6749 §5.2 JSON.
* ``GET {issuer path}/.well-known/openid-configuration`` or (``discovery="rfc8414"``)
  ``/.well-known/oauth-authorization-server{issuer path}``; ``GET /jwks``.
* Failure switches: `discovery_down`, `jwks_down` (503), `rotate_key` (optionally
  without publishing the new key: an unknown ``kid``), `skew` (the server's clock),
  plus the shared `Fault` queue of token requests.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from refresher.demo.base import Emulator, problem, read_body
from tests.emulators.tls import ServesTLS

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
AUTH_METHODS = ["client_secret_basic", "client_secret_post", "client_secret_jwt", "private_key_jwt", "tls_client_auth", "none"]


def oauth_error(status: int, code: str, description: str) -> Response:
    """An RFC 6749 §5.2 error response."""
    return JSONResponse({"error": code, "error_description": description}, status_code=status)


class Refused(Exception):
    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(description)
        self.response = oauth_error(status, code, description)


class OAuth2Emulator(ServesTLS, Emulator):
    """`clients` maps client id → secret; `client_keys` client id → public key
    (``private_key_jwt``, and a self-signed ``jwt_bearer`` assertion's ``iss``);
    `mtls_clients` client id → certificate CN; `public_clients` may use ``none``;
    `trusted_issuers` maps an issuer → public key of the assertions and subject tokens
    it accepts (a Kubernetes cluster's ServiceAccount issuer, say)."""

    name = "oauth2"
    token_path = "/oauth/token"
    jwks_path = "/jwks"
    audience = "refresher-emulator"
    #: The ``aud`` a token exchange's subject token must carry (the STS it is meant for).
    sts_audience = "sts"

    def __init__(
        self,
        clients: dict[str, str] | None = None,
        *,
        client_keys: Mapping[str, Any] | None = None,
        mtls_clients: Mapping[str, str] | None = None,
        public_clients: set[str] | None = None,
        trusted_issuers: Mapping[str, Any] | None = None,
        issuer_path: str = "",
        discovery: str | None = "oidc",
        auth_methods: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.clients = dict(clients or {"demo-client": "demo-secret"})
        self.client_keys = dict(client_keys or {})
        self.mtls_clients = dict(mtls_clients or {})
        self.public_clients = set(public_clients or ())
        self.trusted_issuers = dict(trusted_issuers or {})
        self.issuer_path = issuer_path
        self.discovery = discovery
        self.auth_methods = auth_methods
        self.discovery_down = False
        #: Merged into the metadata document (None values remove a field).
        self.metadata_patch: dict[str, Any] = {}
        self.jwks_down = False
        #: Signing keys by kid, the current one last; `published` is what /jwks serves.
        self.keys: dict[str, rsa.RSAPrivateKey] = {"oauth2-1": self.rsa_key}
        self.published: set[str] = {"oauth2-1"}
        #: refresh token → (client id, line); a line is revoked as a whole on reuse.
        self.refresh_tokens: dict[str, tuple[str, str]] = {}
        self.used_refresh_tokens: set[str] = set()
        self.revoked_lines: set[str] = set()
        self.seen_jtis: set[str] = set()
        #: What each token request authenticated with (method, client id), in order.
        self.authentications: list[tuple[str, str | None]] = []
        #: The certificate CN of each mTLS token request, in order.
        self.peer_names: list[str | None] = []

    # ------------------------------------------------------------ identity

    @property
    def issuer(self) -> str:
        return self.url + self.issuer_path

    @property
    def token_url(self) -> str:
        return self.url + self.token_path

    @property
    def key_id(self) -> str:
        return next(reversed(self.keys)) if hasattr(self, "keys") else "oauth2-1"

    def rotate_key(self, *, publish: bool = True, keep_old: bool = True) -> str:
        """Sign with a new key from now on; `publish` it in the JWKS or not."""
        kid = f"oauth2-{len(self.keys) + 1}"
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if not keep_old:
            self.published.clear()
        self.keys[kid] = key
        self.rsa_key = key
        if publish:
            self.published.add(kid)
        return kid

    def issue_refresh_token(self, client_id: str, line: str | None = None) -> str:
        value = "rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self.refresh_tokens[value] = (client_id, line or secrets.token_hex(4))
            self.issued.append(value)
        return value

    # ------------------------------------------------------------ routes

    def routes(self) -> list[Route]:
        path = self.issuer_path
        return [
            Route(self.token_path, self.token, methods=["POST"]),
            Route(self.jwks_path, self.jwks, methods=["GET"]),
            Route(path + "/.well-known/openid-configuration", self.oidc_metadata),
            Route("/.well-known/oauth-authorization-server" + path, self.rfc8414_metadata),
        ]

    def metadata(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "issuer": self.issuer,
            "token_endpoint": self.token_url,
            "jwks_uri": self.url + self.jwks_path,
            "grant_types_supported": [
                "client_credentials",
                "refresh_token",
                JWT_BEARER,
                TOKEN_EXCHANGE,
            ],
            "token_endpoint_auth_methods_supported": self.auth_methods or AUTH_METHODS,
        }
        if self.mtls:
            document["mtls_endpoint_aliases"] = {"token_endpoint": self.token_url}
        document.update(self.metadata_patch)
        return {key: value for key, value in document.items() if value is not None}

    async def oidc_metadata(self, request: Request) -> Response:
        return self._metadata(request, "oidc")

    async def rfc8414_metadata(self, request: Request) -> Response:
        return self._metadata(request, "rfc8414")

    def _metadata(self, request: Request, kind: str) -> Response:
        if self.discovery_down:
            response: Response = problem(503, "discovery is down")
        elif self.discovery != kind:
            response = problem(404, "not here")
        else:
            response = JSONResponse(self.metadata())
        self.record(request, b"", response.status_code, None)
        return response

    async def jwks(self, request: Request) -> Response:
        if self.jwks_down:
            response: Response = problem(503, "JWKS is down")
        else:
            keys = []
            for kid in self.published:
                jwk = json.loads(RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
                keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
            response = JSONResponse({"keys": keys})
        self.record(request, b"", response.status_code, None)
        return response

    async def token(self, request: Request) -> Response:
        body, fields = await read_body(request)
        client_id: str | None = None
        try:
            if not isinstance(fields, dict):
                raise Refused(400, "invalid_request", "the body is not a form")
            resources = [v for k, v in parse_qsl(body.decode(errors="replace")) if k == "resource"]
            if len(resources) > 1:  # RFC 8707 §2: the parameter may repeat
                fields["resource"] = resources
            client_id, method = self._authenticate(request, fields)
            self.authentications.append((method, client_id))
            response = await self.apply_fault() or self._grant(fields, client_id, method)
        except Refused as refused:
            response = refused.response
        self.record(request, body, response.status_code, client_id)
        return response

    # ------------------------------------------------------------ client authentication

    def _authenticate(self, request: Request, fields: dict[str, str]) -> tuple[str | None, str]:
        header = request.headers.get("authorization")
        claimed = fields.get("client_id")
        if header is not None:
            client_id, secret = _basic(header)
            if claimed is not None and claimed != client_id:
                raise Refused(400, "invalid_request", "client_id mismatch")
            self._check_secret(client_id, secret, status=401)
            return client_id, "client_secret_basic"
        if "client_secret" in fields:
            self._check_secret(claimed, fields["client_secret"], status=401)
            return claimed, "client_secret_post"
        if "client_assertion" in fields:
            return self._client_assertion(fields, claimed)
        certificate = self._peer_name(request)
        if certificate is not None and claimed in self.mtls_clients:
            self.peer_names.append(certificate)
            if self.mtls_clients[claimed] != certificate:
                raise Refused(401, "invalid_client", "client certificate does not match")
            return claimed, "tls_client_auth"
        if claimed in self.mtls_clients:
            raise Refused(401, "invalid_client", "client certificate was not provided")
        if claimed is None or claimed in self.public_clients:
            return claimed, "none"
        raise Refused(401, "invalid_client", "no client authentication")

    def _check_secret(self, client_id: str | None, secret: str | None, *, status: int) -> None:
        if client_id is None or self.clients.get(client_id) != secret:
            raise Refused(status, "invalid_client", "invalid client credentials")

    def _client_assertion(
        self, fields: dict[str, str], claimed: str | None
    ) -> tuple[str | None, str]:
        if fields.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise Refused(400, "invalid_request", "client_assertion_type is wrong")
        assertion = fields["client_assertion"]
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Refused(401, "invalid_client", "client_assertion is not a JWT") from None
        client_id = unverified.get("sub")
        if claimed is not None and claimed != client_id:
            raise Refused(400, "invalid_request", "client_id mismatch")
        alg = str(header.get("alg"))
        if alg.startswith("HS"):
            key: Any = (self.clients.get(str(client_id)) or "").encode()
            method = "client_secret_jwt"
        else:
            key = self.client_keys.get(str(client_id))
            method = "private_key_jwt"
        if not key:
            raise Refused(401, "invalid_client", f"no {method} key for this client")
        claims = self._verify(assertion, key, alg, code="invalid_client", status=401)
        if claims.get("iss") != client_id:
            raise Refused(401, "invalid_client", "iss must be the client_id")
        return str(client_id), method

    def _verify(
        self,
        value: str,
        key: Any,
        alg: str,
        *,
        code: str,
        status: int,
        audience: list[str] | None = None,
    ) -> dict[str, Any]:
        """An assertion checked as RFC 7523 §3 asks (on this server's clock)."""
        try:
            claims = jwt.decode(
                value,
                key,
                algorithms=[alg],
                audience=audience or [self.token_url, self.issuer],
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise Refused(status, code, f"assertion rejected: {type(exc).__name__}") from None
        now = self.now()
        if not isinstance(claims.get("exp"), (int, float)) or claims["exp"] <= now:
            raise Refused(status, code, "assertion expired")
        if isinstance(claims.get("nbf"), (int, float)) and claims["nbf"] > now + 5:
            raise Refused(status, code, "assertion not valid yet")
        jti = claims.get("jti")
        if jti is not None:
            if jti in self.seen_jtis:
                raise Refused(status, code, "assertion replayed (jti seen before)")
            self.seen_jtis.add(jti)
        return claims

    @staticmethod
    def _peer_name(request: Request) -> str | None:
        chain = request.scope.get("extensions", {}).get("tls", {}).get("client_cert_chain")
        if not chain:
            return None
        certificate = x509.load_pem_x509_certificate(chain[0].encode())
        names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(names[0].value) if names else None

    # ------------------------------------------------------------ grants

    def _grant(self, fields: dict[str, str], client_id: str | None, method: str) -> Response:
        grant_type = fields.get("grant_type")
        subject = client_id
        refresh = None
        if grant_type == "client_credentials":
            if method == "none":
                raise Refused(401, "invalid_client", "a public client has no client credentials")
        elif grant_type == "refresh_token":
            refresh = self._redeem(fields.get("refresh_token"), client_id)
        elif grant_type == JWT_BEARER:
            subject = self._subject(fields.get("assertion"), "assertion")
        elif grant_type == TOKEN_EXCHANGE:
            if fields.get("subject_token_type") is None:
                raise Refused(400, "invalid_request", "subject_token_type is required")
            subject = self._subject(fields.get("subject_token"), "subject_token")
        else:
            raise Refused(400, "unsupported_grant_type", f"grant_type {grant_type!r}")
        now = int(self.now())
        scope = fields.get("scope") or "default"
        audience = fields.get("resource") or fields.get("audience") or self.audience
        claims = {
            "iss": self.issuer,
            "aud": audience,
            "sub": subject or "anonymous",
            "client_id": client_id,
            "scope": scope,
            "iat": now,
            "nbf": now,
            "exp": now + int(self.token_lifetime),
            "jti": self.new_jti(),
        }
        answer: dict[str, Any] = {
            "access_token": self.sign_rs256(claims),
            "token_type": "Bearer",
            "expires_in": int(self.token_lifetime),
            "scope": scope,
        }
        if refresh is not None:
            answer["refresh_token"] = refresh
        if grant_type == TOKEN_EXCHANGE:
            answer["issued_token_type"] = ACCESS_TOKEN_TYPE
        return JSONResponse(answer)

    def _redeem(self, value: str | None, client_id: str | None) -> str:
        """Rotate `value`: a used one revokes its line (RFC 9700 §4.14.2)."""
        with self._lock:
            held = self.refresh_tokens.get(value or "")
            if held is None:
                raise Refused(400, "invalid_grant", "unknown refresh token")
            owner, line = held
            if owner != client_id:
                raise Refused(400, "invalid_grant", "refresh token of another client")
            if line in self.revoked_lines:
                raise Refused(400, "invalid_grant", "refresh token revoked")
            if value in self.used_refresh_tokens:
                self.revoked_lines.add(line)
                raise Refused(400, "invalid_grant", "refresh token reused: line revoked")
            self.used_refresh_tokens.add(str(value))
        return self.issue_refresh_token(owner, line)

    def _subject(self, value: str | None, name: str) -> str:
        """The subject of a JWT bearer assertion or a subject token from a trusted issuer
        (or signed by a client's own key)."""
        if not value:
            raise Refused(400, "invalid_request", f"{name} is required")
        try:
            unverified = jwt.decode(value, options={"verify_signature": False})
            alg = str(jwt.get_unverified_header(value).get("alg"))
        except jwt.PyJWTError:
            raise Refused(400, "invalid_grant", f"{name} is not a JWT") from None
        issuer = unverified.get("iss")
        key = self.trusted_issuers.get(issuer) or self.client_keys.get(issuer)
        if key is None:
            raise Refused(400, "invalid_grant", f"{name} from an untrusted issuer")
        audience = [self.sts_audience] if name == "subject_token" else None
        claims = self._verify(value, key, alg, code="invalid_grant", status=400, audience=audience)
        return str(claims.get("sub") or issuer)


def _basic(header: str) -> tuple[str | None, str | None]:
    """HTTP Basic credentials, each form-decoded (RFC 6749 §2.3.1)."""
    if not header.lower().startswith("basic "):
        return None, None
    try:
        decoded = base64.b64decode(header[6:], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    user, _, password = decoded.partition(":")
    return unquote_plus(user), unquote_plus(password)
