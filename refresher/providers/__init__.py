"""Token providers: one module per API, each holding its config section and its
implementation on the shared `providers.base`. A new provider is one module plus one
line in `PROVIDERS`."""

from __future__ import annotations

from typing import Any

from refresher.providers.base import ProviderClass
from refresher.providers.debitura import DebituraProvider, DebituraProviderConfig
from refresher.providers.dutyclaims import DutyClaimsProvider, DutyClaimsProviderConfig
from refresher.providers.gooclaim import GooclaimProvider, GooclaimProviderConfig
from refresher.providers.oauth2 import OAuth2Provider, OAuth2ProviderConfig

#: Config section type → provider implementation.
PROVIDERS: dict[type[Any], ProviderClass] = {
    OAuth2ProviderConfig: OAuth2Provider,
    DutyClaimsProviderConfig: DutyClaimsProvider,
    DebituraProviderConfig: DebituraProvider,
    GooclaimProviderConfig: GooclaimProvider,
}
