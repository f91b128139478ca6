"""Configuration: a YAML file plus ``REFRESHER_`` environment overrides.

Provider, sink and notifier specs are discriminated unions on ``kind``. Secrets come
from ``*_file`` (re-read at every use, so rotation works) or ``*_env``; an inline
value is accepted for demos and tests. Durations accept ``90s``, ``5m``, ``1h30m``
or a number of seconds. Unknown keys are errors.
"""

from __future__ import annotations

import errno
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
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

from refresher.errors import ConfigError
from refresher.targets import (
    TargetClaims,
    TargetError,
    check_tenant,
    expand_key,
    expand_path,
    secret_data_keys,
    tenant_problem,
)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(raw: object) -> float:
    """``90s``, ``5m``, ``1h30m``, ``250ms`` or a plain number of seconds → seconds."""
    if isinstance(raw, bool):
        raise ValueError("expected a duration like 90s, 5m or 1h")
    if isinstance(raw, (int, float)):
        return float(raw)
    if not isinstance(raw, str):
        raise ValueError("expected a duration like 90s, 5m or 1h")
    text = raw.strip().replace(" ", "")
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {raw!r}: use e.g. 90s, 5m, 1h30m")
    return total


#: What `parse_duration` accepts, for the JSON schema (values.schema.json) only.
DURATION_PATTERN = r"^\s*([0-9]+(\.[0-9]+)?|([0-9]+(\.[0-9]+)?\s*(ms|s|m|h|d)\s*)+)\s*$"


def _duration_schema(*, positive: bool) -> WithJsonSchema:
    bound = {"exclusiveMinimum": 0} if positive else {"minimum": 0}
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", **bound},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
            "description": "a duration: 90s, 5m, 1h30m, 250ms or a number of seconds",
        }
    )


Duration = Annotated[
    float, BeforeValidator(parse_duration), Field(ge=0), _duration_schema(positive=False)
]
PositiveDuration = Annotated[
    float, BeforeValidator(parse_duration), Field(gt=0), _duration_schema(positive=True)
]


class Model(BaseModel):
    """Base for every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: False while validating without the files a config names (`refresher check --no-files`).
_checking_files: ContextVar[bool] = ContextVar("checking_files", default=True)


@contextmanager
def files_unchecked() -> Iterator[None]:
    """Validate without requiring the files a config names to exist (GitOps, CI)."""
    token = _checking_files.set(False)
    try:
        yield
    finally:
        _checking_files.reset(token)


def _existing_file(path: Path | None) -> Path | None:
    if path is None or not _checking_files.get():
        return path
    if not path.exists():
        raise ValueError("file not found")
    if not path.is_file():
        raise ValueError("not a regular file")
    if not os.access(path, os.R_OK):
        raise ValueError("file not readable")
    return path


class SecretSource:
    """Where a secret comes from. `read()` goes back to the source every time."""

    def __init__(
        self,
        *,
        name: str,
        inline: SecretStr | None = None,
        file: Path | None = None,
        env: str | None = None,
    ) -> None:
        self.name = name
        self.inline = inline
        self.file = file
        self.env = env

    def read(self) -> str:
        """Current value; a file's content loses its trailing line breaks (CRLF too).

        Raises `ConfigError` naming the source when the secret is missing, empty,
        not UTF-8 or holds a control character (it would break a header or a line).
        """
        if self.file is not None:
            where = f"{self.name}_file {self.file}"
            try:
                data = self.file.read_bytes()
            except OSError as exc:
                raise ConfigError([f"{where}: cannot read ({exc.strerror or exc})"]) from None
            try:
                text = data.decode()
            except UnicodeDecodeError as exc:
                raise ConfigError([f"{where}: not valid UTF-8 (byte {exc.start + 1})"]) from None
            value = text.rstrip("\r\n")
        elif self.env is not None:
            where = f"{self.name}_env ${self.env}"
            found = os.environ.get(self.env)
            if found is None:
                raise ConfigError([f"{self.name}_env: environment variable {self.env} is not set"])
            value = found
        else:
            assert self.inline is not None
            where = self.name
            value = self.inline.get_secret_value()
        problem = secret_problem(value)
        if problem is not None:
            raise ConfigError([f"{where}: {problem}"])
        return value

    def __repr__(self) -> str:
        where = self.file or (f"${self.env}" if self.env else "inline")
        return f"SecretSource({self.name} from {where})"


def _secret_fields(model: BaseModel, name: str, *, required: bool) -> None:
    given = [
        f for f in (name, f"{name}_file", f"{name}_env") if getattr(model, f, None) is not None
    ]
    if len(given) > 1:
        raise ValueError(f"set only one of {', '.join(given)}")
    if required and not given:
        raise ValueError(f"one of {name}, {name}_file or {name}_env is required")
    env = getattr(model, f"{name}_env", None)
    if env is not None and env not in os.environ:
        raise ValueError(f"{name}_env: environment variable {env} is not set")
    source = secret_source(model, name)
    # A file that is missing or unreadable is reported by its own field's check.
    if source is not None and (source.file is None or os.access(source.file, os.R_OK)):
        try:
            source.read()
        except ConfigError as exc:
            raise ValueError(exc.errors[0]) from None


def secret_problem(value: str) -> str | None:
    """Why `value` cannot be a secret, or None: empty, surrogates, control characters."""
    if not value:
        return "is empty"
    for index, char in enumerate(value):
        if "\ud800" <= char <= "\udfff" or unicodedata.category(char) == "Cc":
            return (
                f"contains a control or invalid character at position {index + 1} "
                "(a line break inside the secret?)"
            )
    return None


def secret_source(model: BaseModel, name: str) -> SecretSource | None:
    """The `SecretSource` behind ``name`` / ``name_file`` / ``name_env`` on `model`."""
    inline = getattr(model, name, None)
    file = getattr(model, f"{name}_file", None)
    env = getattr(model, f"{name}_env", None)
    if inline is None and file is None and env is None:
        return None
    return SecretSource(name=name, inline=inline, file=file, env=env)


# ---------------------------------------------------------------------------- providers


class ClientSecretFields(Model):
    """``client_secret`` from inline, ``client_secret_file`` or ``client_secret_env``."""

    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    client_secret_env: str | None = None

    _check_client_secret_file = field_validator("client_secret_file")(_existing_file)


class HTTPProviderConfig(Model):
    """Settings every HTTP provider shares."""

    timeout: PositiveDuration = 10.0
    ca_file: Path | None = None
    requests_per_minute: int | None = Field(default=None, gt=0)
    max_concurrency: int | None = Field(default=None, gt=0)
    assume_lifetime: PositiveDuration | None = None

    _check_ca = field_validator("ca_file")(_existing_file)


class OAuth2ProviderConfig(HTTPProviderConfig, ClientSecretFields):
    """Generic OAuth2 client-credentials grant (RFC 6749 §4.4)."""

    kind: Literal["oauth2"]
    token_url: str
    client_id: str
    scopes: list[str] = Field(default_factory=list)
    audience: str | None = None
    body: Literal["form", "json"] = "form"
    client_auth: Literal["body", "basic"] = "body"
    headers: dict[str, str] = Field(default_factory=dict)
    #: A grant lacking a requested scope fails (reason ``scope_missing``) instead of a warning.
    require_scopes: bool = False

    @field_validator("token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("scopes")
    @classmethod
    def _scope_tokens(cls, scopes: list[str]) -> list[str]:
        return _scope_tokens(scopes)

    @model_validator(mode="after")
    def _one_secret(self) -> OAuth2ProviderConfig:
        _secret_fields(self, "client_secret", required=True)
        _require_needs_scopes(self.require_scopes, self.scopes, "scopes")
        return self


#: RFC 6749 §3.3 scope-token: printable ASCII except space, ``"`` and ``\``.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,200}")


def _scope_tokens(scopes: list[str]) -> list[str]:
    bad = [s for s in scopes if not _SCOPE_TOKEN.fullmatch(s)]
    if bad:
        raise ValueError(
            f"{bad[0]!r} is not a scope token (RFC 6749 §3.3: printable ASCII, no space, "
            "quote or backslash)"
        )
    dupes = sorted(s for s, n in Counter(scopes).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate scope(s) {', '.join(map(repr, dupes))}")
    return scopes


def _require_needs_scopes(require: bool, scopes: list[str], field: str) -> None:
    if require and not scopes:
        raise ValueError(f"require_scopes needs {field}: there is nothing to require")


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


#: DutyClaims' documented scope vocabulary (seeds/000: "Current scope vocabulary").
DUTYCLAIMS_SCOPES = frozenset(
    {
        "partner.read",
        "partner.manage",
        "clients.read",
        "clients.write",
        "authority.read",
        "authority.write",
        "revenue.read",
        "webhooks.read",
        "webhooks.write",
        "diligence.read",
        "diligence.submit",
        "financing.request",
        "litigation.enroll",
        "notifications.read",
        "notifications.write",
    }
)
DUTYCLAIMS_LIVE_PREFIX = "dcp_live_"
#: The documented probe of a managed credential (seeds/000: ``curl …/v1/clients -H
#: "Authorization: Bearer dcp_live_…"``).
DUTYCLAIMS_PROBE_PATH = "/v1/clients"
_PROBE_PATH = re.compile(r"/[\x21-\x7e]{0,500}")


def _peek_secret(model: BaseModel, name: str) -> str | None:
    """The secret's current value if it can be read at config time (for sanity checks)."""
    source = secret_source(model, name)
    if source is None:
        return None
    try:
        return source.read()
    except (OSError, ConfigError):
        return None


class PartnerProviderConfig(HTTPProviderConfig):
    """A partner API at `base_url` (each partner sets its production URL as default)."""

    base_url: str

    @field_validator("base_url", check_fields=False)
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)


class DutyClaimsProviderConfig(PartnerProviderConfig, ClientSecretFields):
    """DutyClaims: managed credentials in production, OAuth2 client credentials in sandbox."""

    kind: Literal["dutyclaims"]
    mode: Literal["sandbox", "managed"]
    base_url: str = "https://api.dutyclaims.com"
    # sandbox
    client_id: str | None = None
    scopes: list[str] = Field(default_factory=list)
    #: A grant lacking a requested scope fails (reason ``scope_missing``) instead of a warning.
    require_scopes: bool = False
    #: Deprecated, ignored: the contract's sandbox token endpoint *is* on api.dutyclaims.com.
    sandbox_on_production_host: bool | None = Field(
        default=None,
        json_schema_extra={
            "deprecated": True,
            "description": "deprecated and ignored: sandbox OAuth on api.dutyclaims.com is "
            "accepted (it is the contract's sandbox token endpoint)",
        },
    )
    # managed
    credential: SecretStr | None = None
    credential_file: Path | None = None
    credential_env: str | None = None
    header: Literal["authorization", "x-api-key"] = "authorization"
    #: Check the managed credential with an authenticated GET every `probe_interval`.
    probe: bool = True
    probe_interval: PositiveDuration = 900.0
    probe_path: str = DUTYCLAIMS_PROBE_PATH
    #: How the probe sends the credential; the contract documents X-API-Key only for the
    #: routes that say so, so it is set together with `probe_path`.
    probe_header: Literal["authorization", "x-api-key"] = "authorization"

    _check_files = field_validator("credential_file")(_existing_file)

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, scopes: list[str]) -> list[str]:
        unknown = [s for s in scopes if s not in DUTYCLAIMS_SCOPES]
        if unknown:
            raise ValueError(
                f"unknown DutyClaims scope(s) {', '.join(map(repr, unknown))}; "
                f"documented: {', '.join(sorted(DUTYCLAIMS_SCOPES))}"
            )
        return _scope_tokens(scopes)

    @field_validator("probe_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not _PROBE_PATH.fullmatch(value) or "#" in value or value.startswith("//"):
            raise ValueError(
                "must be a path on base_url starting with '/' (a query is allowed), "
                "printable ASCII without spaces or '#'"
            )
        return value

    @property
    def environment(self) -> str:
        """The contract's two worlds: sandbox OAuth, production managed credentials."""
        return "sandbox" if self.mode == "sandbox" else "production"

    @model_validator(mode="after")
    def _mode_fields(self) -> DutyClaimsProviderConfig:
        probe_fields = {"probe", "probe_interval", "probe_path", "probe_header"}
        if self.mode == "sandbox":
            if self.client_id is None:
                raise ValueError("mode sandbox needs client_id")
            _secret_fields(self, "client_secret", required=True)
            if any(
                getattr(self, f) is not None
                for f in ("credential", "credential_file", "credential_env")
            ):
                raise ValueError(
                    "credential* is for mode managed; sandbox uses client_id/client_secret"
                )
            if probe_fields & self.model_fields_set:
                raise ValueError("probe* is for mode managed: a sandbox token has an expiry")
            secret = _peek_secret(self, "client_secret") or ""
            if secret.startswith(DUTYCLAIMS_LIVE_PREFIX):
                raise ValueError(
                    "a production managed credential (dcp_live_...) is configured as a sandbox "
                    "client secret; production uses mode: managed (sandbox OAuth is not a "
                    "production flow)"
                )
            _require_needs_scopes(self.require_scopes, self.scopes, "scopes")
        else:
            _secret_fields(self, "credential", required=True)
            if self.client_id is not None or self.scopes or self.require_scopes:
                raise ValueError(
                    "client_id/scopes/require_scopes are for mode sandbox; managed publishes "
                    "a credential"
                )
            if ("probe_path" in self.model_fields_set) != ("probe_header" in self.model_fields_set):
                raise ValueError(
                    "set probe_path and probe_header together: the contract says which header "
                    "each route takes (Authorization: Bearer for /v1/clients; X-API-Key only "
                    "where a route documents it, e.g. /v1/claims/status)"
                )
        return self


class DebituraProviderConfig(PartnerProviderConfig):
    """Debitura: an API key (``XApiKey``) mints one HS256 JWT per ``externalTenantId``."""

    kind: Literal["debitura"]
    base_url: str = "https://referral-api.debitura.com"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    api_key_env: str | None = None
    tenants: list[Annotated[str, AfterValidator(check_tenant)]] = Field(default_factory=list)
    tenants_file: Path | None = None
    max_concurrency: int | None = Field(default=16, gt=0)

    _check_files = field_validator("api_key_file", "tenants_file")(_existing_file)

    @field_validator("tenants")
    @classmethod
    def _unique(cls, tenants: list[str]) -> list[str]:
        dupes = sorted(t for t, n in Counter(tenants).items() if n > 1)
        if dupes:
            shown = ", ".join(map(repr, dupes[:10])) + (" ..." if len(dupes) > 10 else "")
            raise ValueError(f"duplicate tenant(s) {shown}")
        return tenants

    @model_validator(mode="after")
    def _sources(self) -> DebituraProviderConfig:
        _secret_fields(self, "api_key", required=True)
        if not self.tenants and self.tenants_file is None:
            raise ValueError("one of tenants or tenants_file is required")
        if self.tenants and self.tenants_file is not None:
            raise ValueError("set only one of tenants, tenants_file")
        return self

    def tenant_lines(self) -> TenantLines:
        """Configured tenants; a ``tenants_file`` is read now (see `read_tenants_file`)."""
        if self.tenants_file is None:
            return TenantLines(tenants=list(self.tenants), rejected=[])
        return read_tenants_file(self.tenants_file)


#: A tenants file is a list of ids, not a database: refuse to read more than this.
MAX_TENANTS_FILE_BYTES = 32 << 20


@dataclass(frozen=True)
class TenantLines:
    """The usable tenants of a tenant list, and one message per refused line."""

    tenants: list[str]
    rejected: list[str]


def read_tenants_file(path: Path) -> TenantLines:
    """One tenant per line, ``#`` starts a comment, surrounding blanks ignored,
    duplicates kept once. A bad line (not UTF-8, a control character, too long) is
    skipped and reported; the others stay usable. Raises `OSError` when the file
    cannot be read at all (the caller keeps what it had)."""
    with path.open("rb") as file:
        data = file.read(MAX_TENANTS_FILE_BYTES + 1)
    if len(data) > MAX_TENANTS_FILE_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_TENANTS_FILE_BYTES >> 20} MiB")
    seen: dict[str, None] = {}
    rejected: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.removesuffix(b"\r").decode()
        except UnicodeDecodeError as exc:
            rejected.append(f"{path} line {number}: not valid UTF-8 (byte {exc.start + 1})")
            continue
        tenant = line.split("#", 1)[0].strip(" \t")
        if not tenant:
            continue
        problem = tenant_problem(tenant)
        if problem is not None:
            rejected.append(f"{path} line {number}: tenant {problem}")
            continue
        seen[tenant] = None
    return TenantLines(tenants=list(seen), rejected=rejected)


class GooclaimProviderConfig(PartnerProviderConfig, ClientSecretFields):
    """Gooclaim: JSON client credentials → RS256 machine JWT (1 h), 60 requests/min."""

    kind: Literal["gooclaim"]
    base_url: str = "https://api.gooclaim.com"
    client_id: str
    issuer: str | None = None
    audience: str = "gooclaim-api"
    public_key_file: Path | None = None
    jwks_url: str | None = None
    tenant_id: str | None = None
    introspect: bool = False
    requests_per_minute: int | None = Field(default=60, gt=0)
    #: Per ``client_id``: shared by every job with this client id and base_url.
    introspect_requests_per_minute: int = Field(default=600, gt=0)
    #: Gooclaim grants what onboarding set up (no ``scope`` is requested): compare with this.
    expected_scopes: list[str] = Field(default_factory=list)
    #: A token lacking an expected scope fails (reason ``scope_missing``) instead of a warning.
    require_scopes: bool = False

    @field_validator("expected_scopes")
    @classmethod
    def _scope_tokens(cls, scopes: list[str]) -> list[str]:
        return _scope_tokens(scopes)

    @field_validator("jwks_url")
    @classmethod
    def _jwks_http(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

    _check_files = field_validator("public_key_file")(_existing_file)

    @field_validator("public_key_file")
    @classmethod
    def _pem(cls, value: Path | None) -> Path | None:
        if value is None or not _checking_files.get():
            return value
        if b"-----BEGIN" not in value.read_bytes()[:4096]:
            raise ValueError("not a PEM public key")
        return value

    @model_validator(mode="after")
    def _verification(self) -> GooclaimProviderConfig:
        _secret_fields(self, "client_secret", required=True)
        if self.public_key_file is not None and self.jwks_url is not None:
            raise ValueError("set only one of public_key_file, jwks_url")
        if (self.public_key_file or self.jwks_url) and not self.issuer:
            raise ValueError(
                "issuer is required to verify tokens (the contract says verify aud and iss; "
                "use the issuer your Gooclaim onboarding names)"
            )
        _require_needs_scopes(self.require_scopes, self.expected_scopes, "expected_scopes")
        return self


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


class FileSinkConfig(Model):
    """Write the token to a file atomically (temp file, fsync, rename, fsync dir)."""

    kind: Literal["file"]
    path: str
    format: Literal["raw", "json", "env", "header"] = "raw"
    mode: Annotated[
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
    ] = 0o600
    group: str | int | None = None
    #: ``format: header`` header; default: the provider's choice (DutyClaims managed
    #: ``header: x-api-key``), else ``Authorization``.
    header_name: str | None = Field(default=None, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
    env_name: str = Field(default="TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

    @field_validator("path")
    @classmethod
    def _absolute_or_relative(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if value.endswith("/"):
            raise ValueError("must name a file, not a directory")
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise ValueError("must not contain control characters")
        unknown = set(re.findall(r"\{[^}]*\}", value)) - {"{job}", "{tenant}"}
        if unknown:
            raise ValueError(f"unknown placeholder(s) {', '.join(sorted(unknown))}")
        return value

    def targets(self, *, job: str, tenant: str | None) -> list[str]:
        """The absolute file this sink writes for (job, tenant); `TargetError` if unsafe."""
        return [os.path.abspath(expand_path(self.path, job=job, tenant=tenant))]


class KubernetesSinkConfig(Model):
    """Keep one key of a Kubernetes Secret fresh (server-side apply of our keys only)."""

    kind: Literal["kubernetes"]
    # default: the pod's namespace (in-cluster)
    namespace: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63
    )
    secret: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)
    key: str = "{job}"  # per-tenant jobs: default "{tenant}" (see `key_template`)
    type: str = "Opaque"
    extra_keys: list[Literal["expires_at", "token_type"]] = Field(default_factory=list)
    kubeconfig: Path | None = None  # default: in-cluster service account
    context: str | None = None

    _check_kubeconfig = field_validator("kubeconfig")(_existing_file)

    @field_validator("key")
    @classmethod
    def _key_template(cls, value: str) -> str:
        unknown = set(re.findall(r"\{[^}]*\}", value)) - {"{job}", "{tenant}"}
        if unknown:
            raise ValueError(f"unknown placeholder(s) {', '.join(sorted(unknown))}")
        return value

    def key_template(self, tenant: str | None) -> str:
        """Per-tenant jobs default to one key per tenant."""
        return "{tenant}" if tenant is not None and self.key == "{job}" else self.key

    def targets(self, *, job: str, tenant: str | None) -> list[str]:
        """Every data key this sink writes for (job, tenant), as ``secret/<ns>/<name>#<key>``
        (companion keys included); `TargetError` if the key is invalid."""
        key = expand_key(self.key_template(tenant), job=job, tenant=tenant)
        where = f"secret/{self.namespace or '(default namespace)'}/{self.secret}#"
        return [where + data_key for data_key in secret_data_keys(key)]


SinkConfig = Annotated[FileSinkConfig | KubernetesSinkConfig, Field(discriminator="kind")]


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

    _check_secret = field_validator("secret_file")(_existing_file)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        return _http_url(value)


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

    _check_tokens = field_validator("admin_token_file", "consumer_token_file")(_existing_file)

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

    _check_kubeconfig = field_validator("kubeconfig")(_existing_file)

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
            if isinstance(sink, FileSinkConfig):
                field, template = "path", sink.path
            else:
                field, template = "key", sink.key_template("" if per_tenant else None)
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

    def targets(self, tenant: str | None) -> list[str]:
        """Every file and Secret key this job writes for `tenant`; `TargetError` if one
        is unsafe (the message names the sink)."""
        found: list[str] = []
        for index, sink in enumerate(self.sinks):
            try:
                found.extend(sink.targets(job=self.name, tenant=tenant))
            except TargetError as exc:
                raise TargetError(f"sinks[{index}]: {exc}") from None
        return found


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
        """Every static (job, tenant) gets safe targets, and no two share one."""
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
        file = Path(path)
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
    base = Path(path).resolve().parent if path is not None else None
    if base is not None:
        raw = _resolve_relative_paths(raw, base)
    try:
        return Settings(**raw)
    except ValidationError as exc:
        raise ConfigError(_messages(exc)) from None
    except SettingsError as exc:
        # pydantic-settings names the field, not the variable: name the variable.
        match = re.search(r'field "([^"]+)"', str(exc))
        variable = f"REFRESHER_{match.group(1).upper()}" if match else "a REFRESHER_ variable"
        raise ConfigError([f"{variable}: not valid JSON ({exc.__cause__ or exc})"]) from None


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
