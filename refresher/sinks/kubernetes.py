"""Kubernetes Secret sink: keep one key of a Secret fresh with server-side apply.

Each sink owns exactly its own fields of the Secret — the data key, the optional
``<key>.expires_at`` / ``<key>.token_type`` data keys, the annotations
``refresher.io/<key>.expires-at``, ``.fingerprint`` and ``.obtained-at`` — plus a
shared claim on the label ``app.kubernetes.io/managed-by: refresher``. It applies
them with server-side apply (``force``), creating the Secret when absent, so several
jobs and other tools can share one Secret without clobbering each other.

The field manager is ``refresher/<key>``, one per key, not a bare ``refresher``:
server-side apply removes every field a manager applied before and omits now, so two
jobs applying different keys under one manager name would delete each other's key
on every refresh.

One writer, even across a failover: every apply carries the ``resourceVersion``
this process last saw of the Secret as a precondition, so a write from a replica
that stopped leading while its request was on the way fails (409) instead of
overwriting what the new leader wrote. A 409 is re-read and retried a few times, but
only while `may_write()` (the leader check) still holds: it is asked immediately
before every request that writes. (An absent Secret is created without one: the API
has no create-only apply.)

`put`/`get` keep a whole file's content in the key instead of one token (a bundle or
a rendered template: an `Output`), with the content's fingerprint as annotation.

Failures raise `KubernetesSinkError` (a `SinkError`) and leave the Secret as it was:
an apply is atomic on the API server. 403 names the verb, resource and namespace to
grant; a missing namespace is flagged ``config_level``; an answer with
``Retry-After`` (API Priority and Fairness throttling, 429) is retried after that
long, within a small budget, as client-go does; 5xx, 429 and timeouts surface for
the scheduler to back off.

`KubeClients` builds and shares the lightkube clients (one per kubeconfig/context,
plus in-cluster), also used by the leader elector. In-cluster it re-reads the
projected service-account token whenever the file changes (the kubelet rotates it),
instead of lightkube's read-once-and-retry-on-401.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import httpx2
import structlog
from lightkube import ApiError, AsyncClient
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Secret
from lightkube.types import PatchType

from refresher.config import SECRET_LIMIT, KubernetesSinkConfig
from refresher.errors import (
    ConfigError,
    KubernetesAPIError,
    KubernetesSinkError,
    LeadershipLostError,
)
from refresher.kube import KubeClients, SecretRef, api_error, transport_error
from refresher.targets import secret_data_keys, secret_key_problem
from refresher.token import Token, fingerprint, parse_rfc3339, rfc3339

log = structlog.get_logger("refresher.sinks.kubernetes")

FIELD_MANAGER = "refresher"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "refresher"
ANNOTATION_PREFIX = "refresher.io/"
#: Attempts for one write when the API server answers 409 Conflict.
CONFLICT_ATTEMPTS = 4
#: One write waits out ``Retry-After`` at most this many times, and this long in all
#: (client-go retries up to 10 times; a refresh should not hold its slot that long).
THROTTLE_RETRIES = 3
THROTTLE_BUDGET = 10.0

_ANNOTATION_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


# ---------------------------------------------------------------------------- the sink


def annotation_key(key: str, suffix: str) -> str:
    """``refresher.io/<key>.<suffix>``; a key that would make an invalid annotation
    name (over 63 characters, odd characters) is shortened with a stable hash."""
    name = f"{key}.{suffix}"
    if len(name) <= 63 and _ANNOTATION_NAME.match(name):
        return ANNOTATION_PREFIX + name
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    room = 63 - len(suffix) - len(digest) - 2
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", key)[:room].strip("-_.") or "key"
    return f"{ANNOTATION_PREFIX}{stem}-{digest}.{suffix}"


def field_manager_for(key: str, prefix: str = FIELD_MANAGER) -> str:
    """``refresher/<key>``, at most 128 characters (the API server's limit)."""
    manager = f"{prefix}/{key}"
    if len(manager) <= 128:
        return manager
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"{prefix}/{key[: 128 - len(prefix) - 14]}-{digest}"


def token_from_secret(
    data: Mapping[str, str] | None,
    annotations: Mapping[str, str] | None,
    key: str,
) -> Token | None:
    """Rebuild the token a Secret holds under `key` (None if absent or untrustworthy).

    Expiry comes from our annotation and, for a JWT, from ``exp`` (the earlier
    wins); annotations whose fingerprint does not match the value (someone else
    edited the key) are ignored. Unknown expiry → None: treat as due.
    """
    raw = (data or {}).get(key)
    if not raw:
        return None
    try:
        value = base64.b64decode(raw, validate=True).decode()
    except (binascii.Error, ValueError):
        return None
    if not value:
        return None
    notes = dict(annotations or {})
    if notes.get(annotation_key(key, "fingerprint")) != fingerprint(value):
        notes = {}
    expires_at = _timestamp(notes.get(annotation_key(key, "expires-at")))
    obtained_at = _timestamp(notes.get(annotation_key(key, "obtained-at")))
    token_type = "Bearer"
    raw_type = (data or {}).get(f"{key}.token_type")
    if raw_type:
        with contextlib.suppress(binascii.Error, ValueError):
            token_type = base64.b64decode(raw_type, validate=True).decode() or "Bearer"
    return Token.recovered(
        value, token_type=token_type, expires_at=expires_at, obtained_at=obtained_at
    )


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return parse_rfc3339(text)
    except ValueError:
        return None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class KubernetesSink:
    """Writes a token to key `key` of a Secret (the caller expands ``{job}``/``{tenant}``).

    `may_write`, when set (leader election), is asked immediately before every
    request that writes; False stops the write with `LeadershipLostError`.
    """

    kind = "kubernetes"

    def __init__(
        self,
        config: KubernetesSinkConfig,
        key: str,
        *,
        clients: KubeClients,
        field_manager: str = FIELD_MANAGER,
        conflict_attempts: int = CONFLICT_ATTEMPTS,
        may_write: Callable[[], bool] | None = None,
    ) -> None:
        problem = secret_key_problem(key)
        if problem is not None:
            raise ConfigError([f"kubernetes sink key {key!r} {problem}"])
        self.config = config
        self.key = key
        self.clients = clients
        self.secret = config.secret
        self.namespace = config.namespace or clients.namespace(config.kubeconfig, config.context)
        self.field_manager = field_manager_for(key, field_manager)
        self.conflict_attempts = max(1, conflict_attempts)
        self.may_write = may_write
        self.target = f"secret/{self.namespace}/{self.secret}#{key}"
        self._ref: SecretRef = (
            str(config.kubeconfig) if config.kubeconfig is not None else None,
            config.context,
            self.namespace,
            self.secret,
        )
        self._annotations = {
            suffix: annotation_key(key, suffix)
            for suffix in ("expires-at", "fingerprint", "obtained-at")
        }

    # ------------------------------------------------------------ TokenSink

    async def write(self, token: Token) -> None:
        """Server-side apply our keys, guarded by the Secret's last seen resourceVersion;
        a 409 is re-read and retried while still allowed to write. Leaves the Secret
        as it was on error."""
        data = {self.key: _b64(token.value)}
        if "expires_at" in self.config.extra_keys and token.expires_at is not None:
            data[f"{self.key}.expires_at"] = _b64(rfc3339(token.expires_at) or "")
        if "token_type" in self.config.extra_keys:
            data[f"{self.key}.token_type"] = _b64(token.token_type)
        annotations = {
            self._annotations["fingerprint"]: token.fingerprint(),
            self._annotations["obtained-at"]: rfc3339(token.obtained_at) or "",
        }
        if token.expires_at is not None:
            annotations[self._annotations["expires-at"]] = rfc3339(token.expires_at) or ""
        await self._apply(data, annotations, token.fingerprint())

    async def put(self, content: bytes) -> None:
        """Keep `content` (a bundle, a rendered template) in the key, as `write` does a
        token; the fingerprint annotation is the content's."""
        if len(content) > SECRET_LIMIT:
            raise self._wrap(
                KubernetesSinkError(
                    f"{len(content)} bytes do not fit in a Secret (at most {SECRET_LIMIT}): "
                    "split the bundle",
                    config_level=True,
                )
            )
        data = {self.key: base64.b64encode(content).decode()}
        digest = fingerprint(content)
        await self._apply(data, {self._annotations["fingerprint"]: digest}, digest)

    async def _apply(self, data: dict[str, str], annotations: dict[str, str], shown: str) -> None:
        self._check_may_write()  # before any request, the read included
        client = self._client()
        version = await self._version(client)
        attempt = 0
        while True:
            attempt += 1
            self._check_may_write()
            secret = self._applied(data, annotations, version)
            try:
                result = await client.apply(secret, field_manager=self.field_manager, force=True)
            except ApiError as exc:
                error = api_error(
                    exc,
                    verb="patch",
                    resource="secrets",
                    namespace=self.namespace,
                    name=self.secret,
                    unnamed_verb="create",  # the only check an apply makes without naming it
                )
                if exc.status.code == 409:
                    if attempt < self.conflict_attempts:
                        log.info(
                            "secret changed since it was read: re-reading",
                            target=self.target,
                            attempt=attempt,
                        )
                        version = await self._read_version(client)
                        continue
                    error = KubernetesSinkError(
                        f"still conflicting after {attempt} attempts: {error}",
                        status=409,
                        kube_reason=error.kube_reason,
                    )
                if await self._waited_out(error, attempt):
                    continue
                raise self._wrap(error) from None
            except (httpx2.HTTPError, OSError) as exc:
                error = transport_error(exc, self._server())
                if await self._waited_out(error, attempt):
                    continue
                raise self._wrap(error) from None
            metadata = getattr(result, "metadata", None)
            version = getattr(metadata, "resourceVersion", None)
            self.clients.versions[self._ref] = version
            log.debug(
                "secret key written",
                target=self.target,
                fingerprint=shown,
                resource_version=version,
                attempts=attempt,
            )
            return

    async def read_back(self) -> Token | None:
        """The token the Secret holds now (None when absent, unreadable or undated)."""
        secret = await self._read()
        if secret is None:
            return None
        annotations = secret.metadata.annotations if secret.metadata is not None else None
        token = token_from_secret(secret.data, annotations, self.key)
        if token is not None:
            log.debug(
                "secret key read back",
                target=self.target,
                fingerprint=token.fingerprint(),
                expires_at=rfc3339(token.expires_at),
            )
        return token

    async def get(self) -> bytes | None:
        """The content `put` keeps in the key (None when absent or unreadable)."""
        secret = await self._read()
        raw = (secret.data or {}).get(self.key) if secret is not None else None
        if not raw:
            return None
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return None

    def stamp(self) -> object | None:
        """Unknown without asking the API server: a bundle reads the Secret again."""
        return None

    async def _read(self) -> Secret | None:
        """The Secret, remembering its resourceVersion; None (logged) if it cannot be read."""
        try:
            client = self._client()
            secret = await client.get(Secret, self.secret, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404 or (
                exc.status.details is not None and exc.status.details.kind == "namespaces"
            ):
                error = api_error(
                    exc, verb="get", resource="secrets", namespace=self.namespace, name=self.secret
                )
                log.warning("cannot read back secret", target=self.target, error=str(error))
            else:
                self.clients.versions[self._ref] = None
            return None
        except KubernetesAPIError as exc:
            log.warning("cannot read back secret", target=self.target, error=str(exc))
            return None
        except (httpx2.HTTPError, OSError) as exc:
            error = transport_error(exc, self._server())
            log.warning("cannot read back secret", target=self.target, error=str(error))
            return None
        metadata = secret.metadata
        self.clients.versions[self._ref] = metadata.resourceVersion if metadata else None
        return secret

    async def remove(self) -> None:
        """Delete our keys and annotations (a JSON merge patch, guarded by the last seen
        resourceVersion like a write); the Secret stays."""
        self._check_may_write()
        client = self._client()
        version = await self._version(client)
        attempt = 0
        while True:
            attempt += 1
            if version is None:
                return  # no Secret, nothing of ours in it
            self._check_may_write()
            patch: dict[str, Any] = {
                "metadata": {
                    "resourceVersion": version,
                    "annotations": dict.fromkeys(self._annotations.values()),
                },
                "data": dict.fromkeys(self._data_keys()),
            }
            try:
                result = await client.patch(
                    Secret,
                    self.secret,
                    patch,
                    namespace=self.namespace,
                    patch_type=PatchType.MERGE,
                    field_manager=self.field_manager,
                )
            except ApiError as exc:
                code = exc.status.code
                if code == 404:
                    self.clients.versions[self._ref] = None
                    return
                if code == 409 and attempt < self.conflict_attempts:
                    version = await self._read_version(client)
                    continue
                raise self._wrap(
                    api_error(
                        exc,
                        verb="patch",
                        resource="secrets",
                        namespace=self.namespace,
                        name=self.secret,
                    )
                ) from None
            except (httpx2.HTTPError, OSError) as exc:
                raise self._wrap(transport_error(exc, self._server())) from None
            metadata = getattr(result, "metadata", None)
            self.clients.versions[self._ref] = getattr(metadata, "resourceVersion", None)
            log.info("secret key removed", target=self.target)
            return

    # ------------------------------------------------------------ helpers

    def _check_may_write(self) -> None:
        if self.may_write is not None and not self.may_write():
            raise LeadershipLostError(
                f"cannot write {self.target}: this replica is no longer the leader "
                "(write not sent; the leader writes instead)",
                sink=self.kind,
            )

    async def _version(self, client: AsyncClient) -> str | None:
        """The Secret's resourceVersion as last seen by this process (read it if never)."""
        if self._ref in self.clients.versions:
            return self.clients.versions[self._ref]
        return await self._read_version(client)

    async def _read_version(self, client: AsyncClient) -> str | None:
        """Read the Secret's resourceVersion now (None: it does not exist)."""
        try:
            secret = await client.get(Secret, self.secret, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code == 404 and not (
                exc.status.details is not None and exc.status.details.kind == "namespaces"
            ):
                self.clients.versions[self._ref] = None
                return None
            raise self._wrap(
                api_error(
                    exc, verb="get", resource="secrets", namespace=self.namespace, name=self.secret
                )
            ) from None
        except (httpx2.HTTPError, OSError) as exc:
            raise self._wrap(transport_error(exc, self._server())) from None
        version = secret.metadata.resourceVersion if secret.metadata is not None else None
        self.clients.versions[self._ref] = version
        return version

    async def _waited_out(self, error: KubernetesAPIError, attempt: int) -> bool:
        """Wait the ``Retry-After`` the API server asked for, if the write's budget
        allows (True: send again)."""
        wait = error.retry_after
        if wait is None or attempt > THROTTLE_RETRIES or wait > THROTTLE_BUDGET:
            return False
        log.info(
            "kubernetes API asked to retry later: waiting",
            target=self.target,
            status=error.status,
            retry_after=wait,
        )
        clock = self.clients.clock
        await clock.sleep_until(clock.now() + wait)
        return True

    def _client(self) -> AsyncClient:
        try:
            return self.clients.client(self.config.kubeconfig, self.config.context)
        except ConfigError as exc:
            raise KubernetesSinkError(
                f"cannot write {self.target}: {exc}", config_level=True
            ) from None

    def _server(self) -> str:
        try:
            return self.clients.server(self.config.kubeconfig, self.config.context)
        except ConfigError:
            return "(unknown)"

    def _wrap(self, error: KubernetesAPIError) -> KubernetesSinkError:
        return KubernetesSinkError(f"cannot write {self.target}: {error}", **error.details())

    def _data_keys(self) -> list[str]:
        return list(secret_data_keys(self.key))

    def _applied(
        self, data: dict[str, str], annotations: dict[str, str], version: str | None
    ) -> Secret:
        return Secret(
            metadata=ObjectMeta(
                name=self.secret,
                namespace=self.namespace,
                # A precondition (the API server answers 409 if the Secret changed since).
                resourceVersion=version,
                labels={MANAGED_BY_LABEL: MANAGED_BY_VALUE},
                annotations=annotations,
            ),
            type=self.config.type,
            data=data,
        )
