"""The building blocks every configuration section uses: the frozen `Model`,
durations, file checks, and `SecretSource` (``name`` / ``name_file`` / ``name_env``,
re-read at every use), plus what every HTTP provider's section shares. Each
provider's own section lives beside it in ``refresher.providers.<name>``;
`refresher.config` assembles the whole schema.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    WithJsonSchema,
    field_validator,
)

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
checking_files: ContextVar[bool] = ContextVar("checking_files", default=True)


@contextmanager
def files_unchecked() -> Iterator[None]:
    """Validate without requiring the files a config names to exist (GitOps, CI)."""
    token = checking_files.set(False)
    try:
        yield
    finally:
        checking_files.reset(token)


def existing_file(path: Path | None) -> Path | None:
    if path is None or not checking_files.get():
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


def secret_fields(model: BaseModel, name: str, *, required: bool) -> None:
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


class ClientSecretFields(Model):
    """``client_secret`` from inline, ``client_secret_file`` or ``client_secret_env``."""

    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    client_secret_env: str | None = None

    _check_client_secret_file = field_validator("client_secret_file")(existing_file)


class HTTPProviderConfig(Model):
    """Settings every HTTP provider shares."""

    timeout: PositiveDuration = 10.0
    ca_file: Path | None = None
    requests_per_minute: int | None = Field(default=None, gt=0)
    max_concurrency: int | None = Field(default=None, gt=0)
    assume_lifetime: PositiveDuration | None = None
    #: Speak HTTP/2 (negotiated by ALPN over https; http:// stays HTTP/1.1): all of this
    #: host's requests multiplexed on one connection instead of a keep-alive pool.
    http2: StrictBool = False

    _check_ca = field_validator("ca_file")(existing_file)


#: RFC 6749 §3.3 scope-token: printable ASCII except space, ``"`` and ``\``.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,200}")


def scope_tokens(scopes: list[str]) -> list[str]:
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


def require_needs_scopes(require: bool, scopes: list[str], field: str) -> None:
    if require and not scopes:
        raise ValueError(f"require_scopes needs {field}: there is nothing to require")


def http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


def optional_http_url(value: str | None) -> str | None:
    return None if value is None else http_url(value)


def peek_secret(model: BaseModel, name: str) -> str | None:
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
        return http_url(value)
