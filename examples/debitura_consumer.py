"""A Debitura Customer API client that gets its tokens from refresher.

The partner's recommended pattern (``callCustomerApi``): call with the current
token; on 401 get a fresh one and retry once; a second 401 means the client link is
invalid. Here refresher owns the tokens, so "get a fresh one" is a report to the
daemon — "this token was rejected" — and the daemon decides: it mints a new token
(one mint, however many consumers report the same token), or, if the rejected token
was itself minted in answer to a rejection, marks the tenant's link invalid.

Tokens are read from refresher's ``format: json`` file sink, one file per tenant
(``path: /run/refresher/debitura/{tenant}.json``). Standard library + httpx2 only.

    client = CustomerApi(tokens_dir=Path("/run/refresher/debitura"))
    response = client.call("POST", "/cases", {"debtor": {...}, "claims": [...]}, "acme-001")
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2


class LinkInvalidError(RuntimeError):
    """The partner rejected a freshly minted token too: the client link is invalid."""


def fingerprint(token: str) -> str:
    """What refresher calls a token: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


class CustomerApi:
    def __init__(
        self,
        *,
        tokens_dir: Path,
        customer_api: str = "https://customer-api.debitura.com",
        daemon: str = "http://127.0.0.1:9464",
        job: str = "debitura",
        consumer_token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.tokens_dir = tokens_dir
        self.job = job
        self.api = httpx2.Client(base_url=customer_api, timeout=timeout)
        headers = {"Authorization": f"Bearer {consumer_token}"} if consumer_token else {}
        self.daemon = httpx2.Client(base_url=daemon, timeout=timeout, headers=headers)

    def call(self, method: str, path: str, body: Any, tenant: str) -> httpx2.Response:
        """One Customer API call for `tenant`, retried once after a rejected token."""
        token = self.token(tenant)
        response = self._send(method, path, body, token)
        if response.status_code != 401:
            return response
        token = self.fresh_token(tenant, rejected=token)
        response = self._send(method, path, body, token)
        if response.status_code == 401:
            # The second 401: tell the daemon (it marks the link invalid), then stop.
            self._report(tenant, token)
            raise LinkInvalidError(f"Debitura rejected a fresh token for {tenant!r}")
        return response

    def token(self, tenant: str) -> str:
        """The tenant's current token, as the daemon last wrote it."""
        document = json.loads((self.tokens_dir / f"{tenant}.json").read_text())
        return str(document["value"])

    def fresh_token(self, tenant: str, *, rejected: str, wait: float = 10.0) -> str:
        """Report `rejected` and return the token the daemon has in its place."""
        answer = self._report(tenant, rejected)
        if answer.status_code == 409:
            raise LinkInvalidError(f"the daemon marked {tenant!r}'s link invalid")
        answer.raise_for_status()
        wanted = answer.json()["fingerprint"]
        deadline = time.monotonic() + wait
        while True:  # a file sink is current at once; a mounted Secret lags a little
            token = self.token(tenant)
            if fingerprint(token) == wanted or time.monotonic() > deadline:
                return token
            time.sleep(0.2)

    def _report(self, tenant: str, token: str) -> httpx2.Response:
        return self.daemon.post(
            f"/v1/tokens/{quote(self.job, safe='')}/refresh",
            params={"tenant": tenant, "rejected": fingerprint(token)},
        )

    def _send(self, method: str, path: str, body: Any, token: str) -> httpx2.Response:
        return self.api.request(
            method, path, json=body, headers={"Authorization": f"Bearer {token}"}
        )

    def close(self) -> None:
        self.api.close()
        self.daemon.close()
