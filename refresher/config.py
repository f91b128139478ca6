"""Configuration: a YAML file plus ``REFRESHER_`` environment overrides.

Provider, sink and notifier specs are discriminated unions on ``kind``. Secrets come
from ``*_file`` (re-read at every use, so rotation works) or ``*_env``; an inline
value is accepted for demos and tests. Durations accept ``90s``, ``5m``, ``1h30m``
or a number of seconds. Unknown keys are errors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from refresher.errors import ConfigError

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


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class Model(BaseModel):
    """Base for every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _existing_file(path: Path | None) -> Path | None:
    if path is None:
        return None
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
        """Current value; a file's content loses one trailing newline."""
        if self.file is not None:
            text = self.file.read_text()
            return text[:-1] if text.endswith("\n") else text
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError([f"{self.name}_env: environment variable {self.env} is not set"])
            return value
        assert self.inline is not None
        return self.inline.get_secret_value()

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


def secret_source(model: BaseModel, name: str) -> SecretSource | None:
    """The `SecretSource` behind ``name`` / ``name_file`` / ``name_env`` on `model`."""
    inline = getattr(model, name, None)
    file = getattr(model, f"{name}_file", None)
    env = getattr(model, f"{name}_env", None)
    if inline is None and file is None and env is None:
        return None
    return SecretSource(name=name, inline=inline, file=file, env=env)


# ---------------------------------------------------------------------------- providers


class HTTPProviderConfig(Model):
    """Settings every HTTP provider shares."""

    timeout: PositiveDuration = 10.0
    ca_file: Path | None = None
    requests_per_minute: int | None = Field(default=None, gt=0)
    max_concurrency: int | None = Field(default=None, gt=0)
    assume_lifetime: PositiveDuration | None = None

    _check_ca = field_validator("ca_file")(_existing_file)


class OAuth2ProviderConfig(HTTPProviderConfig):
    """Generic OAuth2 client-credentials grant (RFC 6749 §4.4)."""

    kind: Literal["oauth2"]
    token_url: str
    client_id: str
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    client_secret_env: str | None = None
    scopes: list[str] = Field(default_factory=list)
    audience: str | None = None
    body: Literal["form", "json"] = "form"
    client_auth: Literal["body", "basic"] = "body"
    headers: dict[str, str] = Field(default_factory=dict)

    _check_secret_file = field_validator("client_secret_file")(_existing_file)

    @field_validator("token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _http_url(value)

    @model_validator(mode="after")
    def _one_secret(self) -> OAuth2ProviderConfig:
        _secret_fields(self, "client_secret", required=True)
        return self


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


ProviderConfig = Annotated[OAuth2ProviderConfig, Field(discriminator="kind")]


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
    mode: Annotated[int, BeforeValidator(_file_mode)] = 0o600
    group: str | int | None = None
    header_name: str = "Authorization"
    env_name: str = "TOKEN"

    @field_validator("path")
    @classmethod
    def _absolute_or_relative(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if value.endswith("/"):
            raise ValueError("must name a file, not a directory")
        return value


SinkConfig = Annotated[FileSinkConfig, Field(discriminator="kind")]


# ---------------------------------------------------------------------------- jobs and daemon


class BackoffConfig(Model):
    initial: PositiveDuration = 1.0
    max: PositiveDuration = 300.0

    @model_validator(mode="after")
    def _ordered(self) -> BackoffConfig:
        if self.initial > self.max:
            raise ValueError("initial must not exceed max")
        return self


class RefreshConfig(Model):
    """When to refresh: at `refresh_at` of the lifetime, but at least `min_remaining` early."""

    refresh_at: float = Field(default=0.75, gt=0, lt=1)
    min_remaining: Duration = 300.0
    jitter: float = Field(default=0.1, ge=0, lt=0.5)
    backoff: BackoffConfig = BackoffConfig()
    concurrency: int = Field(default=32, gt=0)
    max_retry_after: PositiveDuration = 3600.0


class ServerConfig(Model):
    listen: str = "127.0.0.1:9464"
    admin_token_file: Path | None = None

    _check_admin = field_validator("admin_token_file")(_existing_file)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9464")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


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
    on_expiry: Literal["keep", "remove"] = "keep"
    on_remove: Literal["keep", "delete"] = "keep"


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
    jobs: list[JobConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for job in self.jobs:
            if job.name in seen:
                raise ValueError(f"duplicate job name {job.name!r}")
            seen.add(job.name)
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


def _messages(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors(include_url=False):
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{format_location(tuple(item['loc']))}: {message}")
    return lines


def load_settings(
    path: str | Path | None = None,
    *,
    data: Mapping[str, Any] | None = None,
) -> Settings:
    """Read YAML from `path` (or take `data`), apply env overrides, validate.

    Raises `ConfigError` listing every problem with its location.
    """
    raw: Any = dict(data or {})
    if path is not None:
        file = Path(path)
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError([f"{file}: config file not found"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"{file}: invalid YAML: {exc}"]) from None
        except OSError as exc:
            raise ConfigError([f"{file}: {exc.strerror}"]) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"{file}: top level must be a mapping"])
    base = Path(path).resolve().parent if path is not None else None
    if base is not None:
        raw = _resolve_relative_paths(raw, base)
    try:
        return Settings(**raw)
    except ValidationError as exc:
        raise ConfigError(_messages(exc)) from None


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
