"""Configuration: a YAML file plus ``REFRESHER_`` environment overrides.

Provider, sink and notifier specs are discriminated unions on ``kind``. Secrets come
from ``*_file`` (re-read at every use, so rotation works) or ``*_env``; an inline
value is accepted for demos and tests. Durations accept ``90s``, ``5m``, ``1h30m``
or a number of seconds. Unknown keys are errors.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from refresher.errors import ConfigError, TemplateError
from refresher.fields import (
    Duration,
    Model,
    PositiveDuration,
    checking_files,
    existing_file,
    files_unchecked,
    http_url,
)
from refresher.providers.debitura import DebituraProviderConfig
from refresher.providers.dutyclaims import DutyClaimsProviderConfig
from refresher.providers.gooclaim import GooclaimProviderConfig
from refresher.providers.oauth2 import OAuth2ProviderConfig
from refresher.targets import (
    SharedTarget,
    Target,
    TargetClaims,
    TargetError,
    describe_owner,
    expand_key,
    expand_name,
    expand_path,
    secret_data_keys,
    shown,
)
from refresher.templating import INERT, Template, parse_template

ProviderConfig = Annotated[
    OAuth2ProviderConfig
    | DutyClaimsProviderConfig
    | DebituraProviderConfig
    | GooclaimProviderConfig,
    Field(discriminator="kind"),
]


# ---------------------------------------------------------------------------- sinks


def _file_mode(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        mode = raw
    elif isinstance(raw, str) and re.fullmatch(r"0?[0-7]{3,4}", raw):
        mode = int(raw, 8)
    else:
        raise ValueError("must be an octal mode string such as '0600'")
    if mode & ~0o7777:
        raise ValueError("mode out of range")
    return mode


FileMode = Annotated[
    int,
    BeforeValidator(_file_mode),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^0?[0-7]{3,4}$"},
                {"type": "integer", "minimum": 0, "maximum": 0o7777},
            ],
            "description": "octal file mode, e.g. '0640' (quote it in YAML)",
        }
    ),
]
Namespace = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
SecretName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)]


def _placeholders(value: str) -> str:
    unknown = set(re.findall(r"\{[^}]*\}", value)) - {"{job}", "{tenant}"}
    if unknown:
        raise ValueError(f"unknown placeholder(s) {', '.join(sorted(unknown))}")
    return value


def _sink_path(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if value.endswith("/"):
        raise ValueError("must name a file, not a directory")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("must not contain control characters")
    return _placeholders(value)


class FileSinkConfig(Model):
    """Write the token to a file atomically (temp file, fsync, rename, fsync dir)."""

    kind: Literal["file"]
    path: str
    format: Literal["raw", "json", "env", "header"] = "raw"
    mode: FileMode = 0o600
    group: str | int | None = None
    #: ``format: header`` header; default: the provider's choice (DutyClaims managed
    #: ``header: x-api-key``), else ``Authorization``.
    header_name: str | None = Field(default=None, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
    env_name: str = Field(default="TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

    _check_path = field_validator("path")(_sink_path)

    def placement(self, per_tenant: bool) -> tuple[str, str] | None:
        """The field that says where each (job, tenant) goes, and its template."""
        return "path", self.path

    def targets(self, *, job: str, tenant: str | None) -> list[Target]:
        """The absolute file this sink writes for (job, tenant); `TargetError` if unsafe."""
        return [os.path.abspath(expand_path(self.path, job=job, tenant=tenant))]


class KubernetesSinkConfig(Model):
    """Keep one key of a Kubernetes Secret fresh (server-side apply of our keys only)."""

    kind: Literal["kubernetes"]
    # default: the pod's namespace (in-cluster)
    namespace: Namespace | None = None
    secret: SecretName
    key: str = "{job}"  # per-tenant jobs: default "{tenant}" (see `key_template`)
    type: str = "Opaque"
    extra_keys: list[Literal["expires_at", "token_type"]] = Field(default_factory=list)
    kubeconfig: Path | None = None  # default: in-cluster service account
    context: str | None = None

    _check_kubeconfig = field_validator("kubeconfig")(existing_file)
    _key_template = field_validator("key")(_placeholders)

    def key_template(self, tenant: str | None) -> str:
        """Per-tenant jobs default to one key per tenant."""
        return "{tenant}" if tenant is not None and self.key == "{job}" else self.key

    def placement(self, per_tenant: bool) -> tuple[str, str] | None:
        return "key", self.key_template("" if per_tenant else None)

    def targets(self, *, job: str, tenant: str | None) -> list[Target]:
        """Every data key this sink writes for (job, tenant), as ``secret/<ns>/<name>#<key>``
        (companion keys included); `TargetError` if the key is invalid."""
        key = expand_key(self.key_template(tenant), job=job, tenant=tenant)
        where = secret_target(self.namespace, self.secret, "")
        return [where + data_key for data_key in secret_data_keys(key)]


def secret_target(namespace: str | None, secret: str, key: str) -> str:
    """How a Secret data key is named in messages and target claims."""
    return f"secret/{namespace or '(default namespace)'}/{secret}#{key}"


class OutputConfig(Model):
    """Where a bundle or a rendered template is kept: a file (`path`), written
    atomically like a file sink's, or one key of a Kubernetes Secret (`secret`, `key`)."""

    path: str | None = None
    mode: FileMode = 0o600
    group: str | int | None = None
    secret: SecretName | None = None
    key: str | None = None
    namespace: Namespace | None = None
    type: str = "Opaque"
    kubeconfig: Path | None = None
    context: str | None = None

    _check_kubeconfig = field_validator("kubeconfig")(existing_file)
    _check_key = field_validator("key")(_placeholders)

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        return None if value is None else _sink_path(value)

    @model_validator(mode="after")
    def _one_output(self) -> OutputConfig:
        if (self.path is None) == (self.secret is None):
            raise ValueError("set exactly one of path (a file) or secret (a Kubernetes Secret)")
        if self.secret is not None and self.key is None:
            raise ValueError("a Secret output needs key: the data key to write")
        file_only = {"mode", "group"} & self.model_fields_set
        secret_only = {"key", "namespace", "type", "kubeconfig", "context"} & self.model_fields_set
        if self.path is not None and secret_only:
            raise ValueError(f"{', '.join(sorted(secret_only))} only apply with secret")
        if self.secret is not None and file_only:
            raise ValueError(f"{', '.join(sorted(file_only))} only apply with path")
        if self.secret is not None and self.key is not None and "{" not in self.key:
            problem = secret_type_problem(self.type, self.key)
            if problem is not None:
                raise ValueError(f"type {self.type!r} {problem}")
        return self

    @property
    def where(self) -> str:
        """The output's template: the path, or the Secret key."""
        return self.path if self.path is not None else f"{self.secret}#{self.key}"

    def output(self, *, job: str, tenant: str | None) -> str:
        """The file or Secret key written for (job, tenant); `TargetError` if unsafe."""
        if self.path is not None:
            return os.path.abspath(expand_path(self.path, job=job, tenant=tenant))
        key = expand_key(self.key or "", job=job, tenant=tenant)
        return secret_target(self.namespace, self.secret or "", key)

    def secret_sink(self, key: str) -> KubernetesSinkConfig:
        """The Secret sink settings that write this output's `key` (validated already)."""
        return KubernetesSinkConfig.model_construct(
            kind="kubernetes",
            namespace=self.namespace,
            secret=self.secret or "",
            key=key,
            type=self.type,
            extra_keys=[],
            kubeconfig=self.kubeconfig,
            context=self.context,
        )


BUNDLE_NAME = r"^([A-Za-z0-9_]|\{job\}|\{tenant\})+$"


class BundleSinkConfig(OutputConfig):
    """Many jobs' and tenants' tokens in one file or Secret key, rewritten atomically
    whenever one of them changes (`refresher.sinks.bundle`). Every sink naming the
    same output is a member of the same bundle and must agree on its settings;
    `name` is the member's own."""

    kind: Literal["bundle"]
    format: Literal["env", "dotenv", "json"] = "env"
    #: ``env``/``dotenv``: this job's variable; default ``{job}`` or ``{job}_{tenant}``.
    name: str | None = Field(default=None, pattern=BUNDLE_NAME, max_length=128)
    #: A member whose token expired unreplaced (or that has none yet).
    expired: Literal["keep", "omit", "mark"] = "keep"

    @model_validator(mode="after")
    def _one_file(self) -> BundleSinkConfig:
        if "{" in self.where:
            raise ValueError("a bundle is one file or Secret key: no {job} or {tenant} in it")
        if self.name is not None and self.format == "json":
            raise ValueError("name applies to env and dotenv bundles (json keys are job/tenant)")
        return self

    @property
    def identity(self) -> str:
        """The settings every member of this bundle shares (two sinks on one output
        with another identity collide)."""
        return self.model_dump_json(exclude={"name"})

    def placement(self, per_tenant: bool) -> tuple[str, str] | None:
        return ("name", self.name) if self.name is not None else None

    def targets(self, *, job: str, tenant: str | None) -> list[Target]:
        return [SharedTarget(self.output(job=job, tenant=tenant), self.identity)]

    def member_name(self, *, job: str, tenant: str | None) -> str:
        """The member's key in the bundle: a variable name, or ``job[/tenant]`` in json."""
        if self.format == "json":
            return job if tenant is None else f"{job}/{tenant}"
        return expand_name(self.name, job=job, tenant=tenant)


class TemplateSinkConfig(OutputConfig):
    """Render a template (`refresher.templating`) with one token into a file or a
    Secret key; the template file is watched and the output re-rendered on change."""

    kind: Literal["template"]
    template: Path
    #: The user of ``${username}`` and ``${basic_b64}`` (``user:token``).
    username: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._~+/=%@-]{1,256}$")

    _parsed: Template | None = PrivateAttr(default=None)
    _check_template = field_validator("template")(existing_file)

    @model_validator(mode="after")
    def _parse(self) -> TemplateSinkConfig:
        if not checking_files.get() and not self.template.is_file():
            return self
        try:
            self._parsed = load_template(self.template)
        except TemplateError as exc:
            raise ValueError(f"template {self.template}: {exc}") from None
        needs_user = {"username", "basic_b64"} & self._parsed.fields
        if needs_user and self.username is None:
            raise ValueError(f"the template uses ${{{min(needs_user)}}}: set username")
        return self

    def placement(self, per_tenant: bool) -> tuple[str, str] | None:
        return ("path" if self.path is not None else "key"), self.where

    def targets(self, *, job: str, tenant: str | None) -> list[Target]:
        """The output for (job, tenant); `TargetError` if it is unsafe, or if the
        template inserts the tenant id and this one could break its format."""
        output = self.output(job=job, tenant=tenant)
        uses_tenant = self._parsed is not None and "tenant" in self._parsed.fields
        if tenant is not None and uses_tenant and not INERT.fullmatch(tenant):
            raise TargetError(
                f"tenant {shown(tenant)} cannot be inserted by template {self.template} "
                "(only letters, digits and - . _ ~ + / = % @ :)"
            )
        return [output]


def load_template(path: Path) -> Template:
    """Read and parse a template file; `TemplateError` (with the line) if it is not one."""
    try:
        text = path.read_bytes().decode()
    except UnicodeDecodeError as exc:
        raise TemplateError(f"not valid UTF-8 (byte {exc.start + 1})") from None
    except OSError as exc:
        raise TemplateError(exc.strerror or str(exc)) from None
    return parse_template(text)


SinkConfig = Annotated[
    FileSinkConfig | KubernetesSinkConfig | BundleSinkConfig | TemplateSinkConfig,
    Field(discriminator="kind"),
]


def secret_type_problem(secret_type: str, key: str | None) -> str | None:
    """Why a sink that writes only data key `key` (None: a different key per tenant)
    cannot create a Secret of `secret_type`, or None. Mirrors the API server's
    ``ValidateSecret``: built-in types require keys (and contents) of their own."""
    if secret_type == "kubernetes.io/basic-auth":
        if key in ("username", "password"):
            return None
        return "needs the data key 'username' or 'password': set key to one of them"
    if secret_type == "kubernetes.io/ssh-auth":
        if key == "ssh-privatekey":
            return None
        return "needs the data key 'ssh-privatekey': set key: ssh-privatekey"
    if secret_type == "kubernetes.io/tls":
        return "needs both 'tls.crt' and 'tls.key', a sink writes one key: use type Opaque"
    if secret_type in ("kubernetes.io/dockerconfigjson", "kubernetes.io/dockercfg"):
        return "needs a Docker config JSON document, which a token is not: use type Opaque"
    if secret_type == "kubernetes.io/service-account-token":
        return "is filled by Kubernetes for a service account: use type Opaque"
    return None


# ---------------------------------------------------------------------------- notifiers

_SIGNALS = {"HUP", "USR1", "USR2", "TERM", "INT", "ALRM", "WINCH", "CONT"}


class SignalNotifierConfig(Model):
    """Send a signal to a consumer process after each new token is written."""

    kind: Literal["signal"]
    pid: int | None = Field(default=None, gt=1)
    pid_file: Path | None = None  # re-read every time: consumers restart
    signal: str = "HUP"

    @field_validator("signal")
    @classmethod
    def _known(cls, value: str) -> str:
        name = value.upper().removeprefix("SIG")
        if name not in _SIGNALS:
            raise ValueError(
                f"unsupported signal {value!r}; use one of {', '.join(sorted(_SIGNALS))}"
            )
        return name

    @model_validator(mode="after")
    def _target(self) -> SignalNotifierConfig:
        if (self.pid is None) == (self.pid_file is None):
            raise ValueError("set exactly one of pid, pid_file")
        return self


class CommandNotifierConfig(Model):
    """Run a command (argv, no shell) after each new token is written."""

    kind: Literal["command"]
    argv: list[str] = Field(min_length=1)
    timeout: PositiveDuration = 10.0
    env: dict[str, str] = Field(default_factory=dict)


class WebhookNotifierConfig(Model):
    """POST ``{job, tenant, expires_at, fingerprint}`` after each new token is written."""

    kind: Literal["webhook"]
    url: str
    secret_file: Path | None = None  # HMAC-SHA256 key for the signature header
    signature_header: str = "X-Refresher-Signature"
    timeout: PositiveDuration = 5.0
    retries: int = Field(default=3, ge=0, le=10)
    retry_backoff: PositiveDuration = 0.5

    _check_secret = field_validator("secret_file")(existing_file)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        return http_url(value)


NotifierConfig = Annotated[
    SignalNotifierConfig | CommandNotifierConfig | WebhookNotifierConfig,
    Field(discriminator="kind"),
]


# ---------------------------------------------------------------------------- jobs and daemon


class BackoffConfig(Model):
    initial: PositiveDuration = 1.0
    max: PositiveDuration = 300.0

    @model_validator(mode="after")
    def _ordered(self) -> BackoffConfig:
        if self.initial > self.max:
            raise ValueError("initial must not exceed max")
        return self


class ForcedRefreshConfig(Model):
    """Budgets for consumer-forced refreshes (``POST /v1/tokens/{job}/refresh``)."""

    #: One (job, tenant) at most this often.
    min_interval: Duration = 10.0
    #: Every job and tenant sharing one credential (client id, API key) together.
    per_credential_per_minute: int = Field(default=30, gt=0)
    #: The whole daemon.
    per_minute: int = Field(default=120, gt=0)


class RefreshConfig(Model):
    """When to refresh: at `refresh_at` of the lifetime, but at least `min_remaining` early."""

    refresh_at: float = Field(default=0.75, gt=0, lt=1)
    min_remaining: Duration = 300.0
    jitter: float = Field(default=0.1, ge=0, lt=0.5)
    #: A planned refresh may leave up to this fraction of its token's lifetime early,
    #: with others due about then, so refreshes leave in batches (0: exactly on time).
    coalesce: float = Field(default=0.01, ge=0, le=0.05)
    backoff: BackoffConfig = BackoffConfig()
    concurrency: int = Field(default=32, gt=0)
    max_retry_after: PositiveDuration = 3600.0
    forced: ForcedRefreshConfig = ForcedRefreshConfig()


class ServerConfig(Model):
    """The HTTP listener. It holds at most `max_connections` connections (fewer if the
    file descriptor limit is low); each must send a complete request head within
    `header_timeout` of opening or of its previous response."""

    listen: str = Field(
        default="127.0.0.1:9464",
        json_schema_extra={"pattern": r"^(\[[0-9A-Fa-f:.]+\]|[^:\s]+):[0-9]{1,5}$"},
    )
    #: Bearer secret for forced refreshes (required for them whenever set).
    admin_token_file: Path | None = None
    #: Bearer secret that may only report rejected tokens (``?rejected=``).
    consumer_token_file: Path | None = None
    max_connections: int = Field(default=256, ge=1, le=65536)
    header_timeout: PositiveDuration = 10.0

    _check_tokens = field_validator("admin_token_file", "consumer_token_file")(existing_file)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9464")
        return value

    @field_validator("max_connections", mode="before")
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("must be a number of connections, not true/false")
        return value

    @field_validator("header_timeout")
    @classmethod
    def _bounded_timeout(cls, value: float) -> float:
        if value > 600:
            raise ValueError("must be at most 10m: idle connections would hold their slot")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


#: Followers wait retry_period x (1 + random x this) between attempts (client-go's
#: JitterFactor), so candidates do not hit the API server in lockstep.
LEADER_JITTER_FACTOR = 1.2


class LeaderElectionConfig(Model):
    """Kubernetes Lease leader election (client-go defaults)."""

    enabled: bool = False
    lease_name: str = "refresher"
    namespace: str | None = None  # default: $POD_NAMESPACE or the in-cluster namespace
    identity: str | None = None  # default: $POD_NAME or the hostname
    lease_duration: PositiveDuration = 15.0
    renew_deadline: PositiveDuration = 10.0
    retry_period: PositiveDuration = 2.0
    kubeconfig: Path | None = None
    context: str | None = None

    _check_kubeconfig = field_validator("kubeconfig")(existing_file)

    @model_validator(mode="after")
    def _ordered(self) -> LeaderElectionConfig:
        # client-go's own checks (NewLeaderElector): the leader must stop before anyone
        # may take over, and retry at least once, jitter included, before it stops.
        if not self.renew_deadline < self.lease_duration:
            raise ValueError("lease_duration must be greater than renew_deadline")
        if not self.renew_deadline > LEADER_JITTER_FACTOR * self.retry_period:
            raise ValueError(
                f"renew_deadline must be greater than {LEADER_JITTER_FACTOR} x retry_period "
                "(the retry jitter)"
            )
        return self


class MetricsConfig(Model):
    tenant_labels: bool = False


class LoggingConfig(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


JOB_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class JobConfig(Model):
    """One provider credential → one token (or one per tenant) → its sinks."""

    name: str = Field(pattern=JOB_NAME)
    provider: ProviderConfig
    sinks: list[SinkConfig] = Field(min_length=1)
    notify: list[NotifierConfig] = Field(default_factory=list)
    on_expiry: Literal["keep", "remove"] = "keep"
    on_remove: Literal["keep", "delete"] = "keep"

    @model_validator(mode="after")
    def _tenant_paths(self) -> JobConfig:
        per_tenant = isinstance(self.provider, DebituraProviderConfig)
        for index, sink in enumerate(self.sinks):
            placement = sink.placement(per_tenant)
            if placement is None:
                continue
            field, template = placement
            if per_tenant and "{tenant}" not in template:
                raise ValueError(
                    f"sinks[{index}].{field} must contain {{tenant}}: one token per tenant"
                )
            if not per_tenant and "{tenant}" in template:
                raise ValueError(
                    f"sinks[{index}] uses {{tenant}}, but provider {self.provider.kind} "
                    "has no tenants"
                )
            if isinstance(sink, KubernetesSinkConfig):
                key = None if per_tenant else template.replace("{job}", self.name)
                problem = secret_type_problem(sink.type, key)
                if problem is not None:
                    raise ValueError(f"sinks[{index}].type {sink.type!r} {problem}")
        return self

    def static_tenants(self) -> list[str | None]:
        """The tenants known from the config alone (a ``tenants_file`` is read at run time)."""
        if isinstance(self.provider, DebituraProviderConfig):
            return list(self.provider.tenants)
        return [None]

    def targets(self, tenant: str | None) -> list[Target]:
        """Every file and Secret key this job writes for `tenant`; `TargetError` if one
        is unsafe or written by two of its sinks (the message names the sinks)."""
        found: list[Target] = []
        seen: dict[str, int] = {}
        for index, sink in enumerate(self.sinks):
            try:
                targets = sink.targets(job=self.name, tenant=tenant)
            except TargetError as exc:
                raise TargetError(f"sinks[{index}]: {exc}") from None
            for target in targets:
                where = target.target if isinstance(target, SharedTarget) else target
                first = seen.setdefault(where, index)
                if first != index:
                    raise TargetError(f"sinks[{first}] and sinks[{index}] would both write {where}")
            found.extend(targets)
        return found


#: What a bundle's size estimate assumes one token takes (a JWT with a few claims).
TOKEN_SIZE_ESTIMATE = 2048
#: The most one Kubernetes Secret holds, all its keys together.
SECRET_LIMIT = 1024 * 1024


def bundle_problems(
    jobs: list[JobConfig], tenants_of: Callable[[JobConfig], list[str | None]]
) -> tuple[list[str], list[str]]:
    """(members of one bundle with the same name, Secret bundles that cannot fit), for
    the tenants `tenants_of` lists; each message starts with the sink's location."""
    named: dict[tuple[str, str], tuple[str, str | None]] = {}
    sizes: dict[str, tuple[int, int, str]] = {}
    collisions: list[str] = []
    for index, job in enumerate(jobs):
        bundles = [(n, s) for n, s in enumerate(job.sinks) if isinstance(s, BundleSinkConfig)]
        tenants = tenants_of(job) if bundles else []
        for number, sink in bundles:
            where = f"jobs[{index}].sinks[{number}]"
            for tenant in tenants:
                try:
                    target = sink.output(job=job.name, tenant=tenant)
                    name = sink.member_name(job=job.name, tenant=tenant)
                except TargetError:
                    continue  # the target claims report it
                owner = named.setdefault((target, name), (job.name, tenant))
                if owner != (job.name, tenant):
                    collisions.append(
                        f"{where}: {describe_owner((job.name, tenant))} and "
                        f"{describe_owner(owner)} are both named {name} in bundle {target}"
                    )
                if sink.secret is not None:
                    count, size, first = sizes.get(target, (0, 0, where))
                    estimate = TOKEN_SIZE_ESTIMATE + 200 + 2 * len(name) + 3 * len(tenant or "")
                    sizes[target] = (count + 1, size + estimate, first)
    too_large = [
        f"{where}: bundle {target} would hold {count} tokens, about {size // 1024} KiB at "
        f"{TOKEN_SIZE_ESTIMATE // 1024} KiB a token: more than the 1 MiB a Secret holds; "
        "split it into several bundles"
        for target, (count, size, where) in sizes.items()
        if size > SECRET_LIMIT
    ]
    return collisions, too_large


class Settings(BaseSettings):
    """The whole configuration. Env vars ``REFRESHER_<SECTION>__<FIELD>`` override YAML."""

    model_config = SettingsConfigDict(
        env_prefix="REFRESHER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerConfig = ServerConfig()
    refresh: RefreshConfig = RefreshConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    leader_election: LeaderElectionConfig = LeaderElectionConfig()
    jobs: list[JobConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for job in self.jobs:
            if job.name in seen:
                raise ValueError(f"duplicate job name {job.name!r}")
            seen.add(job.name)
        return self

    @model_validator(mode="after")
    def _one_writer_per_target(self) -> Settings:
        """Every static (job, tenant) gets safe targets, and no two share one (but the
        members of one bundle, each under its own name, in a Secret it fits in)."""
        claims = TargetClaims()
        errors: list[str] = []
        for index, job in enumerate(self.jobs):
            for tenant in job.static_tenants():
                try:
                    claims.claim((job.name, tenant), job.targets(tenant))
                except TargetError as exc:
                    errors.append(f"jobs[{index}].{exc}")
                    if len(errors) >= 20:
                        break
        collisions, too_large = bundle_problems(self.jobs, JobConfig.static_tenants)
        errors.extend([*collisions[:20], *too_large])
        if errors:
            raise ValueError(_TARGET_ERRORS + "; ".join(errors))
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the YAML file (passed as init kwargs).
        return (env_settings, init_settings)


# ---------------------------------------------------------------------------- loading

_UNION_FIELDS = {"provider", "sinks", "notify"}


def format_location(loc: tuple[str | int, ...]) -> str:
    """``('jobs', 1, 'provider', 'oauth2', 'token_url')`` → ``jobs[1].provider.token_url``."""
    out = ""
    previous: str | int | None = None
    union_context = False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif union_context:
            # pydantic inserts the discriminator value of a tagged union: skip it.
            union_context = False
            previous = part
            continue
        else:
            out += f".{part}" if out else part
        union_context = part in _UNION_FIELDS or (
            isinstance(part, int) and previous in _UNION_FIELDS
        )
        if isinstance(part, str) and part in ("sinks", "notify"):
            union_context = False
        previous = part
    return out or "(top level)"


#: Marks a whole-config error whose messages carry their own locations.
_TARGET_ERRORS = "targets: "


def _messages(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors(include_url=False):
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        if message.startswith(_TARGET_ERRORS):
            lines.extend(message[len(_TARGET_ERRORS) :].split("; "))
            continue
        lines.append(f"{format_location(tuple(item['loc']))}: {message}")
    return lines


def load_settings(
    path: str | Path | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    check_files: bool = True,
) -> Settings:
    """Read YAML from `path` (or take `data`), apply env overrides, validate.

    ``check_files=False`` accepts ``*_file`` paths that do not exist (yet): everything
    else is still checked. Raises `ConfigError` listing every problem with its location.
    """
    if not check_files:
        with files_unchecked():
            return load_settings(path, data=data)
    raw: Any = dict(data or {})
    if path is not None:
        raw = _resolve_relative_paths(read_yaml(Path(path)), Path(path).resolve().parent)
    try:
        return Settings(**raw)
    except ValidationError as exc:
        raise ConfigError(_messages(exc)) from None
    except SettingsError as exc:
        # pydantic-settings names the field, not the variable: name the variable.
        match = re.search(r'field "([^"]+)"', str(exc))
        variable = f"REFRESHER_{match.group(1).upper()}" if match else "a REFRESHER_ variable"
        raise ConfigError([f"{variable}: not valid JSON ({exc.__cause__ or exc})"]) from None


def read_yaml(file: Path) -> dict[str, Any]:
    """A config file's top-level mapping; `ConfigError` naming the file otherwise."""
    try:
        raw = yaml.safe_load(file.read_bytes().decode()) or {}
    except FileNotFoundError:
        raise ConfigError([f"{file}: config file not found"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{file}: not valid UTF-8 (byte {exc.start + 1})"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{file}: invalid YAML: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"{file}: {exc.strerror}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{file}: top level must be a mapping"])
    if not all(isinstance(key, str) for key in raw):
        raise ConfigError([f"{file}: top-level keys must be strings"])
    return raw


def _resolve_relative_paths(raw: Any, base: Path) -> Any:
    """Relative ``*_file`` and ``ca_file`` paths are taken relative to the config file."""
    if isinstance(raw, dict):
        out = {}
        for key, value in raw.items():
            if (
                isinstance(key, str)
                and (key.endswith("_file"))
                and isinstance(value, str)
                and value
                and not os.path.isabs(value)
            ):
                out[key] = str(base / value)
            else:
                out[key] = _resolve_relative_paths(value, base)
        return out
    if isinstance(raw, list):
        return [_resolve_relative_paths(item, base) for item in raw]
    return raw
