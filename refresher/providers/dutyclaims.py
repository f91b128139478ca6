"""DutyClaims (seeds/000): managed credentials in production, sandbox OAuth2.

* ``mode: managed`` publishes the production managed credential (``dcp_live_…``)
  as-is: it does not expire, and is re-published when its file changes (rotation).
  Consumers send it as ``Authorization: Bearer …`` or ``X-API-Key: …``; the job's
  ``header`` choice travels in the token metadata and shapes ``format: header`` sinks.
* ``mode: sandbox`` runs the form-encoded client-credentials grant at
  ``POST /v1/oauth/token``; tokens are opaque, so expiry comes from ``expires_in``.
* 401/403/429 arrive as problem responses; `providers.base` parses and classifies
  them and the scheduler never retries them blindly.
"""

from __future__ import annotations

from refresher.clock import Clock
from refresher.config import DutyClaimsProviderConfig, secret_source
from refresher.errors import ConfigError
from refresher.providers.base import HTTPClients, HTTPProvider
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

    async def fetch(self, tenant: str | None) -> Token:
        cfg = self.dutyclaims
        now = self.clock.now()
        if cfg.mode == "managed":
            return Token(
                value=self.secret("credential"),
                token_type="Bearer",
                obtained_at=now,
                expires_at=None,
                extra={"header": HEADER_NAMES[cfg.header], "mode": "managed"},
            )
        assert cfg.client_id is not None  # validated by the config model
        fields = {
            "grant_type": "client_credentials",
            "client_id": cfg.client_id,
            "client_secret": self.secret("client_secret"),
        }
        if cfg.scopes:
            fields["scope"] = " ".join(cfg.scopes)
        body = await self.post(self.token_path, "DutyClaims sandbox token request", data=fields)
        return self.token_from(body, obtained_at=now, extra={"mode": "sandbox"})


def _managed_identity(config: DutyClaimsProviderConfig) -> str:
    source = secret_source(config, "credential")
    try:
        return fingerprint(source.read()) if source is not None else "managed"
    except ConfigError:
        return "managed"
