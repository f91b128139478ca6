"""`refresher.jwtverify`: the rules any provider verifying a partner's JWT relies on.

Hostile tokens are built by hand (forged headers, HMAC keyed with the public key,
wrong key types, out-of-range claims); keys and JWKS are real, from `cryptography`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from refresher.clock import ManualClock
from refresher.errors import BadResponseError, SecretUnusableError, TransportError
from refresher.jwtverify import LEEWAY, JWKSCache, JWTVerifier, PublicKeyFile

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC = ec.generate_private_key(ec.SECP256R1())


def pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**overrides: Any) -> dict[str, Any]:
    base = {"iss": "https://iss.example", "aud": "api", "sub": "c", "iat": NOW, "exp": NOW + 3600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any = RSA, alg: str = "RS256", kid: str | None = "k1", **overrides: Any) -> str:
    headers = {"kid": kid} if kid else {}
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


def forged(alg: str, secret: bytes = b"") -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": alg, "kid": "k1"}).encode())
    body = b64(json.dumps(claims()).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest() if secret else b""
    return f"{head}.{body}.{b64(signature)}"


def verifier(clock: ManualClock, keys: Any = None, **kwargs: Any) -> JWTVerifier:
    options: dict[str, Any] = {"audience": "api", "issuer": "https://iss.example"}
    options.update(kwargs)
    return JWTVerifier(what="token", clock=clock, keys=keys, **options)


class StaticKey:
    def __init__(self, key: Any) -> None:
        self.value = key

    async def key(self, kid: str | None, alg: str) -> Any:
        return self.value


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=float(NOW))


@pytest.mark.parametrize("algorithms", [("none",), ("HS256",), ("RS256", "HS256"), ()])
def test_only_asymmetric_algorithms_can_be_allowed(clock: ManualClock, algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="only asymmetric"):
        verifier(clock, algorithms=algorithms)


async def test_a_good_token_verifies(clock: ManualClock) -> None:
    verified = await verifier(clock, StaticKey(RSA.public_key())).verify(sign())
    assert verified.signature_verified and verified.claims["sub"] == "c"
    unverified = await verifier(clock).verify(sign())
    assert not unverified.signature_verified


@pytest.mark.parametrize("with_key", [True, False])
async def test_forged_algorithms_are_refused_with_or_without_a_key(clock: ManualClock, with_key: bool) -> None:
    v = verifier(clock, StaticKey(RSA.public_key()) if with_key else None)
    for token in (forged("none"), forged("HS256", pem(RSA)), sign(RSA, "RS512"), sign(RSA, "PS256")):
        with pytest.raises(BadResponseError, match="is not allowed \\(want RS256\\)"):
            await v.verify(token)


async def test_the_key_type_must_fit_the_algorithm(clock: ManualClock) -> None:
    v = verifier(clock, StaticKey(EC.public_key()), algorithms=("RS256", "ES256"))
    with pytest.raises(BadResponseError, match="does not fit alg RS256"):
        await v.verify(sign())
    assert (await v.verify(sign(EC, "ES256"))).signature_verified


async def test_signature_by_another_key_is_refused(clock: ManualClock) -> None:
    with pytest.raises(BadResponseError, match="signature does not verify"):
        await verifier(clock, StaticKey(RSA.public_key())).verify(sign(RSA2))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aud": "other"}, "wrong audience"),
        ({"aud": None}, "wrong audience"),
        ({"iss": "https://evil.example"}, "wrong issuer"),
        ({"iss": None}, "wrong issuer"),
        ({"exp": None}, "has no 'exp' claim"),
        ({"exp": "soon"}, "'exp' is not a finite number"),
        ({"exp": True}, "'exp' is not a finite number"),
        ({"exp": 10**400}, "'exp' is not a finite number"),
        ({"exp": NOW - LEEWAY - 1}, "already expired"),
        ({"nbf": NOW + LEEWAY + 1}, "is not valid before"),
        ({"iat": "yesterday"}, "'iat' is not a finite number"),
    ],
)
async def test_claims_are_checked(clock: ManualClock, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(BadResponseError, match=message):
        await verifier(clock, StaticKey(RSA.public_key())).verify(sign(**overrides))


async def test_leeway_and_what_is_not_checked(clock: ManualClock) -> None:
    v = verifier(clock, StaticKey(RSA.public_key()))
    await v.verify(sign(nbf=NOW + LEEWAY - 1))  # issuer clock slightly ahead
    await v.verify(sign(iat=NOW + 600))  # iat: the issuer's clock decides
    await v.verify(sign(aud=["other", "api"]))  # RFC 7519: aud may be a list
    await verifier(clock, issuer=None).verify(sign(iss="anything"))  # no issuer configured


async def test_public_key_file_is_re_read_when_it_changes(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pem(RSA))
    source = PublicKeyFile(path)
    v = verifier(clock, source)
    await v.verify(sign(RSA))
    path.write_bytes(pem(RSA2))  # the partner rotated its signing key
    await v.verify(sign(RSA2))
    with pytest.raises(BadResponseError, match="signature does not verify"):
        await v.verify(sign(RSA))
    path.unlink()  # mid-swap: the last good key stays
    await v.verify(sign(RSA2))
    path.write_bytes(b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n")
    with pytest.raises(SecretUnusableError, match="not a PEM public key or certificate"):
        await v.verify(sign(RSA2))


async def test_public_key_file_unreadable_at_first_is_a_config_error(tmp_path: Path, clock: ManualClock) -> None:
    with pytest.raises(SecretUnusableError, match="cannot read"):
        await verifier(clock, PublicKeyFile(tmp_path / "missing.pem")).verify(sign())
    private = tmp_path / "private.pem"
    private.write_bytes(
        RSA.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(SecretUnusableError, match="not a PEM public key"):
        await verifier(clock, PublicKeyFile(private)).verify(sign())


def jwk(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    data = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    data.update(kid=kid, **extra)
    return data


class FakeJWKS:
    """A JWKS endpoint in memory: what it serves, and how often it was asked."""

    def __init__(self, *keys: dict[str, Any]) -> None:
        self.keys = list(keys)
        self.calls = 0
        self.fail = False

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.fail:
            raise TransportError("GET /jwks.json: connection refused")
        return {"keys": list(self.keys)}


async def test_jwks_unknown_kid_refetches_at_most_every_30s(clock: ManualClock) -> None:
    served = FakeJWKS(jwk(RSA, "k1"))
    v = verifier(clock, JWKSCache(served, clock=clock))
    await v.verify(sign(RSA, kid="k1"))
    assert served.calls == 1
    for _ in range(5):  # an unknown kid within 30 s of the last fetch: no request
        with pytest.raises(BadResponseError, match="re-fetched at most every 30s"):
            await v.verify(sign(RSA2, kid="k2"))
    assert served.calls == 1
    served.keys.append(jwk(RSA2, "k2"))
    await clock.advance(30)
    await v.verify(sign(RSA2, kid="k2"))  # rotation: fetched once, verified
    assert served.calls == 2
    await v.verify(sign(RSA, kid="k1"))  # known kids need no request
    assert served.calls == 2


async def test_jwks_is_refreshed_when_old_and_kept_if_that_fails(clock: ManualClock) -> None:
    served = FakeJWKS(jwk(RSA, "k1"))
    v = verifier(clock, JWKSCache(served, clock=clock, max_age=3600))
    await v.verify(sign(kid="k1"))
    await clock.advance(3600)
    served.fail = True
    await v.verify(sign(kid="k1"))  # stale and unreachable: the cached keys still work
    assert served.calls == 2
    served.fail = False
    served.keys = [jwk(RSA2, "k2")]  # k1 withdrawn
    await clock.advance(3600)
    with pytest.raises(BadResponseError, match="not in the JWKS"):
        await v.verify(sign(kid="k1"))


async def test_jwks_ignores_symmetric_and_encryption_keys(clock: ManualClock) -> None:
    secret = base64.urlsafe_b64encode(pem(RSA)).rstrip(b"=").decode()
    served = FakeJWKS({"kty": "oct", "kid": "k1", "k": secret}, jwk(RSA2, "k2", use="enc"))
    v = verifier(clock, JWKSCache(served, clock=clock))
    with pytest.raises(BadResponseError, match="no asymmetric signing key"):
        await v.verify(sign(RSA2, kid="k2"))


async def test_jwks_key_alg_must_match_and_kidless_tokens_need_one_key(clock: ManualClock) -> None:
    served = FakeJWKS(jwk(RSA, "k1", alg="PS256"))
    v = verifier(clock, JWKSCache(served, clock=clock), algorithms=("RS256", "PS256"))
    with pytest.raises(BadResponseError, match="does not match its JWKS key's alg 'PS256'"):
        await v.verify(sign(kid="k1"))
    served.keys = [jwk(RSA, "k1"), jwk(RSA2, "k2")]
    v = verifier(clock, JWKSCache(served, clock=clock))
    with pytest.raises(BadResponseError, match="no kid and the JWKS holds 2 keys"):
        await v.verify(sign(kid=None))
    served.keys = [jwk(RSA, "k1")]
    v = verifier(clock, JWKSCache(served, clock=clock))
    assert (await v.verify(sign(kid=None))).signature_verified
