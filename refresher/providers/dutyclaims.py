"""DutyClaims (docs/contracts.md): managed credentials in production, sandbox OAuth2.

* ``mode: managed`` publishes the production managed credential (``dcp_live_…``)
  as-is: it does not expire, and is re-published when its file changes (rotation).
  Consumers send it as ``Authorization: Bearer …`` or ``X-API-Key: …``; the job's
  ``header`` choice travels in the token metadata and shapes ``format: header`` sinks.
  It is not published blind: a "mint" reads the credential and probes it with the
  documented pair, ``GET /v1/clients`` + ``Authorization: Bearer``, and the token asks
  to be re-checked every ``probe_interval``. 401: the credential is refused (the job
  turns not valid); 403: accepted but this route is refused (a missing scope: still
  published, with a warning); 429: ``Retry-After`` is honoured.
* ``mode: sandbox`` runs the form-encoded client-credentials grant at
  ``POST /v1/oauth/token`` (on api.dutyclaims.com too: the contract's sandbox token
  endpoint); tokens are opaque, so expiry comes from ``expires_in``. Requested
  scopes are compared with the grant's (`refresher.scopes`).
* 401/403/429 arrive as problem responses; `providers.base` parses and classifies
  them and the scheduler never retries them blindly.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import structlog
from pydantic import Field, SecretStr, field_validator, model_validator

from refresher.clock import Clock
from refresher.errors import ConfigError, ForbiddenError
from refresher.fields import (
    ClientSecretFields,
    PartnerProviderConfig,
    PositiveDuration,
    existing_file,
    peek_secret,
    require_needs_scopes,
    scope_tokens,
    secret_fields,
    secret_source,
)
from refresher.providers.base import HTTPClients, HTTPProvider, raise_for_status, request
from refresher.token import Token, fingerprint

log = structlog.get_logger("refresher.providers.dutyclaims")

HEADER_NAMES = {"authorization": "Authorization", "x-api-key": "X-API-Key"}


#: DutyClaims' documented scope vocabulary (its contract's "Current scope vocabulary").
DUTYCLAIMS_SCOPES = frozenset(
    {
        "partner.read",
        "partner.manage",
        "clients.read",
        "clients.write",
        "authority.read",
        "authority.write",
        "revenue.read",
        "webhooks.read",
        "webhooks.write",
        "diligence.read",
        "diligence.submit",
        "financing.request",
        "litigation.enroll",
        "notifications.read",
        "notifications.write",
    }
)
DUTYCLAIMS_LIVE_PREFIX = "dcp_live_"
#: The documented probe of a managed credential (the contract's ``curl …/v1/clients -H
#: "Authorization: Bearer dcp_live_…"``).
DUTYCLAIMS_PROBE_PATH = "/v1/clients"
_PROBE_PATH = re.compile(r"/[\x21-\x7e]{0,500}")


class DutyClaimsProviderConfig(PartnerProviderConfig, ClientSecretFields):
    """DutyClaims: managed credentials in production, OAuth2 client credentials in sandbox."""

    kind: Literal["dutyclaims"]
    mode: Literal["sandbox", "managed"]
    base_url: str = "https://api.dutyclaims.com"
    # sandbox
    client_id: str | None = None
    scopes: list[str] = Field(default_factory=list)
    #: A grant lacking a requested scope fails (reason ``scope_missing``) instead of a warning.
    require_scopes: bool = False
    #: Deprecated, ignored: the contract's sandbox token endpoint *is* on api.dutyclaims.com.
    sandbox_on_production_host: bool | None = Field(
        default=None,
        json_schema_extra={
            "deprecated": True,
            "description": "deprecated and ignored: sandbox OAuth on api.dutyclaims.com is "
            "accepted (it is the contract's sandbox token endpoint)",
        },
    )
    # managed
    credential: SecretStr | None = None
    credential_file: Path | None = None
    credential_env: str | None = None
    header: Literal["authorization", "x-api-key"] = "authorization"
    #: Check the managed credential with an authenticated GET every `probe_interval`.
    probe: bool = True
    probe_interval: PositiveDuration = 900.0
    probe_path: str = DUTYCLAIMS_PROBE_PATH
    #: How the probe sends the credential; the contract documents X-API-Key only for the
    #: routes that say so, so it is set together with `probe_path`.
    probe_header: Literal["authorization", "x-api-key"] = "authorization"

    _check_files = field_validator("credential_file")(existing_file)

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, scopes: list[str]) -> list[str]:
        unknown = [s for s in scopes if s not in DUTYCLAIMS_SCOPES]
        if unknown:
            raise ValueError(
                f"unknown DutyClaims scope(s) {', '.join(map(repr, unknown))}; "
                f"documented: {', '.join(sorted(DUTYCLAIMS_SCOPES))}"
            )
        return scope_tokens(scopes)

    @field_validator("probe_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not _PROBE_PATH.fullmatch(value) or "#" in value or value.startswith("//"):
            raise ValueError(
                "must be a path on base_url starting with '/' (a query is allowed), "
                "printable ASCII without spaces or '#'"
            )
        return value

    @property
    def environment(self) -> str:
        """The contract's two worlds: sandbox OAuth, production managed credentials."""
        return "sandbox" if self.mode == "sandbox" else "production"

    @model_validator(mode="after")
    def _mode_fields(self) -> DutyClaimsProviderConfig:
        probe_fields = {"probe", "probe_interval", "probe_path", "probe_header"}
        if self.mode == "sandbox":
            if self.client_id is None:
                raise ValueError("mode sandbox needs client_id")
            secret_fields(self, "client_secret", required=True)
            if any(
                getattr(self, f) is not None
                for f in ("credential", "credential_file", "credential_env")
            ):
                raise ValueError(
                    "credential* is for mode managed; sandbox uses client_id/client_secret"
                )
            if probe_fields & self.model_fields_set:
                raise ValueError("probe* is for mode managed: a sandbox token has an expiry")
            secret = peek_secret(self, "client_secret") or ""
            if secret.startswith(DUTYCLAIMS_LIVE_PREFIX):
                raise ValueError(
                    "a production managed credential (dcp_live_...) is configured as a sandbox "
                    "client secret; production uses mode: managed (sandbox OAuth is not a "
                    "production flow)"
                )
            require_needs_scopes(self.require_scopes, self.scopes, "scopes")
        else:
            secret_fields(self, "credential", required=True)
            if self.client_id is not None or self.scopes or self.require_scopes:
                raise ValueError(
                    "client_id/scopes/require_scopes are for mode sandbox; managed publishes "
                    "a credential"
                )
            if ("probe_path" in self.model_fields_set) != ("probe_header" in self.model_fields_set):
                raise ValueError(
                    "set probe_path and probe_header together: the contract says which header "
                    "each route takes (Authorization: Bearer for /v1/clients; X-API-Key only "
                    "where a route documents it, e.g. /v1/claims/status)"
                )
        return self


class DutyClaimsProvider(HTTPProvider[DutyClaimsProviderConfig]):
    kind = "dutyclaims"
    token_path = "/v1/oauth/token"

    def __init__(
        self, config: DutyClaimsProviderConfig, *, clients: HTTPClients, clock: Clock
    ) -> None:
        name = "client_secret" if config.mode == "sandbox" else "credential"
        super().__init__(
            config,
            base_url=config.base_url,
            clients=clients,
            clock=clock,
            secrets={name: secret_source(config, name)},
            # Sandbox budgets per client id; a managed credential is its own identity.
            rate_limit_key=config.client_id or _managed_identity(config),
        )
        self.environment = config.environment

    def starting(self, job: str) -> None:
        """What the contract wants said when a DutyClaims job starts."""
        config = self.config
        if config.sandbox_on_production_host is not None:
            log.warning(
                "sandbox_on_production_host is deprecated and ignored: the sandbox token "
                "endpoint is on api.dutyclaims.com; remove the key",
                job=job,
            )
        if config.mode == "sandbox":
            log.info(
                "DutyClaims sandbox job: sandbox OAuth is no proof of production access "
                "(production uses managed credentials)",
                job=job,
                environment="sandbox",
                base_url=config.base_url,
            )

    async def fetch(self, tenant: str | None) -> Token:
        cfg = self.config
        now = self.clock.now()
        if cfg.mode == "managed":
            return await self._managed(now)
        assert cfg.client_id is not None  # validated by the config model
        fields = {
            "grant_type": "client_credentials",
            "client_id": cfg.client_id,
            "client_secret": self.secret("client_secret"),
        }
        if cfg.scopes:
            fields["scope"] = " ".join(cfg.scopes)
        body = await self.post(self.token_path, "DutyClaims sandbox token request", data=fields)
        token = self.token_from(body, obtained_at=now, extra={"mode": "sandbox"})
        return self.scoped(token, cfg.scopes, require=cfg.require_scopes)

    async def _managed(self, now: float) -> Token:
        """Read the managed credential and, unless ``probe: false``, check it at the API."""
        cfg = self.config
        token = Token(
            value=self.secret("credential"),
            token_type="Bearer",
            obtained_at=now,
            expires_at=None,
            extra={"header": HEADER_NAMES[cfg.header], "mode": "managed"},
        )
        if not cfg.probe:
            return token
        warning = await self.probe(token.value)
        return dataclasses.replace(token, recheck_at=now + cfg.probe_interval, warning=warning)

    async def probe(self, credential: str) -> str | None:
        """One authenticated ``GET {probe_path}``: None if the credential is accepted,
        a warning if it is accepted but the route refused (403); raises otherwise."""
        cfg = self.config
        path = cfg.probe_path.split("?", 1)[0]
        if cfg.probe_header == "authorization":
            headers = {"Authorization": f"Bearer {credential}"}
        else:
            headers = {"X-API-Key": credential}
        response = await request(
            self.client, "GET", self.url(cfg.probe_path), clock=self.clock, headers=headers
        )
        try:
            raise_for_status(response, f"DutyClaims managed credential probe GET {path}")
        except ForbiddenError as exc:
            # The credential authenticated; the capability behind this route is missing.
            return (
                f"{exc.summary}: the credential is accepted, the route refused "
                "(a missing scope or capability?)"
            )
        return None


def _managed_identity(config: DutyClaimsProviderConfig) -> str:
    source = secret_source(config, "credential")
    try:
        return fingerprint(source.read()) if source is not None else "managed"
    except ConfigError:
        return "managed"
