"""``refresher`` with one deliberate bug, for tests/test_prometheus_e2e.py.

An oauth2 job whose ``audience`` is ``e2e-internal-error`` raises RuntimeError from its
provider: an internal error the scheduler catches at the job's boundary, logs, counts in
``refresher_internal_errors_total`` and retries. Everything else is the real daemon.

    python tests/monitoring/refresher_with_a_bug.py run --config refresher.yaml
"""

from __future__ import annotations

import sys
from typing import Any

from refresher.cli import main
from refresher.providers.oauth2 import OAuth2Provider
from refresher.token import Token

BUG_AUDIENCE = "e2e-internal-error"
_fetch = OAuth2Provider.fetch


async def _fetch_with_a_bug(self: Any, tenant: str | None) -> Token:
    if self.config.audience == BUG_AUDIENCE:
        raise RuntimeError("deliberate bug (tests/monitoring/refresher_with_a_bug.py)")
    return await _fetch(self, tenant)


if __name__ == "__main__":
    OAuth2Provider.fetch = _fetch_with_a_bug  # type: ignore[method-assign]
    sys.exit(main())
