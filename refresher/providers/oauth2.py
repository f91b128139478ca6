"""The generic OAuth 2.0 provider, for any standards-compliant authorization server
(Keycloak, Entra ID, Okta, Auth0, Google, your own).

* **Where**: ``token_url``, or ``issuer`` and discovery (`refresher.discovery`:
  OpenID Connect Discovery, then RFC 8414) for the token endpoint, the JWKS and
  the methods the server supports; ``token_url`` wins when both are set.
* **Client authentication** (``client_auth``): ``client_secret_basic`` (RFC 6749
  §2.3.1, id and secret form-encoded inside HTTP Basic), ``client_secret_post``
  (§2.3.1, the default; ``body`` and ``basic`` are accepted as the old names),
  ``client_secret_jwt`` and ``private_key_jwt`` (RFC 7523 §2.2, OIDC Core §9: an
  assertion `refresher.assertions` signs for each request), ``tls_client_auth``
  (RFC 8705 §2: a client certificate on the connection, re-read when it changes)
  and ``none`` (a public client: only ``client_id``).
* **Grants** (``grant``): ``client_credentials`` (RFC 6749 §4.4), ``refresh_token``
  (§6; a rotated refresh token is saved in ``state_dir`` before the access token is
  returned, `refresher.state`), ``jwt_bearer`` (RFC 7523 §2.1; the assertion is
  read from ``assertion_file`` at every use, or signed with ``private_key_file``)
  and ``token_exchange`` (RFC 8693; the subject token read from
  ``subject_token_file`` at every use). ``scopes``, ``resource`` (RFC 8707, may
  repeat) and ``audience`` (the request parameter Auth0 and RFC 8693 define) go
  into every request.
* **Verification** (``verify``): a JWT access token (RFC 9068) is checked with
  `refresher.jwtverify` (signature against the JWKS, allowed algorithms, ``iss``,
  ``aud``, ``exp``/``nbf``) before any sink sees it; one that fails is never written.
* **Failures**: ``invalid_client`` and ``invalid_grant`` are credential problems
  (no quick retry); a refresh token refused with ``invalid_grant`` is not sent again
  until ``refresh_token_file`` holds a new one.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args
from urllib.parse import quote_plus

import anyio
import httpx2
import structlog
from pydantic import (
    BeforeValidator,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from refresher.assertions import (
    HMAC_ALGORITHMS,
    RESERVED_CLAIMS,
    CertificateFile,
    PrivateKeyFile,
    algorithm_problem,
    default_algorithm,
    load_private_key,
    sign_assertion,
)
from refresher.clock import Clock
from refresher.discovery import Discovery, ServerMetadata
from refresher.errors import (
    BadResponseError,
    ConfigError,
    ForbiddenError,
    ProviderError,
    RateLimitedError,
    SecretUnusableError,
    UnauthorizedError,
)
from refresher.fields import (
    ClientSecretFields,
    HTTPProviderConfig,
    Model,
    SecretSource,
    checking_files,
    existing_file,
    http_url,
    optional_http_url,
    peek_secret,
    require_needs_scopes,
    scope_tokens,
    secret_fields,
    secret_problem,
    secret_source,
)
from refresher.jwtverify import ASYMMETRIC_ALGORITHMS, LEEWAY, JWKSCache, JWTVerifier
from refresher.kube import KubeClients
from refresher.logging import remember_secret
from refresher.providers.base import ClientCertificate, HTTPClients, HTTPProvider
from refresher.state import (
    RefreshTokenState,
    SecretLocation,
    SecretRefreshTokenState,
    StateStore,
    StoredRefreshToken,
    seed_digest,
)
from refresher.token import Token, jwt_claims, rfc3339

log = structlog.get_logger("refresher.providers.oauth2")

ClientAuth = Literal[
    "client_secret_basic",
    "client_secret_post",
    "client_secret_jwt",
    "private_key_jwt",
    "tls_client_auth",
    "none",
]
#: The names ``client_auth`` had before the generic provider: still accepted.
CLIENT_AUTH_ALIASES = {"basic": "client_secret_basic", "body": "client_secret_post"}
_SECRET_AUTH = ("client_secret_basic", "client_secret_post", "client_secret_jwt")

Grant = Literal["client_credentials", "refresh_token", "jwt_bearer", "token_exchange"]
#: The ``grant_type`` each grant sends.
GRANT_TYPES = {
    "client_credentials": "client_credentials",
    "refresh_token": "refresh_token",
    "jwt_bearer": "urn:ietf:params:oauth:grant-type:jwt-bearer",
    "token_exchange": "urn:ietf:params:oauth:grant-type:token-exchange",
}
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: RFC 8693 §3: what a projected ServiceAccount token or any other JWT is.
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
#: RFC 7518 §3.2: an HMAC key at least as long as the hash.
_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s#]+$")


def _client_auth(value: object) -> object:
    return CLIENT_AUTH_ALIASES.get(value, value) if isinstance(value, str) else value


def _uri(value: str) -> str:
    if not _URI.fullmatch(value):
        raise ValueError(f"{value!r} is not an absolute URI without a fragment")
    return value


class VerifyConfig(Model):
    """Check JWT access tokens (RFC 9068) before any sink sees them."""

    #: The ``aud`` the token must carry: the API it is meant for.
    audience: str = Field(min_length=1)
    #: The ``iss`` it must carry; default: the provider's ``issuer``.
    issuer: str | None = None
    #: Where the signing keys are; default: the discovered ``jwks_uri``.
    jwks_url: str | None = None
    #: Allowed signature algorithms: asymmetric ones only (never ``none`` or HMAC).
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"], min_length=1)

    _jwks_http = field_validator("jwks_url")(optional_http_url)

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, value: list[str]) -> list[str]:
        allowed = ", ".join(sorted(ASYMMETRIC_ALGORITHMS))
        for alg in value:
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(
                    f"{alg!r} not allowed: only asymmetric algorithms ({allowed}), "
                    "never none or HMAC"
                )
        if len(set(value)) != len(value):
            raise ValueError("an algorithm is listed twice")
        return value


class StateSecretConfig(Model):
    """Kubernetes: keep rotated refresh tokens in this Secret (a new leader reads it)."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)
    #: Default: the pod's namespace (in-cluster) or the kubeconfig context's.
    namespace: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63
    )
    kubeconfig: Path | None = None  # default: in-cluster service account
    context: str | None = None

    _check_kubeconfig = field_validator("kubeconfig")(existing_file)


class OAuth2ProviderConfig(HTTPProviderConfig, ClientSecretFields):
    """Any OAuth 2.0 / OpenID Connect authorization server (see the module docstring)."""

    kind: Literal["oauth2"]
    #: Discovery: OpenID Connect, then RFC 8414. Exactly as the server names itself.
    issuer: str | None = None
    #: The token endpoint; wins over the discovered one.
    token_url: str | None = None
    client_id: str | None = Field(default=None, min_length=1)
    client_auth: Annotated[
        ClientAuth,
        BeforeValidator(_client_auth),
        WithJsonSchema(
            {"enum": [*get_args(ClientAuth), *CLIENT_AUTH_ALIASES], "type": "string"}
        ),
    ] = "client_secret_post"
    #: ``private_key_jwt`` and self-signed ``jwt_bearer``: RSA, EC or Ed25519, PEM.
    private_key_file: Path | None = None
    #: The assertion's algorithm; default: the key's (RS256, ES256/384/512, EdDSA),
    #: HS256 for ``client_secret_jwt``.
    signing_alg: str | None = None
    #: ``kid`` header of signed assertions.
    key_id: str | None = Field(default=None, min_length=1)
    #: The certificate of ``private_key_file``: its thumbprints become the assertion's
    #: ``x5t`` and ``x5t#S256`` headers (Entra ID certificate credentials).
    certificate_file: Path | None = None
    #: ``aud`` of signed assertions: the token endpoint URL, or the issuer identifier.
    assertion_audience: Literal["token_endpoint", "issuer"] = "token_endpoint"
    #: ``tls_client_auth`` (RFC 8705): presented on every token request, re-read on change.
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None
    grant: Grant = "client_credentials"
    #: ``refresh_token``: the refresh token to start from (and to start over from).
    refresh_token_file: Path | None = None
    #: ``refresh_token``: where a rotated refresh token is kept across restarts.
    state_dir: Path | None = None
    #: ``refresh_token`` on Kubernetes: the same, in a Secret (instead of state_dir).
    state_secret: StateSecretConfig | None = None
    #: ``jwt_bearer``: the assertion, read at every use (a projected ServiceAccount token).
    assertion_file: Path | None = None
    #: ``jwt_bearer`` signed with ``private_key_file``: claims besides iss, aud, iat,
    #: nbf, exp and jti (e.g. Google's ``scope``, or ``sub``).
    assertion_claims: dict[str, str | int | list[str]] = Field(default_factory=dict)
    #: ``token_exchange``: the subject token, read at every use.
    subject_token_file: Path | None = None
    subject_token_type: str = JWT_TOKEN_TYPE
    requested_token_type: str | None = None
    scopes: list[str] = Field(default_factory=list)
    #: RFC 8707 resource indicators, one ``resource`` parameter each.
    resource: list[str] = Field(default_factory=list)
    #: The ``audience`` request parameter (Auth0, RFC 8693); not what ``verify`` checks.
    audience: str | None = None
    body: Literal["form", "json"] = "form"
    headers: dict[str, str] = Field(default_factory=dict)
    #: A grant lacking a requested scope fails (reason ``scope_missing``) instead of a warning.
    require_scopes: bool = False
    verify: VerifyConfig | None = None

    _files = field_validator(
        "private_key_file",
        "certificate_file",
        "tls_client_cert_file",
        "tls_client_key_file",
        "refresh_token_file",
        "assertion_file",
        "subject_token_file",
    )(existing_file)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str | None) -> str | None:
        if value is None:
            return None
        http_url(value)
        if "?" in value or "#" in value:
            raise ValueError("an issuer has no query or fragment (OpenID Connect Discovery §2)")
        return value  # as the server names itself: a trailing "/" is part of it

    _token_url = field_validator("token_url")(optional_http_url)

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, scopes: list[str]) -> list[str]:
        return scope_tokens(scopes)

    @field_validator("resource")
    @classmethod
    def _resources(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("a resource is listed twice")
        return [_uri(value) for value in values]

    @field_validator("subject_token_type", "requested_token_type")
    @classmethod
    def _token_type(cls, value: str | None) -> str | None:
        return None if value is None else _uri(value)

    @field_validator("private_key_file")
    @classmethod
    def _private_key(cls, value: Path | None) -> Path | None:
        if value is not None and checking_files.get():
            load_private_key(value.read_bytes()[: 1 << 20])
        return value

    @field_validator("certificate_file", "tls_client_cert_file", "tls_client_key_file")
    @classmethod
    def _pem(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None or not checking_files.get():
            return value
        key = info.field_name == "tls_client_key_file"
        marker = b"PRIVATE KEY-----" if key else b"-----BEGIN CERTIFICATE-----"
        if marker not in value.read_bytes()[: 1 << 20]:
            raise ValueError("not a PEM private key" if key else "not a PEM certificate")
        return value

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, value: Path | None) -> Path | None:
        if value is None or not checking_files.get():
            return value
        if not value.is_dir():
            raise ValueError("not an existing directory")
        if not os.access(value, os.W_OK | os.X_OK):
            raise ValueError("not writable")
        return value

    @field_validator("assertion_claims")
    @classmethod
    def _claims(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(RESERVED_CLAIMS.intersection(value))
        if reserved:
            raise ValueError(f"{', '.join(reserved)}: set by refresher, not here")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> OAuth2ProviderConfig:
        if self.issuer is None and self.token_url is None:
            raise ValueError("set issuer (discovery) or token_url")
        self._client_authentication()
        self._grant()
        self._signing()
        if self.verify is not None and self.issuer is None:
            if self.verify.issuer is None:
                raise ValueError("verify.issuer is required without issuer discovery")
            if self.verify.jwks_url is None:
                raise ValueError("verify.jwks_url is required without issuer discovery")
        require_needs_scopes(self.require_scopes, self.scopes, "scopes")
        return self

    def _client_authentication(self) -> None:
        method = self.client_auth
        if method in _SECRET_AUTH:
            secret_fields(self, "client_secret", required=True)
        elif secret_source(self, "client_secret") is not None:
            raise ValueError(f"client_secret is not used with client_auth {method}")
        if method == "private_key_jwt" and self.private_key_file is None:
            raise ValueError("client_auth private_key_jwt needs private_key_file")
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            raise ValueError("set both tls_client_cert_file and tls_client_key_file")
        if method == "tls_client_auth" and self.tls_client_cert_file is None:
            raise ValueError(
                "client_auth tls_client_auth needs tls_client_cert_file and tls_client_key_file"
            )
        if method == "none" and self.grant == "client_credentials":
            raise ValueError(
                "grant client_credentials needs client authentication (RFC 6749 §4.4), "
                "not client_auth none"
            )
        anonymous_grant = self.grant in ("jwt_bearer", "token_exchange")
        if self.client_id is None and not (method == "none" and anonymous_grant):
            raise ValueError(f"client_id is required with client_auth {method}")

    def _grant(self) -> None:
        only = {
            "refresh_token_file": ("refresh_token", self.refresh_token_file),
            "state_dir": ("refresh_token", self.state_dir),
            "state_secret": ("refresh_token", self.state_secret),
            "assertion_file": ("jwt_bearer", self.assertion_file),
            "assertion_claims": ("jwt_bearer", self.assertion_claims or None),
            "subject_token_file": ("token_exchange", self.subject_token_file),
            "requested_token_type": ("token_exchange", self.requested_token_type),
        }
        for name, (needs, value) in only.items():
            if value is not None and self.grant != needs:
                raise ValueError(f"{name} is only used with grant {needs}")
        check = {
            "refresh_token": self._refresh_grant,
            "jwt_bearer": self._bearer_grant,
            "token_exchange": self._exchange_grant,
        }.get(self.grant)
        if check is not None:
            check()

    def _refresh_grant(self) -> None:
        if self.refresh_token_file is None:
            raise ValueError("grant refresh_token needs refresh_token_file")
        if (self.state_dir is None) == (self.state_secret is None):
            raise ValueError(
                "grant refresh_token needs state_dir or (on Kubernetes) state_secret, "
                "one of them: a rotated refresh token must survive a restart (systemd "
                "StateDirectory=, not the runtime directory)"
            )

    def _bearer_grant(self) -> None:
        if (self.assertion_file is None) == (self.private_key_file is None):
            raise ValueError(
                "grant jwt_bearer needs assertion_file, or private_key_file to sign "
                "the assertion (one of them)"
            )
        if self.assertion_file is not None and self.assertion_claims:
            raise ValueError("assertion_claims is only used to sign the assertion")
        if self.private_key_file is not None and self.client_id is None:
            raise ValueError("client_id (the assertion's iss) is required to sign it")

    def _exchange_grant(self) -> None:
        if self.subject_token_file is None:
            raise ValueError("grant token_exchange needs subject_token_file")

    def signs_with_key(self) -> bool:
        return self.client_auth == "private_key_jwt" or (
            self.grant == "jwt_bearer" and self.private_key_file is not None
        )

    def signs(self) -> bool:
        return self.client_auth == "client_secret_jwt" or self.signs_with_key()

    def _signing(self) -> None:
        if self.private_key_file is not None and not self.signs_with_key():
            raise ValueError(
                "private_key_file is only used with client_auth private_key_jwt or to sign "
                "a jwt_bearer assertion"
            )
        if not self.signs():
            for name in ("signing_alg", "key_id", "certificate_file"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is only used with signed assertions")
            if self.assertion_audience != "token_endpoint":
                raise ValueError("assertion_audience is only used with signed assertions")
        if self.assertion_audience == "issuer" and self.issuer is None:
            raise ValueError("assertion_audience issuer needs issuer")
        if self.certificate_file is not None and self.private_key_file is None:
            raise ValueError("certificate_file names the certificate of private_key_file")
        if self.client_auth == "client_secret_jwt":
            self._hmac_signing()
        elif self.signing_alg is not None:
            self._key_signing(self.signing_alg)

    def _hmac_signing(self) -> None:
        if self.signs_with_key():
            raise ValueError(
                "client_secret_jwt and a key-signed jwt_bearer assertion cannot share "
                "signing_alg: use client_auth private_key_jwt"
            )
        alg = self.signing_alg or "HS256"
        if alg not in HMAC_ALGORITHMS:
            raise ValueError(f"signing_alg {alg!r}: client_secret_jwt signs with HS256/384/512")
        secret = peek_secret(self, "client_secret")
        if secret is not None and len(secret.encode()) < _HMAC_KEY_BYTES[alg]:
            raise ValueError(
                f"client_secret: {len(secret.encode())} bytes is too short for {alg} "
                f"(RFC 7518 §3.2: at least {_HMAC_KEY_BYTES[alg]})"
            )

    def _key_signing(self, alg: str) -> None:
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise ValueError(f"signing_alg {alg!r}: a private key signs with an asymmetric one")
        if self.private_key_file is not None and checking_files.get():
            key = load_private_key(self.private_key_file.read_bytes())
            problem = algorithm_problem(key, alg)
            if problem is not None:
                raise ValueError(f"signing_alg {alg!r}: {problem}")


class OAuth2Provider(HTTPProvider[OAuth2ProviderConfig]):
    """Any OAuth 2.0 authorization server (see the module docstring)."""

    kind = "oauth2"

    def __init__(self, config: OAuth2ProviderConfig, *, clients: HTTPClients, clock: Clock) -> None:
        anchor = config.token_url or config.issuer
        assert anchor is not None
        super().__init__(
            config,
            base_url=_origin(anchor),
            clients=clients,
            clock=clock,
            secrets={
                "client_secret": secret_source(config, "client_secret"),
                "refresh_token": _file_secret("refresh_token", config.refresh_token_file),
                "assertion": _file_secret("assertion", config.assertion_file),
                "subject_token": _file_secret("subject_token", config.subject_token_file),
            },
            rate_limit_key=config.client_id
            or str(config.assertion_file or config.subject_token_file),
        )
        self.clients = clients
        self.job = "oauth2"
        self.discovery = (
            Discovery(config.issuer, self._get_metadata, clock=clock) if config.issuer else None
        )
        self.private_key = _optional(PrivateKeyFile, config.private_key_file)
        self.certificate = _optional(CertificateFile, config.certificate_file)
        self._kube: KubeClients | None = None
        self.state: StateStore | None = None
        self._build_state()
        self._redeeming = anyio.Lock()
        #: The refresh token last read or saved (for the redactor).
        self._refresh_token: str | None = None
        #: A rotated refresh token not saved yet (the save failed): used next time.
        self._pending: StoredRefreshToken | None = None
        #: The digest of a refresh token refused with ``invalid_grant``: never sent again.
        self._refused: str | None = None
        self._certificate: ClientCertificate | None = None
        self._checked: ServerMetadata | None = None
        self.jwks: JWKSCache | None = None
        self.verifier: JWTVerifier | None = None
        verify = config.verify
        if verify is not None:
            self.jwks = JWKSCache(self._fetch_jwks, clock=clock)
            self.verifier = JWTVerifier(
                what="access token",
                clock=clock,
                keys=self.jwks,
                audience=verify.audience,
                issuer=verify.issuer or config.issuer,
                algorithms=verify.algorithms,
            )

    def _build_state(self) -> None:
        cfg = self.config
        if cfg.state_dir is not None:
            self.state = RefreshTokenState(cfg.state_dir, self.job)
        elif cfg.state_secret is not None:
            if self._kube is None:
                self._kube = KubeClients(clock=self.clock)
                self.clients.close_with(self._kube.aclose)
            secret = cfg.state_secret
            location = SecretLocation(
                secret.name, secret.namespace, secret.kubeconfig, secret.context
            )
            self.state = SecretRefreshTokenState(self._kube, location, self.job)

    def starting(self, job: str) -> None:
        self.job = job
        self._build_state()
        state_dir = self.config.state_dir
        if state_dir is None:
            return
        from refresher.sinks.file import memory_backed

        if memory_backed(str(state_dir)):
            log.warning(
                "state_dir is on a memory file system: a reboot loses the rotated refresh "
                "token (use systemd StateDirectory=, /var/lib/...)",
                job=job,
                state_dir=str(state_dir),
            )

    # ------------------------------------------------------------------ files and secrets

    def secrets(self) -> list[str]:
        values = super().secrets()
        for path in (self.config.private_key_file, self.config.tls_client_key_file):
            if path is not None:
                values.extend(_pem_forms(path))
        if self._refresh_token is not None:
            values.append(self._refresh_token)
        return values

    def secret_files(self) -> list[Path]:
        """A new client secret, key or refresh token re-mints at once; assertion and
        subject token files are rotated by their issuer and read at every use."""
        cfg = self.config
        rotating = {cfg.assertion_file, cfg.subject_token_file}
        files = [path for path in super().secret_files() if path not in rotating]
        files += [p for p in (cfg.private_key_file, cfg.tls_client_key_file) if p is not None]
        return files

    def watched_files(self) -> list[Path]:
        cfg = self.config
        candidates = (
            cfg.certificate_file,
            cfg.tls_client_cert_file,
            cfg.assertion_file,
            cfg.subject_token_file,
        )
        return [path for path in candidates if path is not None]

    # ------------------------------------------------------------------ discovery

    async def _get_metadata(self, url: str) -> dict[str, Any]:
        return await self.get_json(url, "discovery request")

    async def discover(self) -> ServerMetadata:
        """Fetch the issuer's metadata now (``refresher check --online``)."""
        if self.discovery is None:
            raise ConfigError(["issuer: not set, nothing to discover"])
        return await self.discovery.discover()

    async def _metadata(self) -> ServerMetadata | None:
        if self.discovery is None:
            return None
        metadata = await self.discovery.metadata()
        if metadata is not self._checked:
            self._checked = metadata
            for problem in unsupported(metadata, self.config):
                log.warning("discovery: " + problem, job=self.job, url=metadata.url)
        return metadata

    async def _fetch_jwks(self) -> dict[str, Any]:
        url = self.config.verify.jwks_url if self.config.verify else None
        if url is None:
            metadata = await self._metadata()
            url = metadata.jwks_uri if metadata else None
            if url is None:
                where = metadata.url if metadata else "discovery"
                raise BadResponseError(f"discovery {where}: no 'jwks_uri': set verify.jwks_url")
        return await self.get_json(url, "JWKS request")

    async def _token_endpoint(self) -> str:
        cfg = self.config
        if cfg.token_url is not None:
            return cfg.token_url
        metadata = await self._metadata()
        assert metadata is not None
        if cfg.tls_client_cert_file is not None and metadata.mtls_token_endpoint:
            return metadata.mtls_token_endpoint
        return metadata.token_endpoint

    # ------------------------------------------------------------------ the request

    async def fetch(self, tenant: str | None) -> Token:
        cfg = self.config
        started = self.clock.now()
        try:
            await self._use_certificate()
            endpoint = await self._token_endpoint()
            if cfg.grant == "refresh_token":
                async with self._redeeming:
                    return await self._redeem(endpoint, started)
            fields = self._grant_fields(endpoint)
            body = await self._request(endpoint, fields)
        except ProviderError as exc:
            if self.discovery is not None and not isinstance(exc, RateLimitedError):
                self.discovery.invalidate()
            raise
        rotated = body.get("refresh_token")
        if isinstance(rotated, str) and rotated:
            remember_secret(rotated, slot=f"{self.job}:refresh_token")
        return await self._token(body, started)

    def _grant_fields(self, endpoint: str) -> dict[str, str | list[str]]:
        cfg = self.config
        fields: dict[str, str | list[str]] = {"grant_type": GRANT_TYPES[cfg.grant]}
        if cfg.grant == "jwt_bearer":
            signed = cfg.assertion_file is None
            fields["assertion"] = (
                self._bearer_assertion(endpoint) if signed else self._read_token("assertion")
            )
        elif cfg.grant == "token_exchange":
            fields["subject_token"] = self._read_token("subject_token")
            fields["subject_token_type"] = cfg.subject_token_type
            if cfg.requested_token_type:
                fields["requested_token_type"] = cfg.requested_token_type
        return fields

    async def _request(
        self, endpoint: str, fields: dict[str, str | list[str]]
    ) -> dict[str, Any]:
        cfg = self.config
        if cfg.scopes:
            fields["scope"] = " ".join(cfg.scopes)
        if cfg.resource:
            fields["resource"] = list(cfg.resource)
        if cfg.audience:
            fields["audience"] = cfg.audience
        auth = self._authenticate(fields, endpoint)
        try:
            if cfg.body == "json":
                resource = fields.get("resource")
                if isinstance(resource, list) and len(resource) == 1:
                    fields["resource"] = resource[0]
                return await self.post(
                    endpoint, "token request", headers=cfg.headers, json_body=fields, auth=auth
                )
            return await self.post(
                endpoint, "token request", headers=cfg.headers, data=fields, auth=auth
            )
        except ProviderError as exc:
            raise self._rejection(exc) from None

    async def _token(self, body: Mapping[str, Any], started: float) -> Token:
        cfg = self.config
        token = self.token_from(body, obtained_at=started)
        if cfg.grant == "token_exchange":
            issued = body.get("issued_token_type")
            if not isinstance(issued, str) or not issued:
                raise BadResponseError("token exchange response has no 'issued_token_type'")
            wanted = cfg.requested_token_type
            if wanted is not None and issued != wanted:
                raise BadResponseError(
                    f"token exchange issued {issued[:100]!r}, not the requested {wanted!r}"
                )
        if self.verifier is not None:
            await self.verifier.verify(token.value)
        return self.scoped(token, cfg.scopes, require=cfg.require_scopes)

    def _authenticate(
        self, fields: dict[str, str | list[str]], endpoint: str
    ) -> tuple[str, str] | None:
        """Add the client's credentials to `fields`, or return the HTTP Basic pair."""
        cfg = self.config
        method = cfg.client_auth
        if method == "client_secret_basic":
            assert cfg.client_id is not None
            # RFC 6749 §2.3.1: both form-encoded before Basic encodes them.
            return quote_plus(cfg.client_id), quote_plus(self.secret("client_secret"))
        # A public client names itself to redeem its refresh token (RFC 6749 §3.2.1);
        # an assertion or subject token names its subject already.
        if cfg.client_id is not None and (method != "none" or cfg.grant == "refresh_token"):
            fields["client_id"] = cfg.client_id
        if method == "client_secret_post":
            fields["client_secret"] = self.secret("client_secret")
        elif method in ("client_secret_jwt", "private_key_jwt"):
            fields["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            fields["client_assertion"] = self._client_assertion(endpoint)
        return None

    # ------------------------------------------------------------------ assertions

    def _assertion_audience(self, endpoint: str) -> str:
        if self.config.assertion_audience == "issuer":
            assert self.config.issuer is not None
            return self.config.issuer
        return endpoint

    def _signing_key(self) -> tuple[Any, str, dict[str, str]]:
        """The private key, its algorithm and the header naming it."""
        cfg = self.config
        assert self.private_key is not None
        key = self.private_key.load()
        alg = cfg.signing_alg or default_algorithm(key)
        problem = algorithm_problem(key, alg)
        if problem is not None:
            raise SecretUnusableError(f"private_key_file {cfg.private_key_file}: {problem}")
        pem = self.private_key.pem
        if pem is not None:
            remember_secret(pem.decode(errors="replace"), slot=f"{self.job}:private_key")
        headers = {"kid": cfg.key_id} if cfg.key_id else {}
        if self.certificate is not None:
            headers.update(self.certificate.thumbprints())
        return key, alg, headers

    def _client_assertion(self, endpoint: str) -> str:
        cfg = self.config
        assert cfg.client_id is not None
        if cfg.client_auth == "client_secret_jwt":
            secret = self.secret("client_secret")
            alg = cfg.signing_alg or "HS256"
            if len(secret.encode()) < _HMAC_KEY_BYTES[alg]:
                raise SecretUnusableError(
                    f"client_secret is too short for {alg} (RFC 7518 §3.2: at least "
                    f"{_HMAC_KEY_BYTES[alg]} bytes)"
                )
            key: Any = secret.encode()
            headers = {"kid": cfg.key_id} if cfg.key_id else {}
        else:
            key, alg, headers = self._signing_key()
        assertion = sign_assertion(
            issuer=cfg.client_id,
            subject=cfg.client_id,
            audience=self._assertion_audience(endpoint),
            now=self.clock.now(),
            key=key,
            algorithm=alg,
            headers=headers,
        )
        remember_secret(assertion, slot=f"{self.job}:client_assertion")
        return assertion

    def _bearer_assertion(self, endpoint: str) -> str:
        cfg = self.config
        assert cfg.client_id is not None
        key, alg, headers = self._signing_key()
        assertion = sign_assertion(
            issuer=cfg.client_id,
            audience=self._assertion_audience(endpoint),
            now=self.clock.now(),
            key=key,
            algorithm=alg,
            claims=cfg.assertion_claims,
            headers=headers,
        )
        remember_secret(assertion, slot=f"{self.job}:assertion")
        return assertion

    def _read_token(self, name: str) -> str:
        """The assertion or subject token as its file holds it now; an expired JWT is
        refused here (its issuer stopped rotating it) instead of at the server."""
        value = self.secret(name)
        remember_secret(value, slot=f"{self.job}:{name}")
        claims = jwt_claims(value)
        exp = claims.get("exp") if claims else None
        if isinstance(exp, (int, float)) and exp <= self.clock.now() - LEEWAY:
            raise SecretUnusableError(
                f"{name}_file {getattr(self.config, name + '_file')}: the JWT it holds expired "
                f"at {rfc3339(float(exp))}: is it still being rotated?"
            )
        return value

    # ------------------------------------------------------------------ mTLS

    async def _use_certificate(self) -> None:
        """Present the client certificate as its files hold it now (RFC 8705 §2)."""
        cfg = self.config
        if cfg.tls_client_cert_file is None or cfg.tls_client_key_file is None:
            return
        try:
            cert = cfg.tls_client_cert_file.read_bytes()
            key = cfg.tls_client_key_file.read_bytes()
        except OSError as exc:
            raise SecretUnusableError(
                f"tls_client_cert_file / tls_client_key_file: cannot read ({exc.strerror or exc})"
            ) from None
        digest = hashlib.sha256(cert + b"\0" + key).hexdigest()
        if self._certificate is not None and self._certificate.digest == digest:
            return
        remember_secret(key.decode(errors="replace"), slot=f"{self.job}:tls_client_key")
        certificate = ClientCertificate(
            cfg.tls_client_cert_file, cfg.tls_client_key_file, digest, owner=f"{id(self):x}"
        )
        client = self.clients.get(
            self.base_url,
            ca_file=cfg.ca_file,
            timeout=cfg.timeout,
            client_cert=certificate,
            http2=cfg.http2,
        )
        previous, self.client = (self.client if self._certificate else None), client
        self._urls.clear()
        if previous is not None:
            log.info("client certificate changed: presenting the new one", job=self.job)
            await self.clients.retire(previous)
        self._certificate = certificate

    # ------------------------------------------------------------------ refresh tokens

    async def _current_refresh_token(self) -> tuple[str, str]:
        """The refresh token to redeem now, and the digest of the one it descends from."""
        seed = self.secret("refresh_token")
        digest = seed_digest(seed)
        assert self.state is not None
        pending = self._pending
        if pending is not None and pending.seed == digest:
            return pending.value, digest
        stored = await self.state.load()
        if stored is not None and stored.seed == digest:
            self._refresh_token = stored.value
            remember_secret(stored.value, slot=f"{self.job}:refresh_token")
            return stored.value, digest
        return seed, digest

    async def _redeem(self, endpoint: str, started: float) -> Token:
        current, seed = await self._current_refresh_token()
        if self._refused == seed_digest(current):
            raise SecretUnusableError(
                "the refresh token was refused (invalid_grant) and is not sent again: put a "
                f"new one in refresh_token_file {self.config.refresh_token_file}"
            )
        fields: dict[str, str | list[str]] = {
            "grant_type": GRANT_TYPES["refresh_token"],
            "refresh_token": current,
        }
        try:
            body = await self._request(endpoint, fields)
        except UnauthorizedError as exc:
            if exc.problem is not None and exc.problem.title == "invalid_grant":
                self._refused = seed_digest(current)
            raise
        rotated = body.get("refresh_token")
        if rotated is not None and rotated != current:
            await self._keep(rotated, seed)
        return await self._token(body, started)

    async def _keep(self, rotated: object, seed: str) -> None:
        """Save a rotated refresh token before anything is published with it."""
        if not isinstance(rotated, str) or not rotated or secret_problem(rotated):
            raise BadResponseError("response has no usable 'refresh_token'")
        remember_secret(rotated, slot=f"{self.job}:refresh_token")
        self._pending = StoredRefreshToken(rotated, seed)
        self._refresh_token = rotated
        assert self.state is not None
        await self.state.save(rotated, seed=seed, now=self.clock.now())
        self._pending = None
        log.info("refresh token rotated and saved", job=self.job, where=self.state.where)

    # ------------------------------------------------------------------ errors

    def _rejection(self, exc: ProviderError) -> ProviderError:
        """RFC 6749 §5.2 error codes that mean more than their HTTP status."""
        code = exc.problem.title if exc.problem is not None else None
        if exc.status not in (400, 401) or code is None:
            return exc
        status = exc.status
        if code == "invalid_client":
            return UnauthorizedError(
                f"token request: HTTP {status}: client authentication failed "
                f"(client_auth {self.config.client_auth})",
                status=status,
                problem=exc.problem,
            )
        if code == "invalid_grant":
            what = {
                "refresh_token": "the refresh token was refused: put a new one in "
                "refresh_token_file",
                "jwt_bearer": "the assertion was refused",
                "token_exchange": "the subject token was refused",
                "client_credentials": "the grant was refused",
            }[self.config.grant]
            return UnauthorizedError(
                f"token request: HTTP {status}: {what}", status=status, problem=exc.problem
            )
        if code in ("unauthorized_client", "invalid_scope", "invalid_target"):
            return ForbiddenError(
                f"token request: HTTP {status}: {code}", status=status, problem=exc.problem
            )
        return exc


def unsupported(metadata: ServerMetadata, config: OAuth2ProviderConfig) -> list[str]:
    """What the server's metadata says it does not support of `config`."""
    problems = []
    if metadata.supports_auth(config.client_auth) is False:
        listed = ", ".join(metadata.auth_methods or ())
        problems.append(
            f"client_auth {config.client_auth} is not in the server's "
            f"token_endpoint_auth_methods_supported ({listed})"
        )
    grant_type = GRANT_TYPES[config.grant]
    if metadata.supports_grant(grant_type) is False:
        problems.append(
            f"grant {config.grant} ({grant_type}) is not in the server's grant_types_supported"
        )
    if config.verify is not None and config.verify.jwks_url is None and not metadata.jwks_uri:
        problems.append("verify needs a jwks_uri, which the metadata lacks: set verify.jwks_url")
    return problems


def discovery_report(metadata: ServerMetadata, config: OAuth2ProviderConfig) -> list[str]:
    """What ``refresher check --online`` prints about a discovered issuer."""
    lines = [
        f"discovery {metadata.url}: issuer {metadata.issuer}",
        f"token_endpoint {metadata.token_endpoint}"
        + (" (token_url overrides it)" if config.token_url else ""),
        f"jwks_uri {metadata.jwks_uri or '(none)'}",
    ]
    if metadata.mtls_token_endpoint:
        lines.append(f"mtls token_endpoint {metadata.mtls_token_endpoint}")
    methods = ", ".join(metadata.auth_methods) if metadata.auth_methods is not None else None
    lines.append(f"token_endpoint_auth_methods_supported: {methods or '(not listed)'}")
    grants = ", ".join(metadata.grant_types) if metadata.grant_types is not None else None
    lines.append(f"grant_types_supported: {grants or '(not listed)'}")
    problems = unsupported(metadata, config)
    lines.extend(f"warning: {problem}" for problem in problems)
    if not problems:
        lines.append(f"client_auth {config.client_auth}, grant {config.grant}: supported")
    return lines


_F = TypeVar("_F", PrivateKeyFile, CertificateFile)


def _optional(kind: type[_F], path: Path | None) -> _F | None:
    return kind(path) if path is not None else None


def _file_secret(name: str, path: Path | None) -> SecretSource | None:
    return SecretSource(name=name, file=path) if path is not None else None


def _pem_forms(path: Path) -> list[str]:
    """A PEM key file's text, and its base64 body on one line."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    body = "".join(line for line in text.splitlines() if line and not line.startswith("-----"))
    return [value for value in (text.strip(), body) if value]


def _origin(url: str) -> str:
    parsed = httpx2.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode()}"
