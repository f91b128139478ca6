"""Debitura: ``XApiKey`` header + ``{"externalTenantId"}`` → HS256 JWT.

One token per tenant, 30 minutes, no refresh token: always re-mint. The response
uses camelCase (``accessToken``, ``tokenType``, ``expiresIn``); ``creditorId`` is kept
in the token metadata, and the answer's ``externalTenantId`` must be the tenant asked
for (a token for another tenant is never written: reason ``tenant_mismatch``).

The partner's retry-once-on-401 rule belongs to the *Customer API* call, not to the
mint: a consumer whose call gets 401 reports the token's fingerprint to the daemon,
which mints a fresh one; a report against that fresh token marks the tenant's link
invalid (see `Scheduler.report_rejected`). A 401 from the mint itself means the
``XApiKey`` is rejected: one failure for the whole credential (`refresher.credentials`).
"""

from __future__ import annotations

from refresher.clock import Clock
from refresher.config import DebituraProviderConfig, SecretSource, secret_source
from refresher.errors import ConfigError, TenantMismatchError
from refresher.providers.base import HTTPClients, HTTPProvider
from refresher.token import Token, fingerprint


class DebituraProvider(HTTPProvider):
    kind = "debitura"
    token_path = "/oauth/token"

    def __init__(
        self, config: DebituraProviderConfig, *, clients: HTTPClients, clock: Clock
    ) -> None:
        source = secret_source(config, "api_key")
        assert source is not None
        super().__init__(
            config,
            base_url=config.base_url,
            clients=clients,
            clock=clock,
            secrets={"api_key": source},
            # The partner budgets per API key; jobs sharing a key share the budget.
            rate_limit_key=_key_identity(source),
        )

    async def fetch(self, tenant: str | None) -> Token:
        if tenant is None:
            raise ValueError("Debitura mints per tenant")
        started = self.clock.now()
        body = await self.post(
            self.token_path,
            "Debitura token request",
            headers={"XApiKey": self.secret("api_key")},
            json_body={"externalTenantId": tenant},
        )
        answered = body.get("externalTenantId")
        if answered != tenant:
            raise TenantMismatchError(
                "Debitura answered with a token for another externalTenantId"
                if isinstance(answered, str)
                else "Debitura answer has no externalTenantId"
            )
        extra = {"externalTenantId": tenant}
        if body.get("creditorId") is not None:
            extra["creditorId"] = body["creditorId"]
        return self.token_from(
            body,
            obtained_at=started,
            value="accessToken",
            token_type="tokenType",
            expires_in="expiresIn",
            scope="scope",
            extra=extra,
        )


def _key_identity(source: SecretSource) -> str:
    """The API key's fingerprint (an unreadable key still gets a stable identity)."""
    try:
        return fingerprint(source.read())
    except ConfigError:
        return f"unreadable:{source!r}"
