"""A loopback Kubernetes API server for the subset refresher uses.

Speaks the real REST/JSON protocol, so lightkube (or kubectl, or curl) talks to it
exactly as to a kube-apiserver:

* ``/api/v1/namespaces/{ns}/secrets[/{name}]`` — GET, list, POST, PUT, PATCH
  (server-side apply ``application/apply-patch+yaml`` with ``fieldManager``/``force``,
  ``application/merge-patch+json``, ``application/strategic-merge-patch+json``), DELETE.
* ``/apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]`` — the same verbs.
* ``/api/v1/namespaces/{name}`` (GET) and ``/version``.

It holds the code to the API server's rules, each taken from the apiserver,
apimachinery and client-go sources: bearer-token authentication (401); API Priority
and Fairness throttling as plain text with ``Retry-After`` (`throttle`); RBAC as an
allow-list of Role/RoleBinding rules (`apply_rbac`, `grant`), including the
``create`` check an apply or a Lease PUT makes when it creates, worded as the
configured `version` words it; ``resourceVersion`` preconditions (409), Lease
updates that must carry one (422); Secret validation (data keys, size, the keys each
built-in ``type`` requires, immutable ``type``); server-side apply field ownership
per field manager, in ``metadata.managedFields``, with no-op applies that change
nothing. docs/kubernetes-emulator.md lists every rule, its source, its test, and
what is not modelled.

Fault injection: `forbid` (403 per verb+resource on top of RBAC), `fail` (one-shot
or counted errors: 409, 429, 500, 503 …, optionally only for one verb/resource,
optionally slow), `throttle`, `revoke_token`. Every request lands in `requests`
(see `calls`), stamped with the moment it arrived.

The optional TLS mode (``tls=True``) serves HTTPS with a throw-away CA, so the
in-cluster path (``KUBERNETES_SERVICE_HOST``, service-account ``ca.crt`` and
``token``) can be exercised too; see `write_service_account`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import re
import secrets
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from refresher.demo.base import Emulator, RecordedRequest
from tests.emulators.tls import ServesTLS

Path_ = tuple[str, ...]

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Gone",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_CONFIG_KEY_MESSAGE = (
    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' "
    "(e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is "
    "'[-._a-zA-Z0-9]+')"
)
#: core.MaxSecretSize: the decoded bytes of all data values together.
MAX_SECRET_SIZE = 1 << 20
#: The group every authorizer lets through (kube-apiserver's privileged group).
SYSTEM_MASTERS = "system:masters"
_MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
_MICRO_LAYOUT = "2006-01-02T15:04:05.000000Z07:00"
_MISSING = object()


@dataclass(frozen=True)
class ResourceKind:
    """One API resource the emulator serves."""

    plural: str
    kind: str
    group: str
    version: str
    #: The registry strategy: a PUT to an absent object creates it (Lease: yes) ...
    create_on_update: bool = False
    #: ... and a PUT without metadata.resourceVersion is allowed (Lease: no, 422).
    unconditional_update: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """The name in apiserver messages: ``secrets``, ``leases.coordination.k8s.io``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


SECRETS = ResourceKind("secrets", "Secret", "", "v1")
LEASES = ResourceKind(
    "leases",
    "Lease",
    "coordination.k8s.io",
    "v1",
    create_on_update=True,
    unconditional_update=False,
)
#: Metadata a client sets and the server keeps (everything else there is the server's).
_USER_META = ("labels", "annotations", "ownerReferences", "finalizers")


@dataclass(frozen=True)
class Held:
    """A request `hold` keeps on the server: `arrived` once it is there; processed
    once `release()`d."""

    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class KubeFault:
    """An injected error for the next `count` matching requests."""

    status: int
    count: int = 1
    verb: str | None = None
    resource: str | None = None
    message: str | None = None
    delay: float = 0.0
    #: Answer normally after `delay` (a slow but successful response).
    passthrough: bool = False
    #: Seconds for ``Retry-After`` (and a Status's ``retryAfterSeconds``), if any.
    retry_after: int | None = None
    #: API Priority and Fairness: a plain-text 429 before authorization, not a Status.
    apf: bool = False
    #: Hold the request (already received, not yet processed) until this is set.
    held: Held | None = None

    def matches(self, verb: str, resource: str) -> bool:
        return (self.verb is None or self.verb == verb) and (
            self.resource is None or self.resource == resource
        )


@dataclass(frozen=True)
class Identity:
    """Who a bearer token authenticates as."""

    user: str
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PolicyRule:
    """One RBAC rule (``rbac.authorization.k8s.io/v1`` PolicyRule, resource part)."""

    verbs: frozenset[str]
    api_groups: frozenset[str]
    resources: frozenset[str]
    resource_names: frozenset[str] = frozenset()

    @classmethod
    def of(cls, rule: Mapping[str, Any]) -> PolicyRule:
        return cls(
            verbs=frozenset(rule.get("verbs") or ()),
            api_groups=frozenset(rule.get("apiGroups") or ()),
            resources=frozenset(rule.get("resources") or ()),
            resource_names=frozenset(rule.get("resourceNames") or ()),
        )

    def allows(self, verb: str, group: str, resource: str, name: str | None) -> bool:
        """The apiserver's RuleAllows: every part matches (``*`` matches anything;
        ``resourceNames`` match only requests that carry one of those names)."""
        return (
            ("*" in self.verbs or verb in self.verbs)
            and ("*" in self.api_groups or group in self.api_groups)
            and ("*" in self.resources or resource in self.resources)
            and (not self.resource_names or (name or "") in self.resource_names)
        )


@dataclass(frozen=True)
class Grant:
    """Rules bound to a subject (a user or a group), in one namespace or cluster-wide."""

    subject: str
    rules: tuple[PolicyRule, ...]
    namespace: str | None = None
    group: bool = False

    def applies(self, identity: Identity, namespace: str) -> bool:
        who = self.subject in identity.groups if self.group else self.subject == identity.user
        return who and (self.namespace is None or self.namespace == namespace)


@dataclass
class _Ownership:
    fields: set[Path_]
    time: str


@dataclass
class _Stored:
    kind: ResourceKind
    obj: dict[str, Any]
    #: (manager, operation) → the fields that manager owns.
    managers: dict[tuple[str, str], _Ownership] = field(default_factory=dict)


class ApiProblem(Exception):
    """Raised inside a handler; becomes a ``Status`` response."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = dict(details) if details else None


def status_body(
    code: int, message: str, *, reason: str | None = None, details: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A ``meta/v1 Status`` failure body as the apiserver sends it."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details:
        body["details"] = dict(details)
    return body


def status_response(problem: ApiProblem) -> JSONResponse:
    headers = {}
    wait = (problem.details or {}).get("retryAfterSeconds")
    if wait:  # as the apiserver's ErrorNegotiated: the Status's delay as a header too
        headers["Retry-After"] = str(wait)
    return JSONResponse(
        status_body(problem.code, problem.message, reason=problem.reason, details=problem.details),
        status_code=problem.code,
        headers=headers,
    )


def _apf_rejection(fault: KubeFault) -> Response:
    """API Priority and Fairness's rejection: Go's http.Error, not a Status."""
    return PlainTextResponse(
        "Too many requests, please try again later.\n",
        status_code=429,
        headers={
            "Retry-After": str(fault.retry_after or 1),
            "X-Content-Type-Options": "nosniff",
            "X-Kubernetes-PF-FlowSchema-UID": "emulator-flow-schema",
            "X-Kubernetes-PF-PriorityLevel-UID": "emulator-priority-level",
        },
    )


class KubernetesEmulator(ServesTLS, Emulator):
    """A tiny kube-apiserver. Namespaces come from `namespaces` (``default`` if None).

    A bearer token (``token``, random by default) is accepted for the user
    ``system:serviceaccount:<namespace>:refresher``; add more with `add_token`.
    `admin_token` authenticates a member of ``system:masters`` (allowed everything).

    With `rbac` (the default) every other user may do only what RBAC rules bound to
    it allow (`apply_rbac`, `grant`): nothing until a test grants it. ``rbac=False``
    allows everything (demos). `version` (``"1.33"``) is what ``/version`` reports
    and decides version-specific wording.
    """

    name = "kubernetes"

    def __init__(
        self,
        *,
        namespaces: Iterable[str] | None = None,
        token: str | None = None,
        user: str | None = None,
        rbac: bool = True,
        version: str = "1.33",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.namespaces: set[str] = set(namespaces if namespaces is not None else ["default"])
        self.objects: dict[tuple[str, str, str], _Stored] = {}
        self.kube_faults: list[KubeFault] = []
        self.forbidden: set[tuple[str, str, str | None, str | None]] = set()
        self.tokens: dict[str, Identity] = {}
        self.rbac = rbac
        self.grants: list[Grant] = []
        self._held: list[Held] = []
        major, _, minor = version.partition(".")
        self.version = (int(major), int(minor))
        self._rv = 1000
        #: Guards the API state (objects, namespaces, rules, tokens); re-entrant because
        #: apply-create authorizes "create" while holding it. Base `_lock` guards the log.
        self._state = threading.RLock()
        first_ns = sorted(self.namespaces)[0] if self.namespaces else "default"
        self.token = token or f"kube-sa-{secrets.token_urlsafe(24)}"
        self.add_token(self.token, user or f"system:serviceaccount:{first_ns}:refresher")
        self.admin_token = f"kube-admin-{secrets.token_urlsafe(24)}"
        self.add_token(self.admin_token, "kubernetes-admin", groups=[SYSTEM_MASTERS])

    # ---------------------------------------------------------------- lifecycle

    def routes(self) -> list[Route]:
        core = "/api/v1/namespaces/{namespace}"
        coord = "/apis/coordination.k8s.io/v1/namespaces/{namespace}"
        every = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        return [
            Route("/version", self._version, methods=["GET"]),
            Route("/api/v1/namespaces/{name}", self._namespace, methods=["GET"]),
            Route(core + "/secrets", self._secrets, methods=every),
            Route(core + "/secrets/{name}", self._secrets, methods=every),
            Route(coord + "/leases", self._leases, methods=every),
            Route(coord + "/leases/{name}", self._leases, methods=every),
        ]

    def app(self) -> Starlette:
        app = super().app()
        app.add_exception_handler(HTTPException, self._http_exception)
        return app

    def stop(self) -> None:
        with self._state:
            for held in self._held:
                held.release()  # let held requests finish
        if self._server is not None:
            # Skip uvicorn's graceful wait for idle keep-alive connections: an
            # emulator going away may drop them (clients see a closed connection).
            self._server.force_exit = True
        super().stop()

    # ---------------------------------------------------------------- test controls

    def add_token(self, token: str, user: str, *, groups: Iterable[str] = ()) -> None:
        """Accept `token` as a bearer credential for `user` (a member of `groups`)."""
        with self._state:
            self.tokens[token] = Identity(user, frozenset(groups))
        with self._lock:
            self.issued.append(token)  # the leak guard checks logs never show it

    def grant(
        self,
        subject: str,
        rules: Iterable[Mapping[str, Any]],
        *,
        namespace: str | None = None,
        group: bool = False,
    ) -> None:
        """Bind RBAC `rules` (PolicyRule dicts) to a user (or a group), in `namespace`
        (a Role + RoleBinding) or cluster-wide (None: a ClusterRole + binding)."""
        grant = Grant(subject, tuple(PolicyRule.of(r) for r in rules), namespace, group)
        with self._state:
            self.grants.append(grant)

    def apply_rbac(self, manifests: Iterable[Mapping[str, Any]]) -> int:
        """Install Roles, ClusterRoles and their bindings as a cluster would (e.g. what a
        Helm chart renders); other kinds are ignored. Returns the bindings installed."""
        roles: dict[tuple[str, str | None], list[Mapping[str, Any]]] = {}
        bindings = []
        for manifest in manifests:
            kind = manifest.get("kind")
            meta = manifest.get("metadata") or {}
            if kind in ("Role", "ClusterRole"):
                scope = meta.get("namespace") if kind == "Role" else None
                roles[(f"{kind}/{meta.get('name')}", scope)] = list(manifest.get("rules") or [])
            elif kind in ("RoleBinding", "ClusterRoleBinding"):
                bindings.append(manifest)
        installed = 0
        for binding in bindings:
            meta = binding.get("metadata") or {}
            namespace = meta.get("namespace") if binding["kind"] == "RoleBinding" else None
            ref = binding.get("roleRef") or {}
            scope = namespace if ref.get("kind") == "Role" else None
            rules = roles.get((f"{ref.get('kind')}/{ref.get('name')}", scope))
            if rules is None:
                raise ValueError(f"{binding['kind']} {meta.get('name')!r}: no role {ref!r}")
            for subject in binding.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount":
                    sa_ns = subject.get("namespace") or namespace
                    who, group = f"system:serviceaccount:{sa_ns}:{subject['name']}", False
                else:
                    who, group = subject["name"], subject.get("kind") == "Group"
                self.grant(who, rules, namespace=namespace, group=group)
                installed += 1
        return installed

    def revoke_token(self, token: str) -> None:
        with self._state:
            self.tokens.pop(token, None)

    def add_namespace(self, namespace: str) -> None:
        with self._state:
            self.namespaces.add(namespace)

    def forbid(
        self, verb: str, resource: str, *, namespace: str | None = None, name: str | None = None
    ) -> None:
        """Answer 403 to `verb` on `resource` (optionally only in a namespace / for a name)."""
        with self._state:
            self.forbidden.add((verb, resource, namespace, name))

    def allow(self, verb: str | None = None, resource: str | None = None) -> None:
        """Lift `forbid` rules (all of them when called without arguments)."""
        with self._state:
            self.forbidden = {
                rule
                for rule in self.forbidden
                if not (
                    (verb is None or rule[0] == verb) and (resource is None or rule[1] == resource)
                )
            }

    def fail(
        self,
        status: int = 500,
        *,
        count: int = 1,
        verb: str | None = None,
        resource: str | None = None,
        message: str | None = None,
        delay: float = 0.0,
        passthrough: bool = False,
    ) -> None:
        """Answer the next `count` matching requests with `status` (a Status body)."""
        with self._state:
            self.kube_faults.append(
                KubeFault(
                    status=status,
                    count=count,
                    verb=verb,
                    resource=resource,
                    message=message,
                    delay=delay,
                    passthrough=passthrough,
                )
            )

    def throttle(
        self,
        count: int = 1,
        *,
        retry_after: int = 1,
        verb: str | None = None,
        resource: str | None = None,
    ) -> None:
        """API Priority and Fairness rejects the next `count` matching requests: 429,
        ``text/plain``, ``Retry-After``, before authorization (not a Status)."""
        with self._state:
            self.kube_faults.append(
                KubeFault(
                    status=429,
                    count=count,
                    verb=verb,
                    resource=resource,
                    retry_after=retry_after,
                    apf=True,
                )
            )

    def slow(
        self,
        seconds: float,
        *,
        count: int = 1,
        verb: str | None = None,
        resource: str | None = None,
    ) -> None:
        """Answer the next `count` matching requests normally, but `seconds` late."""
        self.fail(200, count=count, verb=verb, resource=resource, delay=seconds, passthrough=True)

    def hold(self, *, verb: str | None = None, resource: str | None = None) -> Held:
        """Keep the next matching request on the server, unprocessed, until released
        (a request in flight while the world moves on)."""
        held = Held()
        with self._state:
            self._held.append(held)
            self.kube_faults.append(
                KubeFault(status=200, verb=verb, resource=resource, passthrough=True, held=held)
            )
        return held

    def conflict(self, count: int = 1, *, verb: str = "patch", resource: str = "secrets") -> None:
        """One-shot 409s: "the object has been modified" for the next `count` writes."""
        self.fail(409, count=count, verb=verb, resource=resource)

    def clear_faults(self) -> None:
        super().clear_faults()
        with self._state:
            self.kube_faults.clear()

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object as the API would return it (a copy), or None."""
        with self._state:
            stored = self.objects.get((resource, namespace, name))
            return self._render(stored) if stored is not None else None

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("secrets", namespace, name)

    def lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("leases", namespace, name)

    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        """A Secret's data, base64-decoded (``{}`` when the Secret does not exist)."""
        obj = self.secret(namespace, name)
        if obj is None:
            return {}
        return {
            k: base64.b64decode(v).decode(errors="replace")
            for k, v in (obj.get("data") or {}).items()
        }

    def managers(self, resource: str, namespace: str, name: str) -> dict[str, set[str]]:
        """``manager → {".data.key", ".metadata.labels.x", …}`` for one object."""
        with self._state:
            stored = self.objects.get((resource, namespace, name))
            if stored is None:
                return {}
            out: dict[str, set[str]] = {}
            for (manager, _op), owned in stored.managers.items():
                out.setdefault(manager, set()).update("." + ".".join(p) for p in owned.fields)
            return out

    def put_secret(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        secret_type: str = "Opaque",
        manager: str = "kubectl-edit",
    ) -> None:
        """Write keys as another tool would (an Update by `manager`), creating the Secret."""
        with self._state:
            if namespace not in self.namespaces:
                raise KeyError(f"namespace {namespace!r} does not exist")
            key = ("secrets", namespace, name)
            stored = self.objects.get(key)
            encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            if stored is None:
                obj: dict[str, Any] = {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": namespace},
                    "type": secret_type,
                    "data": encoded,
                }
                if labels:
                    obj["metadata"]["labels"] = dict(labels)
                if annotations:
                    obj["metadata"]["annotations"] = dict(annotations)
                self._insert(SECRETS, namespace, name, obj, manager=manager, operation="Update")
            else:
                patch: dict[str, Any] = {"data": encoded}
                if labels or annotations:
                    patch["metadata"] = {}
                    if labels:
                        patch["metadata"]["labels"] = dict(labels)
                    if annotations:
                        patch["metadata"]["annotations"] = dict(annotations)
                new = _merge_patch(stored.obj, patch)
                self._commit_update(stored, new, manager)

    def calls(
        self,
        *,
        method: str | None = None,
        resource: str | None = None,
        status: int | None = None,
    ) -> list[RecordedRequest]:
        """Recorded requests, filtered by HTTP method, resource plural and status."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method)
                and (resource is None or _resource_of(r.path) == resource)
                and (status is None or r.status == status)
            ]

    def write_kubeconfig(
        self,
        path: str | Path,
        *,
        namespace: str = "default",
        token: str | None = None,
        context: str = "emulator",
        user: str = "refresher",
    ) -> Path:
        """Write a kubeconfig pointing at this emulator with a token user; returns the path."""
        path = Path(path)
        cluster: dict[str, Any] = {"server": self.url}
        if self.tls:
            assert self.ca_pem is not None
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": cluster}],
            "users": [{"name": user, "user": {"token": token or self.token}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": context, "user": user, "namespace": namespace},
                }
            ],
            "current-context": context,
        }
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        path.chmod(0o600)
        return path

    def write_service_account(
        self, directory: str | Path, *, namespace: str = "default", token: str | None = None
    ) -> dict[str, str]:
        """Lay out a fake ``/var/run/secrets/kubernetes.io/serviceaccount`` in `directory`
        (``token``, ``ca.crt``, ``namespace``) and return the ``KUBERNETES_SERVICE_*``
        environment a pod would see. Needs ``tls=True`` (in-cluster config is HTTPS)."""
        if not self.tls or self.ca_pem is None:
            raise RuntimeError("in-cluster config needs the emulator started with tls=True")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(token or self.token)
        (directory / "ca.crt").write_bytes(self.ca_pem)
        (directory / "namespace").write_text(namespace)
        return {"KUBERNETES_SERVICE_HOST": self.host, "KUBERNETES_SERVICE_PORT": str(self.port)}

    # ---------------------------------------------------------------- HTTP entry points

    async def _version(self, request: Request) -> Response:
        major, minor = self.version
        return JSONResponse(
            {
                "major": str(major),
                "minor": str(minor),
                "gitVersion": f"v{major}.{minor}.0-refresher-emulator",
            }
        )

    async def _namespace(self, request: Request) -> Response:
        name = request.path_params["name"]
        with self._state:
            exists = name in self.namespaces
        if not exists:
            problem = ApiProblem(
                404, f'namespaces "{name}" not found', details={"name": name, "kind": "namespaces"}
            )
            return status_response(problem)
        return JSONResponse(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name},
                "status": {"phase": "Active"},
            }
        )

    async def _secrets(self, request: Request) -> Response:
        return await self._serve(request, SECRETS)

    async def _leases(self, request: Request) -> Response:
        return await self._serve(request, LEASES)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        message = (
            "the server could not find the requested resource"
            if code == 404
            else f"the server does not allow this method on the requested resource ({code})"
        )
        return status_response(ApiProblem(code, message))

    async def _serve(self, request: Request, kind: ResourceKind) -> Response:
        arrived = self.clock.now()
        body = await request.body()
        namespace = request.path_params["namespace"]
        name: str | None = request.path_params.get("name")
        verb = _verb(request.method, name)
        identity = self._authenticate(request)
        response: Response
        try:
            if identity is None:
                raise ApiProblem(401, "Unauthorized")
            # The filter chain's order: authentication, API Priority and Fairness,
            # authorization, then the handler.
            throttled = self._take_fault(verb, kind.plural, apf=True)
            if throttled is not None:
                response = _apf_rejection(throttled)
            else:
                if name is None and verb not in ("list", "create"):
                    raise ApiProblem(405, f"the emulator does not support {verb} on a collection")
                self._authorize(identity, verb, kind, namespace, name)
                fault = self._take_fault(verb, kind.plural)
                if fault is not None:
                    if fault.held is not None:
                        fault.held.arrived.set()
                        loop = asyncio.get_running_loop()
                        await loop.run_in_executor(None, fault.held.released.wait, 30.0)
                    if fault.delay:
                        await asyncio.sleep(fault.delay)
                    if not fault.passthrough:
                        raise self._fault_problem(fault, kind, name)
                response = self._dispatch(
                    request,
                    body,
                    kind=kind,
                    verb=verb,
                    identity=identity,
                    namespace=namespace,
                    name=name,
                )
        except ApiProblem as problem:
            response = status_response(problem)
        self._record(request, body, response.status_code, identity, arrived)
        return response

    def _record(
        self,
        request: Request,
        body: bytes,
        status: int,
        identity: Identity | None,
        arrived: float,
    ) -> None:
        """Log a request at the moment it arrived (a slow answer is still stamped
        with when it was sent)."""
        entry = RecordedRequest(
            at=arrived,
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            status=status,
            client=identity.user if identity is not None else None,
        )
        with self._lock:
            self.requests.append(entry)

    # ---------------------------------------------------------------- auth and faults

    def _authenticate(self, request: Request) -> Identity | None:
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            return None
        with self._state:
            return self.tokens.get(credential.strip())

    def allowed(
        self, identity: Identity, verb: str, kind: ResourceKind, namespace: str, name: str | None
    ) -> bool:
        """What the authorizer decides: `forbid` rules deny, ``system:masters`` may do
        anything, otherwise (with `rbac`) some bound rule must allow the request."""
        with self._state:
            if any(
                rule_verb == verb
                and rule_resource == kind.plural
                and (rule_ns is None or rule_ns == namespace)
                and (rule_name is None or rule_name == name)
                for rule_verb, rule_resource, rule_ns, rule_name in self.forbidden
            ):
                return False
            if not self.rbac or SYSTEM_MASTERS in identity.groups:
                return True
            return any(
                rule.allows(verb, kind.group, kind.plural, name)
                for grant in self.grants
                if grant.applies(identity, namespace)
                for rule in grant.rules
            )

    def _authorize(
        self,
        identity: Identity,
        verb: str,
        kind: ResourceKind,
        namespace: str,
        name: str | None,
        *,
        in_handler: bool = False,
    ) -> None:
        """403 unless allowed. `in_handler`: the ``create`` check an apply or a PUT
        makes when the object is absent, which Kubernetes <= 1.31 words without the
        user and verb (``secrets "x" is forbidden: ``)."""
        if self.allowed(identity, verb, kind, namespace, name):
            return
        what = f'{kind.qualified} "{name}"' if name else kind.qualified
        if in_handler and self.version < (1, 32):
            message = f"{what} is forbidden: "
        else:
            message = (
                f'{what} is forbidden: User "{identity.user}" cannot {verb} resource '
                f'"{kind.plural}" in API group "{kind.group}" in the namespace "{namespace}"'
            )
        raise ApiProblem(
            403,
            message,
            details={"name": name or "", "group": kind.group, "kind": kind.plural},
        )

    def _take_fault(self, verb: str, resource: str, *, apf: bool = False) -> KubeFault | None:
        with self._state:
            for fault in self.kube_faults:
                if fault.apf == apf and fault.matches(verb, resource):
                    fault.count -= 1
                    if fault.count <= 0:
                        self.kube_faults.remove(fault)
                    return fault
        return None

    def _fault_problem(self, fault: KubeFault, kind: ResourceKind, name: str | None) -> ApiProblem:
        details: dict[str, Any] = {"name": name or "", "group": kind.group, "kind": kind.plural}
        if fault.message is not None:
            message = fault.message
        elif fault.status == 409:
            message = (
                f'Operation cannot be fulfilled on {kind.qualified} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again"
            )
        elif fault.status == 429:
            message = "Too many requests, please try again later."
            details["retryAfterSeconds"] = fault.retry_after or 1
        elif fault.status == 504:
            message = "The request did not complete in time"
        else:
            message = f"injected fault: HTTP {fault.status}"
        return ApiProblem(fault.status, message, details=details)

    # ---------------------------------------------------------------- verbs

    def _dispatch(
        self,
        request: Request,
        body: bytes,
        *,
        kind: ResourceKind,
        verb: str,
        identity: Identity,
        namespace: str,
        name: str | None,
    ) -> Response:
        params = request.query_params
        if params.get("dryRun"):
            raise ApiProblem(400, "dryRun is not supported by the emulator")
        manager = params.get("fieldManager") or _default_manager(request)
        if len(manager) > 128:
            raise ApiProblem(422, "fieldManager: Too long: must have at most 128 bytes")
        with self._state:
            if verb == "list":
                return JSONResponse(self._list(kind, namespace))
            if verb == "create":
                obj = _parse_json(body, kind)
                return JSONResponse(self._create(kind, namespace, obj, manager), status_code=201)
            assert name is not None
            if verb == "get":
                return JSONResponse(self._render(self._require(kind, namespace, name)))
            if verb == "update":
                obj = _parse_json(body, kind)
                result, created = self._update(
                    kind, namespace, name, obj, manager, identity=identity
                )
                return JSONResponse(result, status_code=201 if created else 200)
            if verb == "delete":
                stored = self._require(kind, namespace, name)
                del self.objects[(kind.plural, namespace, stored.obj["metadata"]["name"])]
                return JSONResponse(
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": {
                            "name": name,
                            "kind": kind.plural,
                            "uid": stored.obj["metadata"]["uid"],
                        },
                    }
                )
            content_type = request.headers.get("content-type", "").split(";")[0].strip()
            if content_type == "application/apply-patch+yaml":
                if not params.get("fieldManager"):
                    raise ApiProblem(
                        422,
                        'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
                        "is required for apply patch",
                    )
                force = params.get("force", "false").lower() == "true"
                applied = _parse_yaml(body)
                obj, created = self._apply(
                    kind, namespace, name, applied, manager=manager, force=force, identity=identity
                )
                return JSONResponse(obj, status_code=201 if created else 200)
            if content_type in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ):
                patch = _parse_json(body, kind, require_kind=False)
                return JSONResponse(self._merge(kind, namespace, name, patch, manager))
            raise ApiProblem(
                415,
                f"the body of the request was in an unknown format - accepted media types include: "
                f"application/merge-patch+json, application/strategic-merge-patch+json, "
                f"application/apply-patch+yaml (got {content_type or 'none'})",
            )

    def _list(self, kind: ResourceKind, namespace: str) -> dict[str, Any]:
        items = [
            self._render(stored)
            for (plural, ns, _), stored in sorted(self.objects.items())
            if plural == kind.plural and ns == namespace
        ]
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _require(self, kind: ResourceKind, namespace: str, name: str | None) -> _Stored:
        stored = self.objects.get((kind.plural, namespace, name or ""))
        if stored is None:
            raise _not_found(kind, name or "")
        return stored

    def _create(
        self, kind: ResourceKind, namespace: str, obj: dict[str, Any], manager: str
    ) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiProblem(400, "metadata must be an object")
        self._check_namespace_exists(namespace)
        if meta.get("namespace") not in (None, namespace):
            raise ApiProblem(
                400,
                "the namespace of the provided object does not match the namespace sent on the "
                "request",
            )
        name = meta.get("name")
        if not name:
            raise _invalid(kind, "", "metadata.name", "", "name or generateName is required")
        if (kind.plural, namespace, name) in self.objects:
            raise ApiProblem(
                409,
                f'{kind.qualified} "{name}" already exists',
                reason="AlreadyExists",
                details={"name": name, "group": kind.group, "kind": kind.plural},
            )
        stored = self._insert(kind, namespace, name, obj, manager=manager, operation="Update")
        return self._render(stored)

    def _update(
        self,
        kind: ResourceKind,
        namespace: str,
        name: str,
        obj: dict[str, Any],
        manager: str,
        *,
        identity: Identity,
    ) -> tuple[dict[str, Any], bool]:
        meta = obj.get("metadata") or {}
        if not isinstance(meta, dict) or meta.get("name") != name:
            raise ApiProblem(400, "the name of the object does not match the name on the URL")
        if meta.get("namespace") not in (None, namespace):
            raise ApiProblem(
                400,
                "the namespace of the provided object does not match the namespace sent on the "
                "request",
            )
        stored = self.objects.get((kind.plural, namespace, name))
        if stored is None:
            if not kind.create_on_update:
                raise _not_found(kind, name)
            # A Lease may be created with a PUT, authorized as "create" as well.
            self._check_namespace_exists(namespace)
            self._authorize(identity, "create", kind, namespace, name, in_handler=True)
            created = self._insert(
                kind,
                namespace,
                name,
                _strip_system(obj, keep_meta=("name", *_USER_META)),
                manager=manager,
                operation="Update",
            )
            return self._render(created), True
        wanted = meta.get("resourceVersion")
        if not wanted and not kind.unconditional_update:
            raise ApiProblem(
                422,
                f'{kind.qualified} "{name}" is invalid: metadata.resourceVersion: Invalid value: '
                "0: must be specified for an update",
                details={
                    "name": name,
                    "group": kind.group,
                    "kind": kind.plural,
                    "causes": [
                        {
                            "reason": "FieldValueInvalid",
                            "message": "Invalid value: 0: must be specified for an update",
                            "field": "metadata.resourceVersion",
                        }
                    ],
                },
            )
        self._check_resource_version(stored, wanted, name)
        new = _strip_system(obj)
        new["metadata"] = {
            **_system_meta(stored.obj),
            **{k: v for k, v in meta.items() if k in _USER_META},
        }
        self._commit_update(stored, new, manager)
        return self._render(stored), False

    def _merge(
        self, kind: ResourceKind, namespace: str, name: str, patch: dict[str, Any], manager: str
    ) -> dict[str, Any]:
        stored = self._require(kind, namespace, name)
        meta = patch.get("metadata") or {}
        if isinstance(meta, dict):
            self._check_resource_version(stored, meta.get("resourceVersion"), name)
            if meta.get("name") not in (None, name):
                raise ApiProblem(400, "the name of the object does not match the name on the URL")
        new = _merge_patch(stored.obj, _strip_system(patch, keep_meta=_USER_META))
        new["metadata"] = {
            **_system_meta(stored.obj),
            **{k: v for k, v in (new.get("metadata") or {}).items() if k in _USER_META},
        }
        self._commit_update(stored, new, manager)
        return self._render(stored)

    def _apply(
        self,
        kind: ResourceKind,
        namespace: str,
        name: str,
        applied: Any,
        *,
        manager: str,
        force: bool,
        identity: Identity,
    ) -> tuple[dict[str, Any], bool]:
        if not isinstance(applied, dict):
            raise ApiProblem(400, "the applied configuration must be an object")
        if applied.get("apiVersion") != kind.api_version or applied.get("kind") != kind.kind:
            raise ApiProblem(
                400,
                f"apiVersion and kind must be {kind.api_version!r} and {kind.kind!r} in an apply "
                f"request (got {applied.get('apiVersion')!r}, {applied.get('kind')!r})",
            )
        meta = applied.get("metadata") or {}
        if not isinstance(meta, dict) or meta.get("name") != name:
            raise ApiProblem(400, "the name of the object does not match the name on the URL")
        if meta.get("namespace") not in (None, namespace):
            raise ApiProblem(
                400,
                "the namespace of the provided object does not match the namespace sent on the "
                "request",
            )
        if "managedFields" in meta:
            raise ApiProblem(400, "metadata.managedFields must be nil in an apply request")
        applied = _normalise(kind, applied)
        stored = self.objects.get((kind.plural, namespace, name))
        if stored is None:
            self._check_namespace_exists(namespace)
            # Creating through apply is authorized as "create" as well as "patch", with
            # the object's name; a resourceVersion is no precondition on a create.
            self._authorize(identity, "create", kind, namespace, name, in_handler=True)
            obj = _strip_system(applied, keep_meta=("name", *_USER_META))
            stored = self._insert(kind, namespace, name, obj, manager=manager, operation="Apply")
            return self._render(stored), True
        self._check_resource_version(stored, meta.get("resourceVersion"), name)
        live = _fields(stored.obj)
        wanted = _fields(applied)
        key = (manager, "Apply")
        conflicts: list[tuple[str, Path_]] = []
        for path, value in wanted.items():
            if live.get(path, _MISSING) == value:
                continue
            for (other, op), owned in stored.managers.items():
                if (other, op) != key and path in owned.fields:
                    conflicts.append((other, path))
        if conflicts and not force:
            causes = [
                {
                    "type": "FieldManagerConflict",
                    "message": f'conflict with "{other}" using {kind.api_version}',
                    "field": "." + ".".join(path),
                }
                for other, path in conflicts
            ]
            listing = "\n".join(
                f'- conflict with "{other}" using {kind.api_version}: .{".".join(path)}'
                for other, path in conflicts
            )
            raise ApiProblem(
                409,
                f"Apply failed with {len(conflicts)} conflict{'s' if len(conflicts) > 1 else ''}:\n"
                + listing,
                details={"name": name, "group": kind.group, "kind": kind.plural, "causes": causes},
            )
        new = copy.deepcopy(stored.obj)
        for path, value in wanted.items():
            _set_path(new, path, value)
        previously = stored.managers.get(key)
        for path in (previously.fields if previously else set()) - set(wanted):
            owned_elsewhere = any(
                path in owned.fields for k, owned in stored.managers.items() if k != key
            )
            if not owned_elsewhere and path != ("type",):
                _delete_path(new, path)
        self._validate(kind, new, stored.obj)
        changed = _comparable(new) != _comparable(stored.obj)
        now = self._timestamp()
        # Forced fields change hands; fields applied with an equal value are shared.
        for path, value in wanted.items():
            if live.get(path, _MISSING) != value:
                for other_key, owned in stored.managers.items():
                    if other_key != key:
                        owned.fields.discard(path)
        # A no-op apply keeps its manager's timestamp (and so the whole object).
        time = now if changed or previously is None else previously.time
        stored.managers[key] = _Ownership(set(wanted), time)
        self._prune_ownership(stored, new)
        if changed:
            stored.obj = new
            self._bump(stored)
        return self._render(stored), False

    # ---------------------------------------------------------------- storage helpers

    def _check_namespace_exists(self, namespace: str) -> None:
        if namespace not in self.namespaces:
            raise ApiProblem(
                404,
                f'namespaces "{namespace}" not found',
                details={"name": namespace, "kind": "namespaces"},
            )

    def _check_resource_version(self, stored: _Stored, wanted: object, name: str) -> None:
        if wanted and str(wanted) != stored.obj["metadata"]["resourceVersion"]:
            raise ApiProblem(
                409,
                f'Operation cannot be fulfilled on {stored.kind.qualified} "{name}": the object '
                "has been modified; please apply your changes to the latest version and try again",
                details={"name": name, "group": stored.kind.group, "kind": stored.kind.plural},
            )

    def _insert(
        self,
        kind: ResourceKind,
        namespace: str,
        name: str,
        obj: dict[str, Any],
        *,
        manager: str,
        operation: str,
    ) -> _Stored:
        if not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
            raise _invalid(kind, name, "metadata.name", name, "a lowercase RFC 1123 subdomain")
        obj = _normalise(kind, copy.deepcopy(obj))
        if kind is SECRETS and operation == "Update":
            # Defaulting happens while decoding, before the field manager compares the
            # objects: the creator of an Update owns a defaulted ``type`` too. An
            # applier owns only what it applied.
            obj.setdefault("type", "Opaque")
        owned = set(_fields({k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}))
        obj["apiVersion"] = kind.api_version
        obj["kind"] = kind.kind
        user_meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k in _USER_META}
        obj["metadata"] = {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "resourceVersion": "0",
            "creationTimestamp": _rfc3339(self.now()),
            **user_meta,
        }
        obj.pop("status", None)
        if kind is SECRETS:
            obj.setdefault("type", "Opaque")
        self._validate(kind, obj, None)
        stored = _Stored(kind=kind, obj=obj)
        stored.managers[(manager, operation)] = _Ownership(owned, self._timestamp())
        self.objects[(kind.plural, namespace, name)] = stored
        self._bump(stored)
        return stored

    def _commit_update(self, stored: _Stored, new: dict[str, Any], manager: str) -> None:
        new = _normalise(stored.kind, new)
        if stored.kind is SECRETS:
            new.setdefault("type", stored.obj.get("type", "Opaque"))
        self._validate(stored.kind, new, stored.obj)
        before = _fields(stored.obj)
        after = _fields(new)
        changed = {p for p, v in after.items() if before.get(p, _MISSING) != v}
        key = (manager, "Update")
        for other_key, owned in stored.managers.items():
            if other_key != key:
                owned.fields -= changed
        if changed:
            entry = stored.managers.setdefault(key, _Ownership(set(), self._timestamp()))
            entry.fields |= changed
            entry.time = self._timestamp()
        self._prune_ownership(stored, new)
        if _comparable(new) != _comparable(stored.obj):
            stored.obj = new
            self._bump(stored)

    def _prune_ownership(self, stored: _Stored, obj: dict[str, Any]) -> None:
        present = set(_fields(obj))
        for key in list(stored.managers):
            stored.managers[key].fields &= present
            if not stored.managers[key].fields:
                del stored.managers[key]

    def _bump(self, stored: _Stored) -> None:
        self._rv += 1
        stored.obj["metadata"]["resourceVersion"] = str(self._rv)

    def _timestamp(self) -> str:
        return _rfc3339(self.now())

    def _render(self, stored: _Stored) -> dict[str, Any]:
        obj = copy.deepcopy(stored.obj)
        obj["metadata"]["managedFields"] = [
            {
                "manager": manager,
                "operation": operation,
                "apiVersion": stored.kind.api_version,
                "time": owned.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": _fields_v1(owned.fields),
            }
            for (manager, operation), owned in sorted(stored.managers.items())
        ]
        return obj

    def _validate(
        self, kind: ResourceKind, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> None:
        name = (obj.get("metadata") or {}).get("name", "")
        meta = obj.get("metadata") or {}
        for key, value in (meta.get("labels") or {}).items():
            problem = _qualified_name_problem(key)
            if problem:
                raise _invalid(kind, name, "metadata.labels", key, problem)
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                raise _invalid(kind, name, "metadata.labels", str(value), "a valid label value")
        for key, value in (meta.get("annotations") or {}).items():
            problem = _qualified_name_problem(key)
            if problem:
                raise _invalid(kind, name, "metadata.annotations", key, problem)
            if not isinstance(value, str):
                raise ApiProblem(400, f"annotation {key!r} must be a string")
        if kind is SECRETS:
            self._validate_secret(obj, old, name)
        elif kind is LEASES:
            _validate_lease(obj, name)

    def _validate_secret(self, obj: dict[str, Any], old: dict[str, Any] | None, name: str) -> None:
        """ValidateSecretUpdate / ValidateSecret: every problem found, in one 422."""
        data = obj.get("data") or {}
        if not isinstance(data, dict):
            raise ApiProblem(400, "Secret.data must be an object")
        decoded: dict[str, bytes] = {}
        for key, value in data.items():
            if not isinstance(value, str):
                raise ApiProblem(
                    400,
                    f'Secret in version "v1" cannot be handled as a Secret: data[{key}] must be '
                    "a string",
                )
            try:
                decoded[key] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ApiProblem(
                    400,
                    'Secret in version "v1" cannot be handled as a Secret: illegal base64 data',
                ) from None
        errors: list[_FieldError] = []
        secret_type = obj.get("type") or "Opaque"
        if old is not None:
            if secret_type != (old.get("type") or "Opaque"):
                errors.append(
                    _FieldError("type", "Invalid value", secret_type, "field is immutable")
                )
            if old.get("immutable") and obj.get("data") != old.get("data"):
                errors.append(
                    _FieldError(
                        "data", "Forbidden", None, "field is immutable when `immutable` is set"
                    )
                )
        for key in sorted(decoded):
            errors.extend(
                _FieldError(f"data[{key}]", "Invalid value", key, message)
                for message in _config_key_problems(key)
            )
        if sum(len(v) for v in decoded.values()) > MAX_SECRET_SIZE:
            errors.append(
                _FieldError(
                    "data", "Too long", None, f"may not be more than {MAX_SECRET_SIZE} bytes"
                )
            )
        errors.extend(_secret_type_errors(secret_type, decoded, obj))
        if errors:
            raise _invalid_all(SECRETS, name, errors)


# ---------------------------------------------------------------------------- helpers


def _verb(method: str, name: str | None) -> str:
    if method == "GET":
        return "get" if name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]


def _resource_of(path: str) -> str | None:
    parts = path.strip("/").split("/")
    if "namespaces" in parts:
        index = parts.index("namespaces")
        if len(parts) > index + 2:
            return parts[index + 2]
        return "namespaces"
    return None


def _default_manager(request: Request) -> str:
    # The apiserver derives a default field manager from the User-Agent.
    agent = request.headers.get("user-agent", "unknown")
    return agent.split("/")[0][:128] or "unknown"


def _not_found(kind: ResourceKind, name: str) -> ApiProblem:
    return ApiProblem(
        404,
        f'{kind.qualified} "{name}" not found',
        details={"name": name, "group": kind.group, "kind": kind.plural},
    )


def _invalid(kind: ResourceKind, name: str, path: str, value: str, detail: str) -> ApiProblem:
    return ApiProblem(
        422,
        f'{kind.kind} "{name}" is invalid: {path}: Invalid value: "{value}": {detail}',
        details={
            "name": name,
            "group": kind.group,
            "kind": kind.kind,
            "causes": [{"reason": "FieldValueInvalid", "message": detail, "field": path}],
        },
    )


@dataclass(frozen=True)
class _FieldError:
    """One field.Error: ``<field>: <type>[: <value>][: <detail>]``."""

    field: str
    type: str
    value: str | None
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.field}: {self.type}"
        if self.value is not None:
            text += f": {json.dumps(self.value)}"
        return f"{text}: {self.detail}" if self.detail else text


def _invalid_all(kind: ResourceKind, name: str, errors: list[_FieldError]) -> ApiProblem:
    """NewInvalid: one error as is, several as ``[a, b]``."""
    listed = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
    qualified = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
    return ApiProblem(
        422,
        f'{qualified} "{name}" is invalid: {listed}',
        details={
            "name": name,
            "group": kind.group,
            "kind": kind.kind,
            "causes": [
                {
                    "reason": "Field" + e.type.title().replace(" ", ""),
                    "message": str(e).split(": ", 1)[1],
                    "field": e.field,
                }
                for e in errors
            ],
        },
    )


def _config_key_problems(key: str) -> list[str]:
    """apimachinery's IsConfigMapKey."""
    problems = []
    if len(key) > 253:
        problems.append("must be no more than 253 characters")
    if not _CONFIG_KEY.match(key):
        problems.append(_CONFIG_KEY_MESSAGE)
    if key == ".":
        problems.append("must not be '.'")
    elif key == "..":
        problems.append("must not be '..'")
    elif key.startswith(".."):
        problems.append("must not start with '..'")
    return problems


def _secret_type_errors(
    secret_type: str, data: Mapping[str, bytes], obj: Mapping[str, Any]
) -> list[_FieldError]:
    """The keys (and contents) ValidateSecret requires of each built-in type."""
    if secret_type == "kubernetes.io/service-account-token":
        notes = (obj.get("metadata") or {}).get("annotations") or {}
        if not notes.get("kubernetes.io/service-account.name"):
            return [
                _FieldError(
                    "metadata.annotations[kubernetes.io/service-account.name]",
                    "Required value",
                    None,
                )
            ]
    elif secret_type in ("kubernetes.io/dockercfg", "kubernetes.io/dockerconfigjson"):
        key = ".dockercfg" if secret_type == "kubernetes.io/dockercfg" else ".dockerconfigjson"
        if key not in data:
            return [_FieldError(f"data[{key}]", "Required value", None)]
        try:
            if not isinstance(json.loads(data[key]), dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            return [
                _FieldError(f"data[{key}]", "Invalid value", "<secret contents redacted>", str(exc))
            ]
    elif secret_type == "kubernetes.io/basic-auth":
        if "username" not in data and "password" not in data:
            return [
                _FieldError("data[username]", "Required value", None),
                _FieldError("data[password]", "Required value", None),
            ]
    elif secret_type == "kubernetes.io/ssh-auth":
        if not data.get("ssh-privatekey"):
            return [_FieldError("data[ssh-privatekey]", "Required value", None)]
    elif secret_type == "kubernetes.io/tls":
        return [
            _FieldError(f"data[{key}]", "Required value", None)
            for key in ("tls.crt", "tls.key")
            if key not in data
        ]
    return []


def _qualified_name_problem(key: str) -> str | None:
    prefix, slash, local = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "prefix part must be a lowercase RFC 1123 subdomain"
    if not local or len(local) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME.match(local):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start "
            "and end with an alphanumeric character"
        )
    return None


def _validate_lease(obj: dict[str, Any], name: str) -> None:
    spec = obj.get("spec") or {}
    if not isinstance(spec, dict):
        raise ApiProblem(400, "Lease.spec must be an object")
    for key in ("acquireTime", "renewTime"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, str) or not _MICRO_TIME.match(value)):
            # What the apiserver's MicroTime decoder (time.Parse with RFC3339Micro) says.
            raise ApiProblem(
                400,
                f'Lease in version "v1" cannot be handled as a Lease: parsing time "{value}" as '
                f'"{_MICRO_LAYOUT}": cannot parse as ".000000"',
            )
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and (not isinstance(duration, int) or duration <= 0):
        raise _invalid(
            LEASES, name, "spec.leaseDurationSeconds", str(duration), "must be greater than 0"
        )
    transitions = spec.get("leaseTransitions")
    if transitions is not None and (not isinstance(transitions, int) or transitions < 0):
        raise _invalid(
            LEASES,
            name,
            "spec.leaseTransitions",
            str(transitions),
            "must be greater than or equal to 0",
        )


def _parse_json(body: bytes, kind: ResourceKind, *, require_kind: bool = True) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise ApiProblem(
            400,
            f'{kind.kind} in version "{kind.version}" cannot be handled as a {kind.kind}: {exc}',
        ) from None
    if not isinstance(obj, dict):
        raise ApiProblem(400, "the request body must be a JSON object")
    if require_kind and obj.get("kind") not in (None, kind.kind):
        raise ApiProblem(400, f"the body kind {obj.get('kind')!r} does not match {kind.kind!r}")
    return obj


def _parse_yaml(body: bytes) -> Any:
    try:
        return yaml.safe_load(body)
    except yaml.YAMLError as exc:
        raise ApiProblem(400, f"error decoding YAML: {exc}") from None


def _normalise(kind: ResourceKind, obj: dict[str, Any]) -> dict[str, Any]:
    """stringData → data (base64), as the apiserver does on every write."""
    obj = copy.deepcopy(obj)
    if kind is SECRETS:
        string_data = obj.pop("stringData", None)
        if isinstance(string_data, dict) and string_data:
            data = obj.setdefault("data", {}) or {}
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data
    return obj


def _strip_system(obj: dict[str, Any], *, keep_meta: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {k: copy.deepcopy(v) for k, v in obj.items() if k != "status"}
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        out["metadata"] = {k: copy.deepcopy(v) for k, v in meta.items() if k in keep_meta}
    return out


def _system_meta(obj: dict[str, Any]) -> dict[str, Any]:
    """The metadata only the server sets (name, uid, resourceVersion, ...)."""
    meta = obj["metadata"]
    return {
        k: meta[k]
        for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
        if k in meta
    }


def _fields(obj: Mapping[str, Any]) -> dict[Path_, Any]:
    """The object's owned-field granularity: labels, annotations, map entries, scalars."""
    out: dict[Path_, Any] = {}
    meta = obj.get("metadata") or {}
    for section in ("labels", "annotations"):
        for key, value in (meta.get(section) or {}).items():
            out[("metadata", section, key)] = value
    for top, value in obj.items():
        if top in ("apiVersion", "kind", "metadata", "status"):
            continue
        if isinstance(value, dict):
            for key, inner in value.items():
                out[(top, key)] = inner
        elif value is not None:
            out[(top,)] = value
    return out


def _set_path(obj: dict[str, Any], path: Path_, value: Any) -> None:
    target = obj
    for part in path[:-1]:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            target[part] = nxt
        target = nxt
    target[path[-1]] = copy.deepcopy(value)


def _delete_path(obj: dict[str, Any], path: Path_) -> None:
    parents = [obj]
    target = obj
    for part in path[:-1]:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            return
        parents.append(nxt)
        target = nxt
    target.pop(path[-1], None)
    # Drop maps left empty (``data: {}`` reads back as absent, like the apiserver).
    for depth in range(len(path) - 1, 0, -1):
        container = parents[depth]
        if not container and path[depth - 1] != "metadata":
            parents[depth - 1].pop(path[depth - 1], None)


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _comparable(obj: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in obj.items() if k != "metadata"}
    meta = obj.get("metadata") or {}
    out["metadata"] = {k: meta.get(k) for k in _USER_META if meta.get(k)}
    for key in ("data",):
        if not out.get(key):
            out.pop(key, None)
    return out


def _fields_v1(fields: Iterable[Path_]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(fields):
        node = tree
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return tree


def _rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(int(moment), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
