"""The error tree. Every failure refresher reports is one of these::

    RefresherError
    ├── ConfigError                 bad configuration (names the field)
    ├── ListenError                 the HTTP listener cannot bind its address
    ├── ProviderError               a token request failed (carries `reason`)
    │   ├── TransportError          connection refused/reset, TLS, DNS     reason=transport
    │   │   └── ProviderTimeoutError no answer in time                     reason=timeout
    │   ├── ServerError             5xx                                     reason=server_error
    │   ├── RateLimitedError        429, carries retry_after seconds        reason=rate_limited
    │   ├── UnauthorizedError       401: credential rejected                reason=unauthorized
    │   ├── ForbiddenError          403: capability missing                 reason=forbidden
    │   │   └── ScopeMissingError       the grant lacks a required scope        reason=scope_missing
    │   │                               (``require_scopes: true``)
    │   ├── BadResponseError        malformed body, no expiry, failed JWT   reason=bad_response
    │   │   │                       verification, token already expired,
    │   │   │                       a value unsafe to write
    │   │   └── TenantMismatchError a token for another tenant             reason=tenant_mismatch
    │   └── SecretUnusableError     the job's own secret cannot be read     reason=config
    │                               (missing, empty, not UTF-8)
    ├── SinkError                   a sink could not store the token       reason=sink
    │   ├── SinkOwnedError          another process holds the lock of a file-sink directory
    │   ├── LeadershipLostError     a write not sent: this replica stopped leading
    │   └── KubernetesSinkError     a Secret sink's API call failed (also a KubernetesAPIError)
    ├── KubernetesAPIError          a Kubernetes API call failed (status, retry_after,
    │   │                           config_level: no retry fixes it)
    │   └── LeaderElectionError     the Lease could not be read or written
    ├── NotifyError                 a notifier could not deliver its notification
    ├── TemplateError               a sink template cannot be parsed, or one token cannot
    │                               be rendered into it (names the line, or the field)
    ├── TooSoonError                a forced refresh over its budget (429)
    └── NotActiveError              a forced refresh on a replica that does not refresh
                                    (a follower under leader election, or stopping) (503)

An exception outside this tree in a job's path is a bug: it is caught at the job's
boundary, logged with its traceback, counted (reason=internal) and retried. One
failure reason is a verdict, not an exception: ``invalid_link``, when a consumer
reports that a token minted in answer to its earlier report was rejected too.

Messages never contain a token or a secret: they carry the HTTP status and the
`title`/`detail` of an RFC 9457 problem response, which partners fill with prose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class RefresherError(Exception):
    """Base class of every error refresher raises on purpose."""


class ConfigError(RefresherError):
    """The configuration is invalid; `errors` holds one ``path: message`` per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


class ListenError(RefresherError):
    """The HTTP listener cannot bind its address: in use, not local, not permitted."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"cannot listen on {address}: {reason}")


@dataclass(frozen=True)
class Problem:
    """The parts of an ``application/problem+json`` body worth reporting."""

    status: int | None = None
    title: str | None = None
    detail: str | None = None
    type: str | None = None

    def describe(self) -> str:
        parts = [p for p in (self.title, self.detail) if p]
        return ": ".join(parts)


class ProviderError(RefresherError):
    """A token request failed. `reason` is the metric label for this failure class."""

    reason = "provider"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        problem: Problem | None = None,
    ) -> None:
        self.status = status
        self.problem = problem
        #: Our own words, without the provider's free text: safe to show in the API.
        self.summary = message
        if problem is not None and problem.describe():
            message = f"{message} ({problem.describe()})"
        super().__init__(message)


class TransportError(ProviderError):
    """The request never got an HTTP answer: connection refused or reset, TLS, DNS."""

    reason = "transport"


class ProviderTimeoutError(TransportError):
    """The provider did not answer within the configured timeout."""

    reason = "timeout"


class ServerError(ProviderError):
    """The provider answered 5xx."""

    reason = "server_error"


class RateLimitedError(ProviderError):
    """The provider answered 429; `retry_after` is how long it asked us to wait (seconds)."""

    reason = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None,
        status: int | None = 429,
        problem: Problem | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, status=status, problem=problem)


class UnauthorizedError(ProviderError):
    """401: the provider rejected the credential. Never retried in a tight loop."""

    reason = "unauthorized"


class ForbiddenError(ProviderError):
    """403: the credential is valid but lacks a capability or scope."""

    reason = "forbidden"


class ScopeMissingError(ForbiddenError):
    """The grant lacks a scope the job requires (``require_scopes: true``): nothing is
    written, and like a 403 it is not retried soon."""

    reason = "scope_missing"

    def __init__(self, message: str, *, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__(message)


class BadResponseError(ProviderError):
    """The provider answered, but not with a usable token."""

    reason = "bad_response"


class TenantMismatchError(BadResponseError):
    """The provider answered with a token for another tenant than the one asked for."""

    reason = "tenant_mismatch"


class SecretUnusableError(ProviderError):
    """The job's own credential could not be read or is not a usable secret."""

    reason = "config"


class SinkError(RefresherError):
    """A sink could not store (or remove) a token; the previous value is untouched."""

    reason = "sink"

    def __init__(self, message: str, *, sink: str) -> None:
        self.sink = sink
        super().__init__(message)


class TooSoonError(RefresherError):
    """A forced refresh asked for more than its budget allows; `scope` says which
    budget (``job``, ``credential`` or ``daemon``)."""

    def __init__(self, retry_after: float, *, scope: str = "job") -> None:
        self.retry_after = retry_after
        self.scope = scope
        super().__init__(f"refresh allowed again in {retry_after:.1f}s ({scope} budget)")


@dataclass(frozen=True)
class Refusal:
    """A file-sink directory this process may not write: another process holds its lock."""

    directory: str
    #: The holder's pid, when the kernel tells (None: another pid namespace, no procfs).
    pid: int | None = None

    def describe(self) -> str:
        holder = f"pid {self.pid}" if self.pid else "another refresher process"
        return f"{self.directory} (lock held by {holder})"


class SinkOwnedError(SinkError):
    """Another refresher process writes to these file-sink directories: one writer each."""

    def __init__(self, refusals: Sequence[Refusal]) -> None:
        self.refusals = tuple(refusals)
        where = ", ".join(r.describe() for r in self.refusals)
        own = "its own sink directories" if len(self.refusals) > 1 else "its own sink directory"
        super().__init__(
            f"another refresher already writes to {where}: stop it or give this daemon {own}",
            sink="file",
        )


class LeadershipLostError(SinkError):
    """A write was not sent because this replica no longer holds the leader Lease:
    the new leader writes instead (one writer, always)."""


class NotActiveError(RefresherError):
    """This daemon does not refresh now (a follower under leader election, or shutting
    down), so it refuses forced refreshes; `leader` is the Lease holder, if known."""

    def __init__(self, leader: str | None = None) -> None:
        self.leader = leader
        where = f": the leader is {leader}" if leader else ""
        super().__init__(f"this replica is not refreshing{where}")


class KubernetesAPIError(RefresherError):
    """A Kubernetes API call failed. `config_level` marks problems no retry fixes
    (missing namespace, RBAC, an invalid object); `status` is the HTTP status, if any;
    `retry_after` the seconds the API server asked us to wait, if it did."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        kube_reason: str | None = None,
        config_level: bool = False,
        retry_after: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.status = status
        self.kube_reason = kube_reason
        self.config_level = config_level
        self.retry_after = retry_after

    def details(self) -> dict[str, Any]:
        """The fields to carry over when this error is re-raised with more context."""
        return {
            "status": self.status,
            "kube_reason": self.kube_reason,
            "config_level": self.config_level,
            "retry_after": self.retry_after,
        }


class KubernetesSinkError(KubernetesAPIError, SinkError):
    """A Secret sink could not write or remove its key; the Secret is as it was."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, sink="kubernetes", **details)


class LeaderElectionError(KubernetesAPIError):
    """The Lease could not be read or written."""


class NotifyError(RefresherError):
    """A notifier could not deliver its notification."""


class TemplateError(RefresherError):
    """A ``kind: template`` template cannot be parsed (the message names the line and
    column), or a token cannot be rendered into it (the message names the field)."""
