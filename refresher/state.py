"""What must survive a restart that no sink holds: the refresh token an authorization
server rotated (RFC 6749 §6, RFC 9700 §4.14.2). The server forgets the old one the
moment it issues the new one, so losing the new one locks the client out until a
person consents again.

One JSON document per job, ``<job>.refresh-token.json``, saved *before* the access
token minted with it is published, in either

* ``state_dir`` (`RefreshTokenState`): a file, mode 0600, written atomically (temp file
  in the same directory, fsync, rename, fsync the directory); or
* ``state_secret`` (`SecretRefreshTokenState`): a data key of a Kubernetes Secret,
  written with server-side apply (an atomic update on the API server), which the
  replica that becomes leader reads at its first refresh.

The document records the SHA-256 of the ``refresh_token_file`` content it descends
from: an operator who puts a new refresh token there starts a new line, and the state
of the old one is ignored.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Secret

from refresher.errors import (
    ConfigError,
    KubernetesAPIError,
    ProviderError,
    SecretUnusableError,
    ServerError,
)
from refresher.fields import secret_problem
from refresher.kube import KubeClients, api_error, transport_error
from refresher.token import rfc3339

#: The state file is a few hundred bytes; refuse to read more than this.
MAX_STATE_BYTES = 1 << 16


def seed_digest(seed: str) -> str:
    """The SHA-256 (hex) of a refresh token as the operator supplied it."""
    return hashlib.sha256(seed.encode()).hexdigest()


@dataclass(frozen=True)
class StoredRefreshToken:
    value: str
    #: `seed_digest` of the ``refresh_token_file`` content this one descends from.
    seed: str


def _document(value: str, seed: str, now: float) -> bytes:
    document = {"refresh_token": value, "seed_sha256": seed, "saved_at": rfc3339(now)}
    return json.dumps(document, indent=2).encode() + b"\n"


def _parse(data: bytes, where: str) -> StoredRefreshToken:
    """A stored document, or `SecretUnusableError`: falling back to the original
    refresh token would replay a used one, which servers punish by revoking every
    token of the grant."""
    try:
        document = json.loads(data)
        value, seed = document["refresh_token"], document["seed_sha256"]
    except (ValueError, TypeError, KeyError):
        value, seed = None, None
    if (
        len(data) > MAX_STATE_BYTES
        or not isinstance(value, str)
        or secret_problem(value) is not None
        or not isinstance(seed, str)
    ):
        raise SecretUnusableError(
            f"{where}: not a refresh-token state document (remove it and put a valid refresh "
            "token in refresh_token_file)"
        )
    return StoredRefreshToken(value=value, seed=seed)


class StateStore(Protocol):
    """Where one job's newest refresh token is kept."""

    where: str

    async def load(self) -> StoredRefreshToken | None:
        """The stored token; None when there is none yet."""
        ...

    async def save(self, value: str, *, seed: str, now: float) -> None:
        """Store `value` durably, or raise a `ProviderError` (nothing is published)."""
        ...


class RefreshTokenState:
    """The newest refresh token of one job, in ``state_dir``."""

    def __init__(self, directory: Path, job: str) -> None:
        self.directory = directory
        self.path = directory / f"{job}.refresh-token.json"
        self.where = f"state_dir: {self.path}"

    async def load(self) -> StoredRefreshToken | None:
        try:
            with self.path.open("rb") as file:
                data = file.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SecretUnusableError(
                f"{self.where}: cannot read ({exc.strerror or exc})"
            ) from None
        return _parse(data, self.where)

    async def save(self, value: str, *, seed: str, now: float) -> None:
        content = _document(value, seed, now)
        await anyio.to_thread.run_sync(functools.partial(self._write, content))

    def _write(self, content: bytes) -> None:
        temp: str | None = None
        try:
            descriptor, temp = tempfile.mkstemp(dir=self.directory, prefix=f".{self.path.name}.")
            with os.fdopen(descriptor, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.path)
            temp = None
            _sync_directory(self.directory)
        except OSError as exc:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            raise SecretUnusableError(
                f"state_dir: cannot save the rotated refresh token in {self.path} "
                f"({exc.strerror or exc}): nothing is published until it is saved"
            ) from None


@dataclass(frozen=True)
class SecretLocation:
    """A Secret as a config names it (namespace None: the default one)."""

    name: str
    namespace: str | None = None
    kubeconfig: Path | None = None
    context: str | None = None


#: The field manager of state keys: one per key, as the Secret sink's (see there).
STATE_FIELD_MANAGER = "refresher-state"


class SecretRefreshTokenState:
    """The newest refresh token of one job, as data key ``<job>.refresh-token.json`` of
    a Kubernetes Secret (created when absent). Only the leader refreshes, so only it
    writes; a replica that takes over reads what the last leader saved."""

    def __init__(self, kube: KubeClients, secret: SecretLocation, job: str) -> None:
        self.kube = kube
        self.name = secret.name
        self.key = f"{job}.refresh-token.json"
        self.kubeconfig, self.context = secret.kubeconfig, secret.context
        self._namespace = secret.namespace
        where = f"{secret.namespace or '(default namespace)'}/{secret.name}"
        self.where = f"state_secret {where}#{self.key}"

    def _target(self) -> tuple[AsyncClient, str]:
        try:
            client = self.kube.client(self.kubeconfig, self.context)
            namespace = self._namespace or self.kube.namespace(self.kubeconfig, self.context)
        except ConfigError as exc:
            raise SecretUnusableError(f"{self.where}: {exc}") from None
        self.where = f"state_secret {namespace}/{self.name}#{self.key}"
        return client, namespace

    async def load(self) -> StoredRefreshToken | None:
        client, namespace = self._target()
        try:
            secret = await client.get(Secret, self.name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            error = api_error(
                exc, verb="get", resource="secrets", namespace=namespace, name=self.name
            )
            raise self._failed(error, "read") from None
        except (httpx2.HTTPError, OSError) as exc:
            raise self._failed(transport_error(exc, self._server()), "read") from None
        encoded = (secret.data or {}).get(self.key)
        if encoded is None:
            return None
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise SecretUnusableError(f"{self.where}: not base64") from None
        return _parse(data, self.where)

    async def save(self, value: str, *, seed: str, now: float) -> None:
        client, namespace = self._target()
        content = base64.b64encode(_document(value, seed, now)).decode()
        secret = Secret(
            metadata=ObjectMeta(
                name=self.name,
                namespace=namespace,
                labels={"app.kubernetes.io/managed-by": "refresher"},
            ),
            data={self.key: content},
        )
        manager = f"{STATE_FIELD_MANAGER}/{self.key}"[:128]
        try:
            await client.apply(secret, field_manager=manager, force=True)
        except ApiError as exc:
            error = api_error(
                exc,
                verb="patch",
                resource="secrets",
                namespace=namespace,
                name=self.name,
                unnamed_verb="create",  # the check an apply makes without naming it
            )
            raise self._failed(error, "save the rotated refresh token in") from None
        except (httpx2.HTTPError, OSError) as exc:
            error = transport_error(exc, self._server())
            raise self._failed(error, "save the rotated refresh token in") from None

    def _server(self) -> str:
        try:
            return self.kube.server(self.kubeconfig, self.context)
        except ConfigError:
            return "(unknown server)"

    def _failed(self, error: KubernetesAPIError, what: str) -> ProviderError:
        """A problem no retry fixes (RBAC, a missing namespace) is the job's
        configuration's; anything else is the API server's passing trouble."""
        message = f"cannot {what} {self.where}: {error}"
        if what != "read":
            message += ": nothing is published until it is saved"
        if error.config_level or error.status in (401, 403):
            return SecretUnusableError(message)
        return ServerError(message)


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` survive a power loss."""
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
