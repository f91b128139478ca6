"""Verifying a JWT a partner issued, before it is written anywhere.

One `JWTVerifier` per configured issuer. Its rules, whoever uses it:

* the header's ``alg`` must be on the allow-list, always, even when no key is
  configured (then the signature is not verified and `VerifiedJWT.signature_verified`
  says so, for ``refresher check`` to warn about);
* only asymmetric algorithms can be allowed: never ``none``, never HMAC (a public
  key used as an HMAC secret is the classic forgery), and the key's type must fit the
  algorithm (an RSA key for RS*/PS*, EC for ES*, Ed25519/Ed448 for EdDSA);
* the key comes from a PEM file, re-read whenever its content changes
  (`PublicKeyFile`), or from a JWKS, cached and re-fetched when a token names an
  unknown ``kid``, at most once per `JWKS_REFETCH_INTERVAL` (`JWKSCache`);
* ``aud`` and ``iss`` are checked whenever configured; ``exp`` is required and
  ``nbf`` honoured, both with `LEEWAY` seconds of clock difference, on the
  injectable clock. ``iat`` only has to be a number: the issuer's clock decides
  when its tokens start working, so a provider clock ahead of ours is no reason
  to refuse one.

Everything refused is a `BadResponseError` (nothing is written); a key file that
cannot be read is the job's configuration problem (`SecretUnusableError`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import jwt
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from refresher.clock import Clock
from refresher.errors import BadResponseError, ProviderError, SecretUnusableError

log = structlog.get_logger("refresher.jwtverify")

#: What a verifier may be told to accept. Never ``none``, never HMAC (HS*).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
#: Seconds of clock difference tolerated on ``exp`` and ``nbf``.
LEEWAY = 60.0
#: A token naming an unknown ``kid`` re-fetches the JWKS at most this often (seconds).
JWKS_REFETCH_INTERVAL = 30.0
#: A JWKS older than this is re-fetched at the next verification (removed keys go away).
JWKS_MAX_AGE = 3600.0
#: A key file is a few kilobytes; refuse to read more than this.
MAX_KEY_FILE_BYTES = 1 << 20

_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}


def shown(value: object) -> str:
    """A value from a token, safe and short enough for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class VerifiedJWT:
    """A JWT that passed every configured check."""

    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    #: False when no key is configured: only the claims were checked.
    signature_verified: bool


class KeySource(Protocol):
    """Where a verifier finds the key for a token's ``kid`` and ``alg``."""

    async def key(self, kid: str | None, alg: str) -> Any:
        """A public key (or `jwt.PyJWK`) to verify with; `ProviderError` if none fits."""
        ...


#: The curve each ECDSA algorithm signs with (RFC 7518 §3.4).
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


def key_fits(key: Any, alg: str) -> bool:
    """Whether `key` (public or private) can sign or verify `alg`: its type, and for
    ECDSA its curve, are the algorithm's."""
    public = key.public_key() if hasattr(key, "private_bytes") else key
    if not isinstance(public, _KEY_TYPES.get(alg[:2], ())):
        return False
    if isinstance(public, ec.EllipticCurvePublicKey) and alg in _CURVES:
        return bool(public.curve.name == _CURVES[alg])
    return True


class PemFile:
    """A PEM file, re-read whenever its content changes: a rotated key takes effect at
    its next use, without a restart. `field` names the setting in messages; subclasses
    say what the PEM must hold (`parse`)."""

    field = "key_file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pem: bytes | None = None
        self._key: Any = None

    def load(self) -> Any:
        """The current key. A file that vanished (mid-swap) keeps the last good key."""
        try:
            with self.path.open("rb") as file:
                data = file.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            if self._key is not None:
                return self._key
            raise SecretUnusableError(
                f"{self.field} {self.path}: cannot read ({exc.strerror or exc})"
            ) from None
        if data != self._pem:
            if len(data) > MAX_KEY_FILE_BYTES:
                raise SecretUnusableError(
                    f"{self.field} {self.path}: larger than {MAX_KEY_FILE_BYTES} bytes"
                )
            self._key = self.parse(data)
            if self._pem is not None:
                log.info("key file changed: using the new key", path=str(self.path))
            self._pem = data
        return self._key

    @property
    def pem(self) -> bytes | None:
        """The content last loaded (None before the first `load`)."""
        return self._pem

    def parse(self, data: bytes) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class PublicKeyFile(PemFile):
    """A PEM public key or certificate to verify with."""

    field = "public_key_file"

    def parse(self, data: bytes) -> Any:
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                return x509.load_pem_x509_certificate(data).public_key()
            return load_pem_public_key(data)
        except (ValueError, TypeError):
            raise SecretUnusableError(
                f"{self.field} {self.path}: not a PEM public key or certificate"
            ) from None

    async def key(self, kid: str | None, alg: str) -> Any:
        return self.load()


class JWKSCache:
    """A JWKS fetched with `fetch`, cached, and re-fetched when a token names a ``kid``
    it does not hold (at most once per `refetch_interval`) or when older than `max_age`.

    Only signing keys of asymmetric types are kept (``use`` absent or ``sig``; ``kty``
    RSA, EC or OKP): a symmetric (``oct``) key in a JWKS is never a verification key.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Mapping[str, Any]]],
        *,
        clock: Clock,
        refetch_interval: float = JWKS_REFETCH_INTERVAL,
        max_age: float = JWKS_MAX_AGE,
    ) -> None:
        self._fetch = fetch
        self.clock = clock
        self.refetch_interval = refetch_interval
        self.max_age = max_age
        self._keys: list[dict[str, Any]] | None = None
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._lock = anyio.Lock()
        #: How many times the JWKS was requested (for tests and logs).
        self.fetches = 0

    async def key(self, kid: str | None, alg: str) -> Any:
        async with self._lock:
            now = self.clock.now()
            if self._keys is None:
                await self._refresh(now)
            elif now - self._fetched_at >= self.max_age:
                await self._refresh(now, keep_on_failure=True)
            found = self._find(kid)
            if found is None and kid is not None:
                wait = self._attempted_at + self.refetch_interval - now
                if wait > 0:
                    raise BadResponseError(
                        f"token key id {shown(kid)} is not in the JWKS (re-fetched at most "
                        f"every {self.refetch_interval:g}s: next in {wait:.0f}s)"
                    )
                await self._refresh(now)
                found = self._find(kid)
        if found is None:
            if kid is None:
                raise BadResponseError(
                    f"token has no kid and the JWKS holds {len(self._keys or [])} keys"
                )
            raise BadResponseError(f"token key id {shown(kid)} is not in the JWKS")
        declared = found.get("alg")
        if declared is not None and declared != alg:
            raise BadResponseError(
                f"token alg {shown(alg)} does not match its JWKS key's alg {shown(declared)}"
            )
        try:
            return jwt.PyJWK(found, algorithm=alg)
        except jwt.PyJWTError as exc:
            raise BadResponseError(f"JWKS key {shown(found.get('kid'))} unusable: {exc}") from None

    def _find(self, kid: str | None) -> dict[str, Any] | None:
        keys = self._keys or []
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        return next((k for k in keys if k.get("kid") == kid), None)

    async def _refresh(self, now: float, *, keep_on_failure: bool = False) -> None:
        self._attempted_at = now
        self.fetches += 1
        try:
            document = await self._fetch()
            keys = _signing_keys(document)
        except ProviderError as exc:
            if keep_on_failure and self._keys is not None:
                log.warning("JWKS re-fetch failed: keeping the cached keys", error=str(exc))
                return
            raise
        self._keys = keys
        self._fetched_at = now


def _signing_keys(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise BadResponseError("JWKS has no 'keys' list")
    usable = [
        key
        for key in keys
        if isinstance(key, dict)
        and key.get("kty") in ("RSA", "EC", "OKP")
        and key.get("use", "sig") == "sig"
    ]
    if not usable:
        raise BadResponseError("JWKS holds no asymmetric signing key")
    return usable


class JWTVerifier:
    """Checks a JWT's header, signature (when a key source is given) and claims."""

    def __init__(
        self,
        *,
        what: str,
        clock: Clock,
        keys: KeySource | None,
        audience: str | None,
        issuer: str | None,
        algorithms: Collection[str] = ("RS256",),
        leeway: float = LEEWAY,
    ) -> None:
        refused = sorted(set(algorithms) - ASYMMETRIC_ALGORITHMS)
        if refused or not algorithms:
            raise ValueError(
                f"algorithms {refused or '(none)'} not allowed: only asymmetric ones "
                f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
            )
        self.what = what
        self.clock = clock
        self.keys = keys
        self.audience = audience
        self.issuer = issuer
        self.algorithms = frozenset(algorithms)
        self.leeway = leeway

    @property
    def verifies_signature(self) -> bool:
        return self.keys is not None

    async def verify(self, value: str) -> VerifiedJWT:
        """The verified header and claims of `value`, or `BadResponseError` naming the rule."""
        what = self.what
        try:
            header = jwt.get_unverified_header(value)
        except jwt.PyJWTError:
            raise BadResponseError(f"{what} is not a JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise BadResponseError(
                f"{what} header alg {shown(alg)} is not allowed "
                f"(want {' or '.join(sorted(self.algorithms))})"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise BadResponseError(f"{what} header kid is not a string")
        key: Any = None
        if self.keys is not None:
            key = await self.keys.key(kid, alg)
            plain = key.key if isinstance(key, jwt.PyJWK) else key
            if not key_fits(plain, alg):
                raise BadResponseError(
                    f"{what}: the verification key ({type(plain).__name__}) does not fit alg {alg}"
                )
        try:
            decoded = jwt.decode_complete(
                value,
                key,
                algorithms=[alg],
                options={
                    "verify_signature": key is not None,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise BadResponseError(f"{what} signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise BadResponseError(f"{what} rejected: {type(exc).__name__}: {exc}") from None
        claims = decoded["payload"]
        if not isinstance(claims, dict):
            raise BadResponseError(f"{what} payload is not a JSON object")
        self._check_claims(claims)
        return VerifiedJWT(header=header, claims=claims, signature_verified=key is not None)

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        what, now = self.what, self.clock.now()
        if self.audience is not None:
            aud = claims.get("aud")
            ok = aud == self.audience or (isinstance(aud, list) and self.audience in aud)
            if not ok:
                raise BadResponseError(
                    f"{what} has the wrong audience {shown(aud)} (want {self.audience!r})"
                )
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise BadResponseError(
                f"{what} has the wrong issuer {shown(claims.get('iss'))} (want {self.issuer!r})"
            )
        exp = _number(claims, "exp", what, required=True)
        assert exp is not None
        if exp <= now - self.leeway:
            raise BadResponseError(f"{what} is already expired (check clock skew)")
        nbf = _number(claims, "nbf", what, required=False)
        if nbf is not None and nbf > now + self.leeway:
            raise BadResponseError(
                f"{what} is not valid before {nbf:.0f} ({nbf - now:.0f}s from now: clock skew?)"
            )
        _number(claims, "iat", what, required=False)


def _number(claims: Mapping[str, Any], name: str, what: str, *, required: bool) -> float | None:
    raw = claims.get(name)
    if raw is None:
        if required:
            raise BadResponseError(f"{what} has no {name!r} claim")
        return None
    number = math.nan
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        with contextlib.suppress(OverflowError):
            number = float(raw)
    if not math.isfinite(number):
        raise BadResponseError(f"{what} claim {name!r} is not a finite number: {shown(raw)}")
    return number
