"""Every field of the generic ``oauth2`` provider refuses what it cannot use, with a
message naming the field: wrong types of keys and certificates, algorithms that do
not fit, settings that belong to another grant or client authentication, and the
combinations RFC 6749, 7523, 8693, 8705 and 8707 rule out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from refresher.config import load_settings
from refresher.errors import ConfigError

ISSUER = "https://idp.example.test/realms/acme"


def _pem_files() -> dict[str, bytes]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    pkcs8, pem = serialization.PrivateFormat.PKCS8, serialization.Encoding.PEM
    issued = trustme.CA().issue_cert(common_name="client")
    return {
        "rsa.key": rsa_key.private_bytes(pem, pkcs8, serialization.NoEncryption()),
        "ec384.key": ec_key.private_bytes(pem, pkcs8, serialization.NoEncryption()),
        "encrypted.key": rsa_key.private_bytes(
            pem, pkcs8, serialization.BestAvailableEncryption(b"passphrase")
        ),
        "public.pem": rsa_key.public_key().public_bytes(
            pem, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "garbage": b"not a key at all\n",
        "token": b"eyJhbGciOiJub25lIn0.e30.\n",
        "client.crt": issued.cert_chain_pems[0].bytes(),
        "client.key": issued.private_key_pem.bytes(),
    }


PEM_FILES = _pem_files()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = PEM_FILES
    paths = {}
    for name, content in out.items():
        (tmp_path / name).write_bytes(content)
        paths[name] = str(tmp_path / name)
    (tmp_path / "state").mkdir()
    paths["state"] = str(tmp_path / "state")
    paths["missing"] = str(tmp_path / "missing")
    return paths


def errors(tmp_path: Path, **provider: Any) -> list[str]:
    base: dict[str, Any] = {"kind": "oauth2", "issuer": ISSUER, "client_id": "app",
                            "client_secret": "secret-value-0123456789-0123456789"}
    base.update(provider)
    config = {"jobs": [{"name": "api", "provider": {k: v for k, v in base.items() if v is not None},
                        "sinks": [{"kind": "file", "path": str(tmp_path / "api.token")}]}]}
    try:
        load_settings(data=config)
    except ConfigError as exc:
        return exc.errors
    return []


def resolve(files: dict[str, str], overrides: Any) -> Any:
    """``"@name"`` values (nested too) are the paths of the `files` fixture."""
    if isinstance(overrides, dict):
        return {k: resolve(files, v) for k, v in overrides.items()}
    if isinstance(overrides, str) and overrides.startswith("@"):
        return files[overrides[1:]]
    return overrides


NO_SECRET = {"client_secret": None}

CASES: list[tuple[str, dict[str, Any], str]] = [
    # where: discovery or a token URL
    ("no-endpoint", {"issuer": None}, "set issuer (discovery) or token_url"),
    ("issuer-not-url", {"issuer": "idp.example.test"}, "issuer: must be an http:// or https:// URL"),
    ("issuer-query", {"issuer": ISSUER + "?x=1"}, "issuer: an issuer has no query or fragment"),
    ("token-url", {"token_url": "ftp://x/token"}, "token_url: must be an http:// or https:// URL"),
    # client authentication
    ("client-auth", {"client_auth": "client_secret"}, "client_auth: Input should be"),
    ("no-client-id", {"client_id": None}, "client_id is required with client_auth client_secret_post"),
    ("empty-client-id", {"client_id": ""}, "client_id: String should have at least 1 character"),
    ("secret-missing", NO_SECRET, "one of client_secret, client_secret_file or client_secret_env"),
    ("secret-unused", {"client_auth": "none"}, "client_secret is not used with client_auth none"),
    ("credentials-anonymous", {"client_auth": "none", **NO_SECRET}, "grant client_credentials needs client authentication"),
    ("pkjwt-no-key", {"client_auth": "private_key_jwt", **NO_SECRET}, "client_auth private_key_jwt needs private_key_file"),
    ("hmac-short", {"client_auth": "client_secret_jwt", "client_secret": "short-secret"}, "client_secret: 12 bytes is too short for HS256"),
    ("hmac-alg", {"client_auth": "client_secret_jwt", "signing_alg": "RS256"}, "signing_alg 'RS256': client_secret_jwt signs with HS256/384/512"),
    ("mtls-half", {"tls_client_cert_file": "@client.crt"}, "set both tls_client_cert_file and tls_client_key_file"),
    ("mtls-none", {"client_auth": "tls_client_auth", **NO_SECRET}, "client_auth tls_client_auth needs tls_client_cert_file"),
    ("mtls-cert-garbage", {"tls_client_cert_file": "@garbage", "tls_client_key_file": "@client.key"}, "tls_client_cert_file: not a PEM certificate"),
    ("mtls-key-garbage", {"tls_client_cert_file": "@client.crt", "tls_client_key_file": "@garbage"}, "tls_client_key_file: not a PEM private key"),
    ("mtls-key-missing", {"tls_client_cert_file": "@client.crt", "tls_client_key_file": "@missing"}, "tls_client_key_file: file not found"),
    # keys and signing
    ("key-missing", {"client_auth": "private_key_jwt", "private_key_file": "@missing", **NO_SECRET}, "private_key_file: file not found"),
    ("key-garbage", {"client_auth": "private_key_jwt", "private_key_file": "@garbage", **NO_SECRET}, "private_key_file: not a PEM file"),
    ("key-public", {"client_auth": "private_key_jwt", "private_key_file": "@public.pem", **NO_SECRET}, "private_key_file: not a PEM private key"),
    ("key-encrypted", {"client_auth": "private_key_jwt", "private_key_file": "@encrypted.key", **NO_SECRET}, "private_key_file: an encrypted private key"),
    ("key-unused", {"private_key_file": "@rsa.key"}, "private_key_file is only used with client_auth private_key_jwt"),
    ("alg-misfit", {"client_auth": "private_key_jwt", "private_key_file": "@ec384.key", "signing_alg": "ES256", **NO_SECRET}, "signing_alg 'ES256': an EC key on secp384r1 cannot sign ES256"),
    ("alg-hmac-with-key", {"client_auth": "private_key_jwt", "private_key_file": "@rsa.key", "signing_alg": "HS256", **NO_SECRET}, "signing_alg 'HS256': a private key signs with an asymmetric one"),
    ("alg-unused", {"signing_alg": "RS256"}, "signing_alg is only used with signed assertions"),
    ("kid-unused", {"key_id": "k1"}, "key_id is only used with signed assertions"),
    ("kid-empty", {"client_auth": "private_key_jwt", "private_key_file": "@rsa.key", "key_id": "", **NO_SECRET}, "key_id: String should have at least 1 character"),
    ("cert-unused", {"certificate_file": "@client.crt"}, "certificate_file is only used with signed assertions"),
    ("cert-garbage", {"client_auth": "private_key_jwt", "private_key_file": "@rsa.key", "certificate_file": "@garbage", **NO_SECRET}, "certificate_file: not a PEM certificate"),
    ("aud-unused", {"assertion_audience": "issuer"}, "assertion_audience is only used with signed assertions"),
    ("aud-value", {"client_auth": "private_key_jwt", "private_key_file": "@rsa.key", "assertion_audience": "https://x", **NO_SECRET}, "assertion_audience: Input should be"),
    ("aud-issuer-without-issuer", {"client_auth": "private_key_jwt", "private_key_file": "@rsa.key", "assertion_audience": "issuer", "issuer": None, "token_url": "https://idp.example.test/token", **NO_SECRET}, "assertion_audience issuer needs issuer"),
    # grants
    ("grant", {"grant": "password"}, "grant: Input should be"),
    ("rt-no-file", {"grant": "refresh_token", "state_dir": "@state"}, "grant refresh_token needs refresh_token_file"),
    ("rt-no-state", {"grant": "refresh_token", "refresh_token_file": "@token"}, "grant refresh_token needs state_dir"),
    ("rt-file-unused", {"refresh_token_file": "@token"}, "refresh_token_file is only used with grant refresh_token"),
    ("state-unused", {"state_dir": "@state"}, "state_dir is only used with grant refresh_token"),
    ("state-both", {"grant": "refresh_token", "refresh_token_file": "@token", "state_dir": "@state", "state_secret": {"name": "state"}}, "needs state_dir or (on Kubernetes) state_secret, one of them"),
    ("state-secret-unused", {"state_secret": {"name": "state"}}, "state_secret is only used with grant refresh_token"),
    ("state-secret-name", {"grant": "refresh_token", "refresh_token_file": "@token", "state_secret": {"name": "State_Secret"}}, "state_secret.name: String should match pattern"),
    ("state-secret-namespace", {"grant": "refresh_token", "refresh_token_file": "@token", "state_secret": {"name": "s", "namespace": "a.b"}}, "state_secret.namespace: String should match pattern"),
    ("state-secret-kubeconfig", {"grant": "refresh_token", "refresh_token_file": "@token", "state_secret": {"name": "s", "kubeconfig": "@missing"}}, "state_secret.kubeconfig: file not found"),
    ("state-secret-unknown", {"grant": "refresh_token", "refresh_token_file": "@token", "state_secret": {"name": "s", "key": "x"}}, "state_secret.key: unknown key"),
    ("state-missing", {"grant": "refresh_token", "refresh_token_file": "@token", "state_dir": "@missing"}, "state_dir: not an existing directory"),
    ("state-a-file", {"grant": "refresh_token", "refresh_token_file": "@token", "state_dir": "@token"}, "state_dir: not an existing directory"),
    ("bearer-nothing", {"grant": "jwt_bearer"}, "grant jwt_bearer needs assertion_file, or private_key_file"),
    ("bearer-both", {"grant": "jwt_bearer", "assertion_file": "@token", "private_key_file": "@rsa.key"}, "grant jwt_bearer needs assertion_file, or private_key_file"),
    ("assertion-unused", {"assertion_file": "@token"}, "assertion_file is only used with grant jwt_bearer"),
    ("assertion-missing", {"grant": "jwt_bearer", "assertion_file": "@missing"}, "assertion_file: file not found"),
    ("claims-unused", {"assertion_claims": {"scope": "x"}}, "assertion_claims is only used with grant jwt_bearer"),
    ("claims-with-file", {"grant": "jwt_bearer", "assertion_file": "@token", "assertion_claims": {"scope": "x"}}, "assertion_claims is only used to sign the assertion"),
    ("claims-reserved", {"grant": "jwt_bearer", "private_key_file": "@rsa.key", "assertion_claims": {"aud": "x", "exp": 1}}, "assertion_claims: aud, exp: set by refresher, not here"),
    ("claims-type", {"grant": "jwt_bearer", "private_key_file": "@rsa.key", "assertion_claims": {"scope": {"a": 1}}}, "assertion_claims.scope"),
    ("exchange-no-subject", {"grant": "token_exchange"}, "grant token_exchange needs subject_token_file"),
    ("subject-unused", {"subject_token_file": "@token"}, "subject_token_file is only used with grant token_exchange"),
    ("subject-type", {"grant": "token_exchange", "subject_token_file": "@token", "subject_token_type": "jwt"}, "subject_token_type: 'jwt' is not an absolute URI"),
    ("requested-unused", {"requested_token_type": "urn:ietf:params:oauth:token-type:jwt"}, "requested_token_type is only used with grant token_exchange"),
    ("requested-type", {"grant": "token_exchange", "subject_token_file": "@token", "requested_token_type": "a b"}, "requested_token_type: 'a b' is not an absolute URI"),
    # request parameters
    ("resource-relative", {"resource": ["/api"]}, "resource: '/api' is not an absolute URI"),
    ("resource-fragment", {"resource": ["https://api.example#x"]}, "resource: 'https://api.example#x' is not an absolute URI"),
    ("resource-twice", {"resource": ["https://a.example", "https://a.example"]}, "resource: a resource is listed twice"),
    ("scope-token", {"scopes": ["read write"]}, "scopes: 'read write' is not a scope token"),
    # verification
    ("verify-no-audience", {"verify": {}}, "verify.audience: Field required"),
    ("verify-empty-audience", {"verify": {"audience": ""}}, "verify.audience: String should have at least 1"),
    ("verify-none-alg", {"verify": {"audience": "api", "algorithms": ["none"]}}, "verify.algorithms: 'none' not allowed: only asymmetric algorithms"),
    ("verify-hmac", {"verify": {"audience": "api", "algorithms": ["RS256", "HS256"]}}, "verify.algorithms: 'HS256' not allowed"),
    ("verify-no-algs", {"verify": {"audience": "api", "algorithms": []}}, "verify.algorithms: List should have at least 1"),
    ("verify-jwks-url", {"verify": {"audience": "api", "jwks_url": "file:///etc/keys"}}, "verify.jwks_url: must be an http:// or https:// URL"),
    ("verify-unknown", {"verify": {"audience": "api", "leeway": 3600}}, "verify.leeway: unknown key"),
    ("verify-no-issuer", {"issuer": None, "token_url": "https://idp.example.test/token", "verify": {"audience": "api", "jwks_url": "https://idp.example.test/jwks"}}, "verify.issuer is required without issuer discovery"),
    ("verify-no-jwks", {"issuer": None, "token_url": "https://idp.example.test/token", "verify": {"audience": "api", "issuer": "https://idp.example.test"}}, "verify.jwks_url is required without issuer discovery"),
]


@pytest.mark.parametrize(("overrides", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_naming_the_field(tmp_path, files, overrides, message) -> None:
    found = errors(tmp_path, **resolve(files, overrides))
    assert any(message in line for line in found), found
    assert all(line.startswith("jobs[0].provider") for line in found), found


@pytest.mark.parametrize(
    "overrides",
    [
        {"client_auth": "basic"},
        {"client_auth": "body"},
        {"token_url": "https://idp.example.test/token", "issuer": None, "body": "json", "audience": "https://api"},
        {"client_auth": "none", "grant": "jwt_bearer", "client_id": None, "assertion_file": "@token", **NO_SECRET},
        {"client_auth": "none", "grant": "jwt_bearer", "private_key_file": "@rsa.key", "signing_alg": "PS256",
         "assertion_claims": {"scope": "https://www.googleapis.com/auth/cloud-platform"}, **NO_SECRET},
        {"client_auth": "private_key_jwt", "private_key_file": "@ec384.key", "certificate_file": "@client.crt",
         "key_id": "k1", "assertion_audience": "issuer", **NO_SECRET},
        {"client_auth": "tls_client_auth", "tls_client_cert_file": "@client.crt",
         "tls_client_key_file": "@client.key", **NO_SECRET},
        {"grant": "refresh_token", "refresh_token_file": "@token", "state_dir": "@state",
         "client_auth": "none", **NO_SECRET},
        {"grant": "token_exchange", "subject_token_file": "@token", "client_auth": "none", "client_id": None,
         **NO_SECRET, "resource": ["https://a.example", "urn:partner:api"],
         "verify": {"audience": "urn:partner:api", "algorithms": ["ES256", "EdDSA"]}},
    ],
    ids=["old-basic", "old-body", "token-url-json", "bearer-file", "bearer-signed", "pkjwt-entra",
         "mtls", "refresh", "exchange"],
)
def test_accepted(tmp_path, files, overrides) -> None:
    assert errors(tmp_path, **resolve(files, overrides)) == []


def test_no_files_check_accepts_paths_that_are_not_there_yet(tmp_path) -> None:
    """``check --no-files`` (GitOps): keys, state_dir and token files may be absent."""
    provider = {"kind": "oauth2", "issuer": ISSUER, "client_id": "app", "client_auth": "private_key_jwt",
                "private_key_file": "/run/secrets/key.pem", "signing_alg": "ES256",
                "grant": "refresh_token", "refresh_token_file": "/run/secrets/rt",
                "state_dir": "/var/lib/refresher"}
    config = {"jobs": [{"name": "api", "provider": provider,
                        "sinks": [{"kind": "file", "path": str(tmp_path / "t")}]}]}
    load_settings(data=config, check_files=False)
