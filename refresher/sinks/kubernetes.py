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
import os
import re
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import structlog
import yaml
from lightkube import ApiError, AsyncClient, KubeConfig, SingleConfig
from lightkube import ConfigError as LightkubeConfigError
from lightkube.config.models import Cluster, User
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Secret
from lightkube.types import PatchType

from refresher.clock import Clock, SystemClock
from refresher.config import KubernetesSinkConfig
from refresher.errors import ConfigError, LeadershipLostError, SinkError
from refresher.targets import secret_data_keys, secret_key_problem
from refresher.token import Token, fingerprint, parse_rfc3339, rfc3339

log = structlog.get_logger("refresher.sinks.kubernetes")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
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
#: A ``Retry-After`` longer than this is read as this (a hostile or broken value).
MAX_RETRY_AFTER = 300.0

_ANNOTATION_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_FORBIDDEN = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<res>[^"]+)"'
    r'(?: in API group "(?P<group>[^"]*)")?'
)


class KubernetesSinkError(SinkError):
    """A Kubernetes API call failed. `config_level` marks problems no retry fixes
    (missing namespace, RBAC, invalid Secret); `status` is the HTTP status, if any;
    `retry_after` the seconds the API server asked us to wait, if it did."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        kube_reason: str | None = None,
        config_level: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, sink="kubernetes")
        self.status = status
        self.kube_reason = kube_reason
        self.config_level = config_level
        self.retry_after = retry_after


# ---------------------------------------------------------------------------- clients


class ServiceAccountTokenAuth(httpx2.Auth):
    """Bearer token read from a file the kubelet rotates.

    The file is stat'ed on every request and re-read when it changed (the kubelet
    swaps a symlink, so inode and mtime move), and once more after a 401 in case the
    change landed between stat and send. Nothing is cached past a rotation.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._signature: tuple[int, int, int] | None = None
        self._header: str | None = None

    def _bearer(self, *, force: bool = False) -> str:
        st = self.path.stat()
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if force or self._header is None or signature != self._signature:
            self._header = f"Bearer {self.path.read_text().strip()}"
            self._signature = signature
        return self._header

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        header = self._bearer()
        request.headers["Authorization"] = header
        response = yield request
        if response.status_code == 401:
            fresh = self._bearer(force=True)
            if fresh != header:
                request.headers["Authorization"] = fresh
                yield request


@dataclass
class _Entry:
    config: SingleConfig
    token_file: Path | None
    client: AsyncClient | None = None


#: A Secret as one process addresses it: (kubeconfig, context, namespace, name).
SecretRef = tuple[str | None, str | None, str, str]


class KubeClients:
    """Builds and shares lightkube `AsyncClient`s, one per (kubeconfig, context).

    ``kubeconfig=None`` means in-cluster: ``KUBERNETES_SERVICE_HOST``/``_PORT`` and
    the service account in `service_account_dir` (token, ``ca.crt``, ``namespace``).
    Problems with either raise `ConfigError`. Close with `aclose()`.

    Also shared by every sink of the process: `versions`, the ``resourceVersion``
    last seen of each Secret (None: seen absent), the precondition of the next write;
    and `clock`, which waits out ``Retry-After``.
    """

    def __init__(
        self,
        *,
        service_account_dir: str | os.PathLike[str] = SERVICE_ACCOUNT_DIR,
        timeout: float = 10.0,
        environ: Mapping[str, str] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.service_account_dir = Path(service_account_dir)
        self.timeout = timeout
        self.clock: Clock = clock or SystemClock()
        self.versions: dict[SecretRef, str | None] = {}
        self._environ = environ
        self._entries: dict[tuple[str | None, str | None], _Entry] = {}

    def _env(self) -> Mapping[str, str]:
        return self._environ if self._environ is not None else os.environ

    def _entry(self, kubeconfig: Path | None, context: str | None) -> _Entry:
        key = (str(kubeconfig) if kubeconfig is not None else None, context)
        entry = self._entries.get(key)
        if entry is None:
            if kubeconfig is None:
                entry = self._in_cluster(context)
            else:
                entry = _Entry(config=_load_kubeconfig(kubeconfig, context), token_file=None)
            self._entries[key] = entry
        return entry

    def _in_cluster(self, context: str | None) -> _Entry:
        env = self._env()
        host = env.get("KUBERNETES_SERVICE_HOST")
        port = env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ConfigError(
                [
                    "kubernetes: not running in a cluster (KUBERNETES_SERVICE_HOST/PORT unset) "
                    "and no kubeconfig configured: set kubeconfig (and optionally context)"
                ]
            )
        if context is not None:
            raise ConfigError(["kubernetes: context needs kubeconfig (in-cluster has no contexts)"])
        account = self.service_account_dir
        token_file = account / "token"
        ca_file = account / "ca.crt"
        for required in (token_file, ca_file):
            if not os.access(required, os.R_OK):
                raise ConfigError(
                    [f"kubernetes: in-cluster service account file {required} is missing"]
                )
        try:
            namespace = (account / "namespace").read_text().strip() or None
        except OSError:
            namespace = None
        if ":" in host:
            host = f"[{host}]"
        config = KubeConfig.from_one(
            cluster=Cluster(server=f"https://{host}:{port}", certificate_auth=str(ca_file)),
            user=User(token_file=str(token_file)),
            namespace=namespace,
            context_name="in-cluster",
        ).get()
        assert config is not None  # from_one always sets the current context
        return _Entry(config=config, token_file=token_file)

    def config(self, kubeconfig: Path | None = None, context: str | None = None) -> SingleConfig:
        """The resolved cluster/user/namespace for this source."""
        return self._entry(kubeconfig, context).config

    def namespace(self, kubeconfig: Path | None = None, context: str | None = None) -> str:
        """The default namespace: the pod's (in-cluster) or the context's (kubeconfig)."""
        return str(self.config(kubeconfig, context).namespace)

    def server(self, kubeconfig: Path | None = None, context: str | None = None) -> str:
        return str(self.config(kubeconfig, context).cluster.server)

    def client(self, kubeconfig: Path | None = None, context: str | None = None) -> AsyncClient:
        """The shared client for this source (built on first use)."""
        entry = self._entry(kubeconfig, context)
        if entry.client is None:
            try:
                client = AsyncClient(
                    entry.config, timeout=httpx2.Timeout(self.timeout), field_manager=None
                )
            except (LightkubeConfigError, OSError, ValueError) as exc:
                raise ConfigError([f"kubernetes: cannot build a client: {exc}"]) from None
            if entry.token_file is not None:
                _use_rotating_token(client, entry.token_file)
            entry.client = client
        return entry.client

    async def aclose(self) -> None:
        entries = list(self._entries.values())
        self._entries.clear()
        for entry in entries:
            if entry.client is not None:
                with contextlib.suppress(Exception):
                    await entry.client.close()


def _load_kubeconfig(path: Path, context: str | None) -> SingleConfig:
    try:
        config = KubeConfig.from_file(path).get(context)
    except (LightkubeConfigError, OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        detail = f"unknown cluster or user {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError([f"kubernetes: kubeconfig {path}: {detail}"]) from None
    except Exception as exc:  # msgspec validation of malformed entries
        raise ConfigError([f"kubernetes: kubeconfig {path}: {exc}"]) from None
    if config is None:  # pragma: no cover - get() without default raises instead
        raise ConfigError([f"kubernetes: kubeconfig {path}: no current context"])
    return config


def _use_rotating_token(client: AsyncClient, token_file: Path) -> None:
    # lightkube's own BearerTokenFileAuth reads the token once and re-reads only after
    # a 401; swap in an auth that follows every rotation of the file.
    http = getattr(getattr(client, "_client", None), "_client", None)
    if isinstance(http, httpx2.AsyncClient):
        http.auth = ServiceAccountTokenAuth(token_file)
    else:  # pragma: no cover - a lightkube layout change
        log.warning(
            "cannot install the rotating service-account token auth; lightkube re-reads the "
            "token only after a 401",
            lightkube_client=type(client).__name__,
        )


# ---------------------------------------------------------------------------- errors


def retry_after(response: httpx2.Response | None, details: Any = None) -> float | None:
    """The seconds a ``Retry-After`` header (or a Status's ``retryAfterSeconds``) asks
    for; None when absent or not a number of seconds. Capped at `MAX_RETRY_AFTER`."""
    raw = response.headers.get("retry-after") if response is not None else None
    if raw is None and details is not None:
        raw = getattr(details, "retryAfterSeconds", None)
    if raw is None:
        return None
    try:
        seconds = float(str(raw).strip())
    except ValueError:
        return None
    if not seconds >= 0:  # negative or NaN
        return None
    return min(seconds, MAX_RETRY_AFTER)


def describe_api_error(
    exc: ApiError,
    *,
    verb: str,
    resource: str,
    namespace: str,
    name: str,
    unnamed_verb: str | None = None,
) -> KubernetesSinkError:
    """Turn a lightkube `ApiError` into an actionable `KubernetesSinkError`.

    A 403 names the denied verb from the message; when the message names none
    (Kubernetes <= 1.31 for the ``create`` check inside an apply: ``secrets "x" is
    forbidden: ``), `unnamed_verb` is the verb that was refused, else `verb`.
    """
    status = exc.status
    code = int(status.code or exc.response.status_code)
    reason = status.reason or ""
    message = status.message or ""
    details = status.details
    if code == 403:
        match = _FORBIDDEN.search(message)
        denied_verb = match.group("verb") if match else (unnamed_verb or verb)
        denied_res = match.group("res") if match else resource
        if match and match.group("group"):
            denied_res = f"{denied_res}.{match.group('group')}"
        who = f" to {match.group('user')}" if match and match.group("user") else ""
        return KubernetesSinkError(
            f'RBAC: grant "{denied_verb}" on {denied_res} "{name}" in namespace "{namespace}"{who}',
            status=code,
            kube_reason=reason,
            config_level=True,
        )
    if code == 404 and details is not None and details.kind == "namespaces":
        return KubernetesSinkError(
            f'namespace "{namespace}" does not exist: create it or fix the sink\'s namespace',
            status=code,
            kube_reason=reason,
            config_level=True,
        )
    if code == 404:
        return KubernetesSinkError(
            f'{resource} "{name}" not found in namespace "{namespace}"',
            status=code,
            kube_reason=reason,
        )
    if code == 401:
        return KubernetesSinkError(
            "the Kubernetes API rejected refresher's credentials (401): check the "
            "service-account token or the kubeconfig user",
            status=code,
            kube_reason=reason,
            config_level=True,
        )
    if code in (400, 422):
        return KubernetesSinkError(
            f"the Kubernetes API rejected the {resource} ({code} {reason}): {message}",
            status=code,
            kube_reason=reason,
            config_level=True,
        )
    wait = retry_after(exc.response, details)
    if code == 429:
        return KubernetesSinkError(
            f"API server throttled the request (429{_after(wait)}): {message}",
            status=code,
            kube_reason=reason,
            retry_after=wait,
        )
    return KubernetesSinkError(
        f"Kubernetes API error {code} {reason}: {message}".rstrip(": "),
        status=code,
        kube_reason=reason,
        retry_after=wait if code >= 500 else None,
    )


def _after(wait: float | None) -> str:
    return f", retry after {wait:g}s" if wait is not None else ""


def describe_transport_error(exc: Exception, server: str) -> KubernetesSinkError:
    """Timeouts, refused connections, TLS problems, an unreadable token file."""
    if isinstance(exc, httpx2.TimeoutException):
        return KubernetesSinkError(f"the Kubernetes API at {server} did not answer in time")
    if isinstance(exc, httpx2.HTTPStatusError):  # an answer that is not a Status
        code = exc.response.status_code
        wait = retry_after(exc.response)
        if code == 429:  # API Priority and Fairness answers in plain text
            return KubernetesSinkError(
                f"API server at {server} throttled the request (429{_after(wait)})",
                status=code,
                retry_after=wait,
            )
        return KubernetesSinkError(
            f"Kubernetes API error {code} from {server} (not a Kubernetes Status response)",
            status=code,
            retry_after=wait if code >= 500 else None,
        )
    if isinstance(exc, OSError):
        return KubernetesSinkError(
            f"cannot read the Kubernetes credentials: {exc.strerror or exc}",
            config_level=True,
        )
    return KubernetesSinkError(
        f"cannot reach the Kubernetes API at {server}: {type(exc).__name__}: {exc}"
    )


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
        self._check_may_write()  # before any request, the read included
        client = self._client()
        version = await self._version(client)
        attempt = 0
        while True:
            attempt += 1
            self._check_may_write()
            try:
                result = await client.apply(
                    self._applied(token, version), field_manager=self.field_manager, force=True
                )
            except ApiError as exc:
                error = describe_api_error(
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
                error = describe_transport_error(exc, self._server())
                if await self._waited_out(error, attempt):
                    continue
                raise self._wrap(error) from None
            metadata = getattr(result, "metadata", None)
            version = getattr(metadata, "resourceVersion", None)
            self.clients.versions[self._ref] = version
            log.debug(
                "secret key written",
                target=self.target,
                fingerprint=token.fingerprint(),
                resource_version=version,
                attempts=attempt,
            )
            return

    async def read_back(self) -> Token | None:
        """The token the Secret holds now (None when absent, unreadable or undated)."""
        try:
            client = self._client()
            secret = await client.get(Secret, self.secret, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404 or (
                exc.status.details is not None and exc.status.details.kind == "namespaces"
            ):
                error = describe_api_error(
                    exc, verb="get", resource="secrets", namespace=self.namespace, name=self.secret
                )
                log.warning("cannot read back secret", target=self.target, error=str(error))
            else:
                self.clients.versions[self._ref] = None
            return None
        except SinkError as exc:
            log.warning("cannot read back secret", target=self.target, error=str(exc))
            return None
        except (httpx2.HTTPError, OSError) as exc:
            error = describe_transport_error(exc, self._server())
            log.warning("cannot read back secret", target=self.target, error=str(error))
            return None
        metadata = secret.metadata
        self.clients.versions[self._ref] = metadata.resourceVersion if metadata else None
        annotations = metadata.annotations if metadata is not None else None
        token = token_from_secret(secret.data, annotations, self.key)
        if token is not None:
            log.debug(
                "secret key read back",
                target=self.target,
                fingerprint=token.fingerprint(),
                expires_at=rfc3339(token.expires_at),
            )
        return token

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
                    describe_api_error(
                        exc,
                        verb="patch",
                        resource="secrets",
                        namespace=self.namespace,
                        name=self.secret,
                    )
                ) from None
            except (httpx2.HTTPError, OSError) as exc:
                raise self._wrap(describe_transport_error(exc, self._server())) from None
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
                describe_api_error(
                    exc, verb="get", resource="secrets", namespace=self.namespace, name=self.secret
                )
            ) from None
        except (httpx2.HTTPError, OSError) as exc:
            raise self._wrap(describe_transport_error(exc, self._server())) from None
        version = secret.metadata.resourceVersion if secret.metadata is not None else None
        self.clients.versions[self._ref] = version
        return version

    async def _waited_out(self, error: KubernetesSinkError, attempt: int) -> bool:
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

    def _wrap(self, error: KubernetesSinkError) -> KubernetesSinkError:
        return KubernetesSinkError(
            f"cannot write {self.target}: {error}",
            status=error.status,
            kube_reason=error.kube_reason,
            config_level=error.config_level,
            retry_after=error.retry_after,
        )

    def _data_keys(self) -> list[str]:
        return list(secret_data_keys(self.key))

    def _applied(self, token: Token, version: str | None) -> Secret:
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
