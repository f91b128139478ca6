"""The `TokenSink` protocol every sink implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from refresher.token import Token


@runtime_checkable
class TokenSink(Protocol):
    """Publishes one job's token somewhere consumers read it.

    `write` must be atomic: a consumer sees the old token or the new one, never a
    mix, and on failure (raise `SinkError`) the old one stays. `read_back` returns
    what the sink holds now, so a restart re-mints only what is due.
    """

    kind: str
    target: str

    async def write(self, token: Token) -> None: ...

    async def read_back(self) -> Token | None: ...

    async def remove(self) -> None: ...
