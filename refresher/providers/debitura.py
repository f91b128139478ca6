"""Debitura (seeds/001): ``XApiKey`` header + ``{"externalTenantId"}`` → HS256 JWT.

One token per tenant, 30 minutes, no refresh token: always re-mint. The response
uses camelCase (``accessToken``, ``tokenType``, ``expiresIn``); ``creditorId`` is kept
in the token metadata. The documented retry-once-on-401 rule: a 401 triggers exactly
one fresh mint; a second 401 means the tenant link is invalid (`InvalidLinkError`),
which the scheduler parks with a long backoff without touching other tenants.
"""

from __future__ import annotations

from refresher.clock import Clock
from refresher.config import DebituraProviderConfig, SecretSource, secret_source
from refresher.errors import ConfigError, InvalidLinkError, UnauthorizedError
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
        try:
            return await self._mint(tenant)
        except UnauthorizedError as first:
            try:
                return await self._mint(tenant)
            except UnauthorizedError as second:
                raise InvalidLinkError(
                    f"Debitura tenant {tenant!r}: 401 twice in a row, the tenant link is invalid",
                    status=second.status,
                    problem=second.problem or first.problem,
                ) from None

    async def _mint(self, tenant: str) -> Token:
        started = self.clock.now()
        body = await self.post(
            self.token_path,
            f"Debitura token request for tenant {tenant!r}",
            headers={"XApiKey": self.secret("api_key")},
            json_body={"externalTenantId": tenant},
        )
        extra = {"externalTenantId": body.get("externalTenantId", tenant)}
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
