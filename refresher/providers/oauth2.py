"""Generic OAuth2 client-credentials provider (RFC 6749 §4.4), form or JSON body."""

from __future__ import annotations

from typing import Literal

import httpx2
from pydantic import Field, field_validator, model_validator

from refresher.clock import Clock
from refresher.fields import (
    ClientSecretFields,
    HTTPProviderConfig,
    http_url,
    require_needs_scopes,
    scope_tokens,
    secret_fields,
    secret_source,
)
from refresher.providers.base import HTTPClients, HTTPProvider
from refresher.token import Token


class OAuth2ProviderConfig(HTTPProviderConfig, ClientSecretFields):
    """Generic OAuth2 client-credentials grant (RFC 6749 §4.4)."""

    kind: Literal["oauth2"]
    token_url: str
    client_id: str
    scopes: list[str] = Field(default_factory=list)
    audience: str | None = None
    body: Literal["form", "json"] = "form"
    client_auth: Literal["body", "basic"] = "body"
    headers: dict[str, str] = Field(default_factory=dict)
    #: A grant lacking a requested scope fails (reason ``scope_missing``) instead of a warning.
    require_scopes: bool = False

    @field_validator("token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_url(value)

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, scopes: list[str]) -> list[str]:
        return scope_tokens(scopes)

    @model_validator(mode="after")
    def _one_secret(self) -> OAuth2ProviderConfig:
        secret_fields(self, "client_secret", required=True)
        require_needs_scopes(self.require_scopes, self.scopes, "scopes")
        return self


class OAuth2Provider(HTTPProvider[OAuth2ProviderConfig]):
    """``grant_type=client_credentials`` against any token URL."""

    kind = "oauth2"

    def __init__(self, config: OAuth2ProviderConfig, *, clients: HTTPClients, clock: Clock) -> None:
        super().__init__(
            config,
            base_url=_origin(config.token_url),
            clients=clients,
            clock=clock,
            secrets={"client_secret": secret_source(config, "client_secret")},
            rate_limit_key=config.client_id,
        )
        self.path = httpx2.URL(config.token_url).raw_path.decode()

    async def fetch(self, tenant: str | None) -> Token:
        cfg = self.config
        fields = {"grant_type": "client_credentials"}
        if cfg.scopes:
            fields["scope"] = " ".join(cfg.scopes)
        if cfg.audience:
            fields["audience"] = cfg.audience
        auth = None
        if cfg.client_auth == "basic":
            auth = (cfg.client_id, self.secret("client_secret"))
        else:
            fields["client_id"] = cfg.client_id
            fields["client_secret"] = self.secret("client_secret")
        started = self.clock.now()
        if cfg.body == "json":
            body = await self.post(
                self.path, "token request", headers=cfg.headers, json_body=fields, auth=auth
            )
        else:
            body = await self.post(
                self.path, "token request", headers=cfg.headers, data=fields, auth=auth
            )
        token = self.token_from(body, obtained_at=started)
        return self.scoped(token, cfg.scopes, require=cfg.require_scopes)


def _origin(url: str) -> str:
    parsed = httpx2.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode()}"
