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

import errno
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator

from refresher.clock import Clock
from refresher.errors import ConfigError, TenantMismatchError
from refresher.fields import (
    PartnerProviderConfig,
    SecretSource,
    existing_file,
    secret_fields,
    secret_source,
)
from refresher.providers.base import HTTPClients, HTTPProvider
from refresher.targets import check_tenant, tenant_problem
from refresher.token import Token, fingerprint


class DebituraProviderConfig(PartnerProviderConfig):
    """Debitura: an API key (``XApiKey``) mints one HS256 JWT per ``externalTenantId``."""

    kind: Literal["debitura"]
    base_url: str = "https://referral-api.debitura.com"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    api_key_env: str | None = None
    tenants: list[Annotated[str, AfterValidator(check_tenant)]] = Field(default_factory=list)
    tenants_file: Path | None = None
    max_concurrency: int | None = Field(default=16, gt=0)

    _check_files = field_validator("api_key_file", "tenants_file")(existing_file)

    @field_validator("tenants")
    @classmethod
    def _unique(cls, tenants: list[str]) -> list[str]:
        dupes = sorted(t for t, n in Counter(tenants).items() if n > 1)
        if dupes:
            shown = ", ".join(map(repr, dupes[:10])) + (" ..." if len(dupes) > 10 else "")
            raise ValueError(f"duplicate tenant(s) {shown}")
        return tenants

    @model_validator(mode="after")
    def _sources(self) -> DebituraProviderConfig:
        secret_fields(self, "api_key", required=True)
        if not self.tenants and self.tenants_file is None:
            raise ValueError("one of tenants or tenants_file is required")
        if self.tenants and self.tenants_file is not None:
            raise ValueError("set only one of tenants, tenants_file")
        return self

    def tenant_lines(self) -> TenantLines:
        """Configured tenants; a ``tenants_file`` is read now (see `read_tenants_file`)."""
        if self.tenants_file is None:
            return TenantLines(tenants=list(self.tenants), rejected=[])
        return read_tenants_file(self.tenants_file)


#: A tenants file is a list of ids, not a database: refuse to read more than this.
MAX_TENANTS_FILE_BYTES = 32 << 20


@dataclass(frozen=True)
class TenantLines:
    """The usable tenants of a tenant list, and one message per refused line."""

    tenants: list[str]
    rejected: list[str]


def read_tenants_file(path: Path) -> TenantLines:
    """One tenant per line, ``#`` starts a comment, surrounding blanks ignored,
    duplicates kept once. A bad line (not UTF-8, a control character, too long) is
    skipped and reported; the others stay usable. Raises `OSError` when the file
    cannot be read at all (the caller keeps what it had)."""
    with path.open("rb") as file:
        data = file.read(MAX_TENANTS_FILE_BYTES + 1)
    if len(data) > MAX_TENANTS_FILE_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_TENANTS_FILE_BYTES >> 20} MiB")
    seen: dict[str, None] = {}
    rejected: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.removesuffix(b"\r").decode()
        except UnicodeDecodeError as exc:
            rejected.append(f"{path} line {number}: not valid UTF-8 (byte {exc.start + 1})")
            continue
        tenant = line.split("#", 1)[0].strip(" \t")
        if not tenant:
            continue
        problem = tenant_problem(tenant)
        if problem is not None:
            rejected.append(f"{path} line {number}: tenant {problem}")
            continue
        seen[tenant] = None
    return TenantLines(tenants=list(seen), rejected=rejected)


class DebituraProvider(HTTPProvider[DebituraProviderConfig]):
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
