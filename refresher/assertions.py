"""Signed JWT assertions (RFC 7523): the ones a client authenticates with
(``client_secret_jwt``, ``private_key_jwt``, §2.2 and §3) and the ones it presents
as an authorization grant (``jwt_bearer``, §2.1).

Every assertion carries ``iss``, ``aud``, ``iat``, ``nbf``, ``exp`` (`LIFETIME`
seconds after issue: short, as RFC 7523 §3 and Entra ID ask) and a fresh ``jti``;
client assertions also ``sub`` = the client id. Keys come from PEM files re-read
whenever their content changes (`PrivateKeyFile`, `CertificateFile`), so a rotated
key signs the next assertion without a restart. The algorithm follows the key
(`default_algorithm`) unless configured, and must fit it (`algorithm_problem`).
Neither keys nor assertions are ever logged.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from refresher.errors import SecretUnusableError
from refresher.jwtverify import ASYMMETRIC_ALGORITHMS, PemFile, key_fits

#: Seconds an assertion is valid for.
LIFETIME = 120.0
#: What ``client_secret_jwt`` may sign with (RFC 7518 §3.2).
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
#: The claims refresher sets itself; ``assertion_claims`` may not replace them.
RESERVED_CLAIMS = frozenset({"iss", "aud", "iat", "nbf", "exp", "jti"})

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_SIGNING_KEYS = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)


def load_private_key(data: bytes) -> Any:
    """An RSA, EC or Ed25519 private key from unencrypted PEM, or `ValueError` saying
    what `data` is instead."""
    if b"-----BEGIN" not in data:
        raise ValueError("not a PEM file")
    if b"ENCRYPTED" in data:
        raise ValueError("an encrypted private key (give it unencrypted)")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError("not a PEM private key") from None
    if not isinstance(key, _SIGNING_KEYS):
        kind = type(key).__name__.removeprefix("_")
        raise ValueError(f"a {kind}, not an RSA, EC or Ed25519 private key")
    return key


def default_algorithm(key: Any) -> str:
    """What a key signs with unless told: RS256, ES256/384/512 by curve, or EdDSA."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return _EC_ALGORITHMS.get(key.curve.name, "ES256")
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return "EdDSA"
    return "RS256"


def algorithm_problem(key: Any, alg: str) -> str | None:
    """Why `key` cannot sign `alg`, or None."""
    if alg not in ASYMMETRIC_ALGORITHMS:
        allowed = ", ".join(sorted(ASYMMETRIC_ALGORITHMS))
        return f"{alg!r} is not an asymmetric algorithm ({allowed})"
    if not key_fits(key, alg):
        return f"{describe_key(key)} cannot sign {alg}"
    return None


def describe_key(key: Any) -> str:
    """``an RSA key``, ``an EC key on secp384r1``, ``an Ed25519 key``."""
    if isinstance(key, rsa.RSAPrivateKey):
        return "an RSA key"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key on {key.curve.name}"
    return "an Ed25519 key"


class PrivateKeyFile(PemFile):
    """The private key of ``private_key_jwt`` and self-signed ``jwt_bearer`` assertions."""

    field = "private_key_file"

    def parse(self, data: bytes) -> Any:
        try:
            return load_private_key(data)
        except ValueError as exc:
            raise SecretUnusableError(f"{self.field} {self.path}: {exc}") from None


class CertificateFile(PemFile):
    """The X.509 certificate of the signing key: its thumbprints name the key in the
    assertion header (``x5t``, ``x5t#S256``, RFC 7515 §4.1.7-8), as Entra ID asks of
    certificate credentials."""

    field = "certificate_file"

    def parse(self, data: bytes) -> Any:
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError:
            raise SecretUnusableError(f"{self.field} {self.path}: not a PEM certificate") from None

    def thumbprints(self) -> dict[str, str]:
        der = self.load().public_bytes(Encoding.DER)
        return {
            "x5t": _b64url(hashlib.sha1(der, usedforsecurity=False).digest()),
            "x5t#S256": _b64url(hashlib.sha256(der).digest()),
        }


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_assertion(
    *,
    issuer: str,
    audience: str,
    now: float,
    key: Any,
    algorithm: str,
    subject: str | None = None,
    claims: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """A fresh assertion: `claims` plus the registered ones refresher sets."""
    issued = int(now)
    payload: dict[str, Any] = dict(claims or {})
    if subject is not None:
        payload["sub"] = subject
    payload.update(
        iss=issuer,
        aud=audience,
        iat=issued,
        nbf=issued,
        exp=issued + int(LIFETIME),
        jti=uuid.uuid4().hex,
    )
    return jwt.encode(payload, key, algorithm=algorithm, headers={"typ": "JWT", **(headers or {})})
