"""The `Token` value object and the expiry rule.

A token's value never appears in its `repr` or `str`: log `fingerprint()`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from refresher.errors import BadResponseError


def fingerprint(value: str | bytes) -> str:
    """First 12 hex digits of the SHA-256 of `value`: safe to log, stable to compare."""
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:12]


def rfc3339(moment: float | None) -> str | None:
    """Unix seconds → RFC 3339 UTC (``2026-11-26T01:02:03Z``)."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """RFC 3339 → Unix seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _b64_json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def jwt_claims(value: str) -> dict[str, Any] | None:
    """The unverified claims of `value` if it is a JWT, else None.

    Decoded directly (base64url + JSON), as PyJWT does with ``verify_signature:
    False`` but ~5x cheaper: this runs on every mint and every restart read-back.
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

    `expires_at` is None only for static managed credentials that do not expire.
    `extra` holds provider metadata worth publishing (e.g. Debitura's creditorId).
    """

    value: str = field(repr=False)
    token_type: str
    obtained_at: float
    expires_at: float | None
    scope: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

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
        candidates: list[float] = []
        if expires_in is not None:
            lifetime = _number(expires_in, expires_field)
            if lifetime <= 0:
                raise BadResponseError(f"{expires_field!r} must be positive, got {lifetime:g}")
            candidates.append(obtained_at + lifetime)
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
        expires_at = min(candidates)
        if expires_at <= obtained_at:
            raise BadResponseError(
                "token is already expired when received (JWT 'exp' in the past: check clock skew)"
            )
        return cls(
            value=value,
            token_type=str(token_type or "Bearer"),
            obtained_at=obtained_at,
            expires_at=expires_at,
            scope=str(scope) if scope is not None else None,
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
        Unknown expiry gives None: the caller treats the job as due rather than
        trusting the token forever.
        """
        claims = jwt_claims(value)
        if claims is not None and isinstance(claims.get("exp"), (int, float)):
            exp = float(claims["exp"])
            expires_at = exp if expires_at is None else min(expires_at, exp)
            if obtained_at is None and isinstance(claims.get("iat"), (int, float)):
                obtained_at = float(claims["iat"])
        if expires_at is None:
            return None
        return cls(
            value=value,
            token_type=token_type,
            obtained_at=obtained_at if obtained_at is not None else expires_at - 1,
            expires_at=expires_at,
            scope=scope,
            extra=dict(extra or {}),
        )


def _number(raw: object, name: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise BadResponseError(f"{name!r} must be a number, got {type(raw).__name__}")
    number = float(raw)
    if not math.isfinite(number):
        raise BadResponseError(f"{name!r} must be finite")
    return number
