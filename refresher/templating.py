"""The template language of ``kind: template`` sinks: placeholders, nothing else.

A template is text with ``${field}`` placeholders. There are no expressions, loops,
conditions, includes or function calls, and a template can read nothing but the
fields below: no files, no environment, no code. ``$${`` writes a literal ``${``;
every other ``$`` is text (so nginx's ``$host`` or a shell's ``$HOME`` need no
escaping).

The fields of one token (`FIELDS`), plus ``${metadata.KEY}`` for what the provider
published with it. Text that comes from outside — the tenant id, the username, a
metadata value — is inserted only when it is made of `INERT` characters (letters,
digits and ``- . _ ~ + / = % @ :``), so it cannot close a quote, start a comment or
end a line in any format; anything else fails the render, and nothing is written.
The token itself is already restricted to that alphabet (`refresher.token`).

A template is checked once when it is loaded: an unknown field or an unclosed
``${`` is an error naming its line and column.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from refresher.errors import TemplateError
from refresher.token import Token, parse_rfc3339, rfc3339

#: What ``${...}`` may name, besides ``metadata.KEY``.
FIELDS = (
    "value",
    "token_type",
    "expires_at",
    "obtained_at",
    "fingerprint",
    "job",
    "tenant",
    "username",
    "value_b64",
    "basic_b64",
    "value_json",
)
#: The fields that carry the token: a template must use at least one.
TOKEN_FIELDS = frozenset({"value", "value_b64", "basic_b64", "value_json"})
#: Fields whose text comes from outside refresher's own formatting.
OUTSIDE_FIELDS = frozenset({"tenant", "username"})
#: Outside text a template may insert (and a leading "~" is refused: a shell expands it).
INERT = re.compile(r"(?:[A-Za-z0-9._+/=%@:-][A-Za-z0-9._~+/=%@:-]*)?")
MAX_TEMPLATE_BYTES = 256 * 1024

_PLACEHOLDER = re.compile(r"\$\$\{|\$\{")
_METADATA_KEY = re.compile(r"metadata\.[A-Za-z0-9_.-]{1,64}")
#: How each field looks in a rendered file, for reading a token back out of it.
_SHAPES = {
    "value": r"[A-Za-z0-9\-._~+/=%@]+",
    "token_type": r"[A-Za-z0-9_.-]+",
    "expires_at": r"[0-9T:.Z+-]*",
    "obtained_at": r"[0-9T:.Z+-]*",
    "fingerprint": r"[0-9a-f]{12}",
    "value_b64": r"[A-Za-z0-9+/=]+",
    "basic_b64": r"[A-Za-z0-9+/=]+",
    "value_json": r'"[A-Za-z0-9\-._~+/=%@]+"',
}


@dataclass(frozen=True)
class Field:
    """One ``${name}`` of a template."""

    name: str


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and `Field`s, in order."""

    parts: tuple[str | Field, ...]

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(p.name for p in self.parts if isinstance(p, Field))

    def render(self, values: Mapping[str, str]) -> str:
        """The text with every field filled from `values` (see `token_values`);
        `TemplateError` if one is missing or not safe to insert."""
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = values.get(part.name)
            if value is None:
                raise TemplateError(f"${{{part.name}}}: the token has no such metadata")
            outside = part.name.startswith("metadata.") or part.name in OUTSIDE_FIELDS
            if outside and not INERT.fullmatch(value):
                raise TemplateError(
                    f"${{{part.name}}} holds characters a template does not insert "
                    "(only letters, digits and - . _ ~ + / = % @ :)"
                )
            out.append(value)
        return "".join(out)

    def read_token(self, text: str, known: Mapping[str, str]) -> Token | None:
        """The token a file rendered from this template holds, or None when the file
        does not match the template (edited, or rendered from another version)."""
        pattern, groups = self._pattern(known)
        match = pattern.fullmatch(text)
        if match is None:
            return None
        found = {name: match[group] for name, group in groups.items()}
        try:
            value = _token_value(found, known.get("username", ""))
            expires = found.get("expires_at") or None
            obtained = found.get("obtained_at") or None
            return Token.recovered(
                value,
                token_type=found.get("token_type") or "Bearer",
                expires_at=parse_rfc3339(expires) if expires else None,
                obtained_at=parse_rfc3339(obtained) if obtained else None,
            )
        except ValueError:
            return None

    def _pattern(self, known: Mapping[str, str]) -> tuple[re.Pattern[str], dict[str, str]]:
        regex: list[str] = []
        groups: dict[str, str] = {}
        for part in self.parts:
            if isinstance(part, str):
                regex.append(re.escape(part))
            elif part.name in known:
                regex.append(re.escape(known[part.name]))
            elif part.name in groups:
                regex.append(f"(?P={groups[part.name]})")
            else:
                groups[part.name] = f"g{len(groups)}"
                shape = _SHAPES.get(part.name, r"[^\n]*?")
                regex.append(f"(?P<{groups[part.name]}>{shape})")
        return re.compile("".join(regex), re.DOTALL), groups


def _token_value(found: Mapping[str, str], username: str) -> str:
    """The token out of whichever token field the template shows (ValueError if none)."""
    if "value" in found:
        return found["value"]
    if "value_json" in found:
        return str(json.loads(found["value_json"]))
    if "value_b64" in found:
        return base64.b64decode(found["value_b64"], validate=True).decode()
    basic = base64.b64decode(found["basic_b64"], validate=True).decode()
    user, sep, value = basic.partition(":")
    if not sep or user != username:
        raise ValueError("not this username's credentials")
    return value


def parse_template(text: str) -> Template:
    """Parse a template; `TemplateError` naming the line and column of the first problem."""
    if len(text.encode()) > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"is larger than {MAX_TEMPLATE_BYTES // 1024} KiB")
    if "\x00" in text:
        line, column = _position(text, text.index("\x00"))
        raise TemplateError(f"line {line}, column {column}: contains a NUL character")
    parts: list[str | Field] = []
    literal: list[str] = []
    position = 0
    for match in _PLACEHOLDER.finditer(text):
        if match.start() < position:
            continue  # inside a placeholder already read
        literal.append(text[position : match.start()])
        if match.group() == "$${":
            literal.append("${")
            position = match.end()
            continue
        name, end = _placeholder(text, match)
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(Field(name))
        position = end + 1
    literal.append(text[position:])
    if "".join(literal):
        parts.append("".join(literal))
    template = Template(tuple(parts))
    if not template.fields & TOKEN_FIELDS:
        raise TemplateError(
            "never inserts the token: use ${value}, ${value_b64}, ${basic_b64} or ${value_json}"
        )
    return template


def _placeholder(text: str, match: re.Match[str]) -> tuple[str, int]:
    """The field a ``${`` at `match` names and the offset of its ``}``;
    `TemplateError` naming the line and column if it is unclosed or unknown."""
    end = text.find("}", match.end())
    line, column = _position(text, match.start())
    if end < 0 or "\n" in text[match.end() : end]:
        raise TemplateError(f"line {line}, column {column}: '${{' is not closed by '}}'")
    name = text[match.end() : end]
    if name not in FIELDS and not _METADATA_KEY.fullmatch(name):
        raise TemplateError(
            f"line {line}, column {column}: unknown field ${{{name}}} "
            f"(fields: {', '.join(FIELDS)}, metadata.KEY)"
        )
    return name, end


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def token_values(
    token: Token, *, job: str, tenant: str | None, username: str | None
) -> dict[str, str]:
    """Every field a template may use, for one token."""
    user = username or ""
    values = {
        "value": token.value,
        "token_type": token.token_type,
        "expires_at": rfc3339(token.expires_at) or "",
        "obtained_at": rfc3339(token.obtained_at) or "",
        "fingerprint": token.fingerprint(),
        "job": job,
        "tenant": tenant or "",
        "username": user,
        "value_b64": base64.b64encode(token.value.encode()).decode(),
        "basic_b64": base64.b64encode(f"{user}:{token.value}".encode()).decode(),
        "value_json": json.dumps(token.value),
    }
    for key, raw in token.extra.items():
        if isinstance(raw, str) or (isinstance(raw, int | float) and not isinstance(raw, bool)):
            values[f"metadata.{key}"] = str(raw)
    return values
