"""What every Kubernetes client in refresher shares: building and sharing the
lightkube clients (one per kubeconfig/context, plus in-cluster with the projected
service-account token re-read whenever the kubelet rotates it), and turning API and
transport failures into actionable `KubernetesAPIError`s (403 names the verb to
grant; ``Retry-After`` is kept for the caller to honour). Used by the Secret sink and
the leader elector.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import structlog
import yaml
from lightkube import ApiError, AsyncClient, KubeConfig, SingleConfig
from lightkube import ConfigError as LightkubeConfigError
from lightkube.config.models import Cluster, User

from refresher.clock import Clock, SystemClock
from refresher.errors import ConfigError, KubernetesAPIError

log = structlog.get_logger("refresher.kube")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: A ``Retry-After`` longer than this is read as this (a hostile or broken value).
MAX_RETRY_AFTER = 300.0
_FORBIDDEN = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<res>[^"]+)"'
    r'(?: in API group "(?P<group>[^"]*)")?'
)


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


def api_error(
    exc: ApiError,
    *,
    verb: str,
    resource: str,
    namespace: str,
    name: str,
    unnamed_verb: str | None = None,
) -> KubernetesAPIError:
    """Turn a lightkube `ApiError` into an actionable `KubernetesAPIError`.

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
        return KubernetesAPIError(
            f'RBAC: grant "{denied_verb}" on {denied_res} "{name}" in namespace "{namespace}"{who}',
            status=code,
            kube_reason=reason,
            config_level=True,
        )
    if code == 404 and details is not None and details.kind == "namespaces":
        return KubernetesAPIError(
            f'namespace "{namespace}" does not exist: create it or fix the sink\'s namespace',
            status=code,
            kube_reason=reason,
            config_level=True,
        )
    if code == 404:
        return KubernetesAPIError(
            f'{resource} "{name}" not found in namespace "{namespace}"',
            status=code,
            kube_reason=reason,
        )
    if code == 401:
        return KubernetesAPIError(
            "the Kubernetes API rejected refresher's credentials (401): check the "
            "service-account token or the kubeconfig user",
            status=code,
            kube_reason=reason,
            config_level=True,
        )
    if code in (400, 422):
        return KubernetesAPIError(
            f"the Kubernetes API rejected the {resource} ({code} {reason}): {message}",
            status=code,
            kube_reason=reason,
            config_level=True,
        )
    wait = retry_after(exc.response, details)
    if code == 429:
        return KubernetesAPIError(
            f"API server throttled the request (429{_after(wait)}): {message}",
            status=code,
            kube_reason=reason,
            retry_after=wait,
        )
    return KubernetesAPIError(
        f"Kubernetes API error {code} {reason}: {message}".rstrip(": "),
        status=code,
        kube_reason=reason,
        retry_after=wait if code >= 500 else None,
    )


def _after(wait: float | None) -> str:
    return f", retry after {wait:g}s" if wait is not None else ""


def transport_error(exc: Exception, server: str) -> KubernetesAPIError:
    """Timeouts, refused connections, TLS problems, an unreadable token file."""
    if isinstance(exc, httpx2.TimeoutException):
        return KubernetesAPIError(f"the Kubernetes API at {server} did not answer in time")
    if isinstance(exc, httpx2.HTTPStatusError):  # an answer that is not a Status
        code = exc.response.status_code
        wait = retry_after(exc.response)
        if code == 429:  # API Priority and Fairness answers in plain text
            return KubernetesAPIError(
                f"API server at {server} throttled the request (429{_after(wait)})",
                status=code,
                retry_after=wait,
            )
        return KubernetesAPIError(
            f"Kubernetes API error {code} from {server} (not a Kubernetes Status response)",
            status=code,
            retry_after=wait if code >= 500 else None,
        )
    if isinstance(exc, OSError):
        return KubernetesAPIError(
            f"cannot read the Kubernetes credentials: {exc.strerror or exc}",
            config_level=True,
        )
    return KubernetesAPIError(
        f"cannot reach the Kubernetes API at {server}: {type(exc).__name__}: {exc}"
    )


