"""The `TokenSink` protocol every sink implements, the `Output` a bundle or a
rendered template is kept in, and the `Rewrite` such a shared file announces."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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


@runtime_checkable
class ExpiryAware(Protocol):
    """A sink that shows whether a token is still valid, so it must hear when one
    runs out unreplaced (a bundle's ``expired: omit | mark``)."""

    async def expired(self) -> None: ...


class Output(Protocol):
    """Where a whole file's content goes: a file replaced atomically
    (`refresher.sinks.file.AtomicFile`) or one key of a Secret
    (`refresher.sinks.kubernetes.KubernetesSink`). Failures raise `SinkError` and
    leave the previous content."""

    target: str

    async def put(self, content: bytes) -> None: ...

    async def get(self) -> bytes | None: ...

    async def remove(self) -> None: ...

    def stamp(self) -> object | None:
        """What changes whenever the content does (cheap to get), or None if unknown:
        a bundle reads its output again only when this changed."""


@dataclass(frozen=True)
class Rewrite:
    """A bundle or template output was rewritten: what its notifiers may tell."""

    target: str
    #: (job, provider kind) of every job whose tokens changed in this rewrite.
    jobs: tuple[tuple[str, str], ...]
    #: The token's fingerprint when the output holds one token, else the content's.
    fingerprint: str
    #: The earliest expiry among the tokens the output holds (RFC 3339).
    expires_at: str | None


#: Called after every rewrite (the daemon's notifications).
Announce = Callable[[Rewrite], Awaitable[None]]
