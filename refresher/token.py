"""The `Token` value object and the expiry rule.

A token's value never appears in its `repr` or `str`: log `fingerprint()`.

Every `Token` is safe to write in every sink format: its value is 1 to
`MAX_TOKEN_LENGTH` characters of RFC 6750's ``b64token`` alphabet (letters, digits,
``- . _ ~ + /``, ``=``) plus ``%`` and ``@``, not starting with ``~``; its type is a
short word. No whitespace, quote, ``$``, ``\\`` or control character can reach a
raw, header or env file, and a shell sourcing an env file reads the value back
unchanged. Anything else is refused where it is built (`BadResponseError`).

Expiry is clamped to `MAX_LIFETIME` after issue: a provider promising a token for
a century gets it refreshed within a year.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from refresher.errors import BadResponseError

#: The longest token accepted: Entra ID tokens with many groups reach ~8 KB.
MAX_TOKEN_LENGTH = 64 * 1024
#: The longest lifetime believed; later expiries are clamped to this after issue.
MAX_LIFETIME = 365 * 86400.0

_VALUE = re.compile(r"[A-Za-z0-9\-._+/=%@][A-Za-z0-9\-._~+/=%@]*")
_TOKEN_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def fingerprint(value: str | bytes) -> str:
    """First 12 hex digits of the SHA-256 of `value`: safe to log, stable to compare."""
    # surrogatepass: any str has a fingerprint, even one that is not valid Unicode.
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:12]


def value_problem(value: str) -> str | None:
    """Why `value` is not a token refresher will write (see module docstring), or None."""
    if not value:
        return "is empty"
    if len(value) > MAX_TOKEN_LENGTH:
        return f"is longer than {MAX_TOKEN_LENGTH} characters"
    if _VALUE.fullmatch(value):
        return None
    for index, char in enumerate(value):
        if not _VALUE.fullmatch(("a" if index else "") + char):
            kind = "control character" if not char.isprintable() else f"character {char!r}"
            if char.isspace():
                kind = "whitespace"
            return f"contains a {kind} at position {index + 1}, not allowed in a bearer token"
    return "is not a valid bearer token"  # pragma: no cover - the loop finds the culprit


def rfc3339(moment: float | None) -> str | None:
    """Unix seconds → RFC 3339 UTC (``2026-11-26T01:02:03Z``); None when not representable."""
    if moment is None:
        return None
    try:
        return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return None


def parse_rfc3339(text: str) -> float:
    """RFC 3339 → Unix seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _b64_json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def jwt_claims(value: str) -> dict[str, Any] | None:
    """The unverified claims of `value` if it is a JWT, else None.

    Decoded directly (base64url + JSON), as PyJWT does with ``verify_signature:
    False`` but without its machinery: this runs on every mint and read-back.
    """
    if value.count(".") != 2:
        return None
    header, payload, _ = value.split(".")
    try:
        if not isinstance(_b64_json(header), dict):
            return None
        claims = _b64_json(payload)
    except (ValueError, TypeError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


@dataclass(frozen=True)
class Token:
    """One credential as a provider issued it.

    `expires_at` is None only for static managed credentials that do not expire;
    `recheck_at` says when such a credential is to be checked again (None: never).
    `extra` holds provider metadata worth publishing (e.g. Debitura's creditorId).
    `missing_scopes` lists what was asked for (or expected) but not granted;
    `warning` is something the provider noticed that does not stop the token from
    being used (our own words, never the partner's text).
    """

    value: str = field(repr=False)
    token_type: str
    obtained_at: float
    expires_at: float | None
    scope: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    recheck_at: float | None = None
    missing_scopes: tuple[str, ...] = ()
    warning: str | None = None

    def __post_init__(self) -> None:
        problem = value_problem(self.value) if isinstance(self.value, str) else "is not text"
        if problem is not None:
            raise BadResponseError(f"token value {problem}")
        if not isinstance(self.token_type, str) or not _TOKEN_TYPE.fullmatch(self.token_type):
            raise BadResponseError(
                "token_type must be a short word of letters, digits, '_', '.' or '-'"
            )

    def fingerprint(self) -> str:
        """Short SHA-256 prefix of the value (see `fingerprint`)."""
        return fingerprint(self.value)

    @property
    def lifetime(self) -> float | None:
        if self.expires_at is None:
            return None
        return self.expires_at - self.obtained_at

    def is_valid(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    def __str__(self) -> str:
        return (
            f"Token(type={self.token_type}, fingerprint={self.fingerprint()}, "
            f"expires_at={rfc3339(self.expires_at)})"
        )

    @classmethod
    def from_grant(
        cls,
        value: object,
        *,
        obtained_at: float,
        token_type: object = "Bearer",
        expires_in: object = None,
        scope: object = None,
        extra: Mapping[str, Any] | None = None,
        assume_lifetime: float | None = None,
        field_names: tuple[str, str] = ("access_token", "expires_in"),
    ) -> Token:
        """Build a token from a grant response, applying the expiry rule.

        Expiry = min(``expires_in``, JWT ``exp``). With neither, `assume_lifetime`
        is used if configured; otherwise the response is rejected. `field_names`
        names the provider's own keys in error messages.
        """
        value_field, expires_field = field_names
        if not isinstance(value, str) or not value:
            raise BadResponseError(f"response has no usable {value_field!r}")
        problem = value_problem(value)
        if problem is not None:
            raise BadResponseError(f"{value_field!r} {problem}")
        if token_type is not None and not isinstance(token_type, str):
            raise BadResponseError("'token_type' must be a string")
        if scope is not None and not isinstance(scope, str):
            raise BadResponseError("'scope' must be a space-separated string")
        expires_at = _expiry(value, obtained_at, expires_in, assume_lifetime, expires_field)
        if expires_at <= obtained_at:
            raise BadResponseError(
                "token is already expired when received (JWT 'exp' in the past: check clock skew)"
            )
        return cls(
            value=value,
            token_type=token_type or "Bearer",
            obtained_at=obtained_at,
            expires_at=expires_at,
            scope=_printable(scope, "scope") if scope else None,
            extra=dict(extra or {}),
        )

    @classmethod
    def recovered(
        cls,
        value: str,
        *,
        token_type: str = "Bearer",
        expires_at: float | None,
        obtained_at: float | None,
        scope: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Token | None:
        """A token read back from a sink, with the times its metadata stored.

        A JWT's ``exp`` wins when sooner and its ``iat`` fills a missing issue time.
        Unknown expiry, or anything that would not be a valid `Token` (someone edited
        the file), gives None: the caller treats the job as due rather than trusting
        the token.
        """
        claims = jwt_claims(value)
        if claims is not None and _finite(claims.get("exp")):
            exp = float(claims["exp"])
            expires_at = exp if expires_at is None else min(expires_at, exp)
            if obtained_at is None and _finite(claims.get("iat")):
                obtained_at = float(claims["iat"])
        if expires_at is None or not math.isfinite(expires_at):
            return None
        issued = obtained_at if obtained_at is not None and obtained_at < expires_at else None
        issued = expires_at - 1 if issued is None else issued
        try:
            return cls(
                value=value,
                token_type=token_type,
                obtained_at=issued,
                expires_at=min(expires_at, issued + MAX_LIFETIME),
                scope=scope if isinstance(scope, str) and scope.isprintable() else None,
                extra=dict(extra or {}),
            )
        except BadResponseError:
            return None


def _expiry(
    value: str,
    obtained_at: float,
    expires_in: object,
    assume_lifetime: float | None,
    expires_field: str,
) -> float:
    """min(``expires_in``, JWT ``exp``, `MAX_LIFETIME`); `assume_lifetime` when
    neither is given, else `BadResponseError`."""
    candidates: list[float] = []
    if expires_in is not None:
        lifetime = _number(expires_in, expires_field)
        if lifetime <= 0:
            raise BadResponseError(f"{expires_field!r} must be positive, got {lifetime:g}")
        candidates.append(obtained_at + min(lifetime, MAX_LIFETIME))
    claims = jwt_claims(value)
    if claims is not None and "exp" in claims:
        candidates.append(_number(claims["exp"], "exp claim"))
    if not candidates:
        if assume_lifetime is None:
            raise BadResponseError(
                f"response has no {expires_field!r} and the token is not a JWT with 'exp'"
                " (set assume_lifetime to accept it)"
            )
        candidates.append(obtained_at + assume_lifetime)
    return min(*candidates, obtained_at + MAX_LIFETIME)


def _number(raw: object, name: str) -> float:
    """A finite number; a numeric string (``"3600"``, as some servers send) counts."""
    if isinstance(raw, str) and re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*", raw):
        raw = float(raw)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise BadResponseError(f"{name!r} must be a number, got {type(raw).__name__}")
    try:
        number = float(raw)
    except OverflowError:
        raise BadResponseError(f"{name!r} must be finite") from None
    if not math.isfinite(number):
        raise BadResponseError(f"{name!r} must be finite")
    return number


def _finite(raw: object) -> bool:
    return isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw)


def _printable(raw: str, name: str) -> str:
    if not raw.isprintable() or len(raw) > 4096:
        raise BadResponseError(f"{name!r} must be printable text of at most 4096 characters")
    return raw
