"""DutyClaims (seeds/000): managed credentials in production, sandbox OAuth2.

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

from refresher.clock import Clock
from refresher.config import DutyClaimsProviderConfig, secret_source
from refresher.errors import ConfigError, ForbiddenError
from refresher.providers.base import HTTPClients, HTTPProvider, raise_for_status, request
from refresher.token import Token, fingerprint

HEADER_NAMES = {"authorization": "Authorization", "x-api-key": "X-API-Key"}


class DutyClaimsProvider(HTTPProvider):
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
        self.dutyclaims = config
        self.environment = config.environment

    async def fetch(self, tenant: str | None) -> Token:
        cfg = self.dutyclaims
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
        cfg = self.dutyclaims
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
        cfg = self.dutyclaims
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
