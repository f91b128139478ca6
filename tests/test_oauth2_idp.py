"""The generic ``oauth2`` provider against an authorization server nobody here wrote:
node-oidc-provider (tests/idp), over HTTPS on loopback. Every client authentication
method and grant it supports, discovery, JWT verification with key rotation, and a
token for the wrong audience never written.

What it does not do (RFC 8693 token exchange, RFC 7523 JWT bearer grants) and the
failure modes a real server will not produce on cue are in test_oauth2.py, against
the project's emulator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx2
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from refresher.clock import ManualClock
from refresher.errors import BadResponseError, SecretUnusableError, UnauthorizedError
from refresher.jwtverify import JWKS_REFETCH_INTERVAL
from refresher.providers.base import HTTPClients
from refresher.providers.oauth2 import OAuth2Provider, OAuth2ProviderConfig
from refresher.token import Token
from tests.conftest import metric, wait_for
from tests.emulators.tls import install_certificate
from tests.idp import (
    BASIC_SECRET,
    HMAC_SECRET,
    POST_SECRET,
    RESOURCE,
    IndependentServer,
    claims_of,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IndependentServer]:
    server = IndependentServer(tmp_path_factory.mktemp("idp"))
    yield server
    server.stop()


@pytest.fixture
def clock() -> ManualClock:
    # oidc-provider keeps real time: so do the provider's checks.
    return ManualClock(start=time.time())


@pytest.fixture
def make(idp: IndependentServer, http_clients: HTTPClients, clock: ManualClock, leak_guard: Any) -> Any:
    def build(**fields: Any) -> OAuth2Provider:
        config = OAuth2ProviderConfig.model_validate(
            {"kind": "oauth2", "issuer": idp.issuer, "ca_file": str(idp.ca_file), **fields}
        )
        provider = OAuth2Provider(config, clients=http_clients, clock=clock)
        provider.starting("idp")
        for secret in provider.secrets():
            leak_guard.secrets.add(secret)
        return provider

    return build


def verify(audience: str = RESOURCE, **fields: Any) -> dict[str, Any]:
    return {"audience": audience, **fields}


def pem_file(key: Any, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def requests_of(provider: OAuth2Provider) -> list[httpx2.Request]:
    """Every request the provider's HTTP client sends from now on, as sent."""
    seen: list[httpx2.Request] = []

    async def record(request: httpx2.Request) -> None:
        seen.append(request)

    provider.client.event_hooks["request"].append(record)
    return seen


async def minted(provider: OAuth2Provider, leak_guard: Any) -> Token:
    token = await provider.fetch(None)
    leak_guard.secrets.add(token.value)
    return token


# ---------------------------------------------------------------------------- discovery


async def test_discovery_finds_the_token_endpoint_jwks_and_methods(make, idp) -> None:
    provider = make(client_id="post", client_secret=POST_SECRET)
    metadata = await provider.discover()
    assert metadata.url == idp.issuer + "/.well-known/openid-configuration"
    assert metadata.token_endpoint == idp.token_endpoint
    assert metadata.jwks_uri == idp.issuer + "/jwks"
    assert set(metadata.auth_methods or ()) >= {
        "client_secret_basic", "client_secret_post", "client_secret_jwt", "private_key_jwt",
        "tls_client_auth", "none",
    }
    assert metadata.supports_grant("client_credentials")


def test_check_online_reports_discovery(idp, tmp_path, leak_guard) -> None:
    (tmp_path / "secret").write_text(POST_SECRET)
    leak_guard.secrets.add(POST_SECRET)
    config = {
        "jobs": [{
            "name": "idp",
            "provider": {"kind": "oauth2", "issuer": idp.issuer, "ca_file": str(idp.ca_file),
                         "client_id": "post", "client_secret_file": str(tmp_path / "secret"),
                         "resource": [RESOURCE], "verify": verify()},
            "sinks": [{"kind": "file", "path": str(tmp_path / "idp.token")}],
        }]
    }
    (tmp_path / "refresher.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "refresher", "check", "--online", "-c", str(tmp_path / "refresher.yaml")],
        capture_output=True, text=True, timeout=60,
    )
    leak_guard.extra_outputs.extend([done.stdout, done.stderr])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"discovery {idp.issuer}/.well-known/openid-configuration: issuer {idp.issuer}" in done.stdout
    assert f"token_endpoint {idp.token_endpoint}" in done.stdout
    assert "client_auth client_secret_post, grant client_credentials: supported" in done.stdout
    assert not (tmp_path / "idp.token").exists()  # --online writes nothing


# ---------------------------------------------------------------------------- client authentication


@pytest.mark.parametrize(
    ("client_id", "client_auth", "secret"),
    [
        ("basic", "client_secret_basic", BASIC_SECRET),
        ("basic", "basic", BASIC_SECRET),  # the old name
        ("post", "client_secret_post", POST_SECRET),
        ("post", "body", POST_SECRET),  # the old name
        ("hmac", "client_secret_jwt", HMAC_SECRET),
    ],
)
async def test_client_secret_methods(make, leak_guard, client_id, client_auth, secret) -> None:
    provider = make(
        client_id=client_id, client_auth=client_auth, client_secret=secret,
        scopes=["read"], resource=[RESOURCE], verify=verify(),
    )
    token = await minted(provider, leak_guard)
    claims = claims_of(token.value)
    assert claims["client_id"] == client_id and claims["aud"] == RESOURCE
    assert token.scope == "read"


@pytest.mark.parametrize(
    ("client_id", "signing_alg", "expected"),
    [
        ("rsa-jwt", None, "RS256"),
        ("rsa-jwt", "PS256", "PS256"),
        ("ec-jwt", None, "ES256"),
        ("ed-jwt", None, "EdDSA"),
    ],
)
async def test_private_key_jwt(make, idp, tmp_path, leak_guard, client_id, signing_alg, expected) -> None:
    key = pem_file(idp.client_keys[client_id], tmp_path / "client.key")
    leak_guard.secrets.add(key.read_text().strip())
    provider = make(
        client_id=client_id, client_auth="private_key_jwt", private_key_file=str(key),
        key_id=f"{client_id}-1", signing_alg=signing_alg, resource=[RESOURCE], verify=verify(),
    )
    sent = requests_of(provider)
    token = await minted(provider, leak_guard)
    assert claims_of(token.value)["client_id"] == client_id
    [request] = [r for r in sent if str(r.url) == idp.token_endpoint]
    [client_assertion] = parse_qs(request.content.decode())["client_assertion"]
    header = jwt.get_unverified_header(client_assertion)
    assert header["alg"] == expected and header["kid"] == f"{client_id}-1"
    assertion = claims_of(client_assertion)
    assert assertion["iss"] == assertion["sub"] == client_id
    assert assertion["aud"] == idp.token_endpoint
    assert assertion["exp"] - assertion["iat"] <= 120


async def test_private_key_jwt_with_the_issuer_as_audience(make, idp, tmp_path, leak_guard) -> None:
    key = pem_file(idp.client_keys["rsa-jwt"], tmp_path / "client.key")
    leak_guard.secrets.add(key.read_text().strip())
    provider = make(
        client_id="rsa-jwt", client_auth="private_key_jwt", private_key_file=str(key),
        assertion_audience="issuer",
    )
    await minted(provider, leak_guard)


async def test_a_rotated_private_key_signs_the_next_assertion(make, idp, tmp_path, leak_guard) -> None:
    """The key file is re-read whenever it changes, without a new provider: a key the
    server does not hold for this client is refused at once, the right one works again."""
    key_file = pem_file(idp.client_keys["rsa-jwt"], tmp_path / "client.key")
    leak_guard.secrets.add(key_file.read_text().strip())
    provider = make(client_id="rsa-jwt", client_auth="private_key_jwt", private_key_file=str(key_file))
    await minted(provider, leak_guard)
    pem_file(idp.client_keys["ec-jwt"], key_file)
    leak_guard.secrets.add(key_file.read_text().strip())
    with pytest.raises(UnauthorizedError, match="client authentication failed"):
        await provider.fetch(None)
    pem_file(idp.client_keys["rsa-jwt"], key_file)
    await minted(provider, leak_guard)


async def test_tls_client_auth_and_certificate_rotation(make, idp, tmp_path, leak_guard) -> None:
    cert, key = idp.issue_client_certificate("mtls", tmp_path)
    leak_guard.secrets.add(key.read_text().strip())
    provider = make(
        client_id="mtls", client_auth="tls_client_auth",
        tls_client_cert_file=str(cert), tls_client_key_file=str(key), resource=[RESOURCE],
        verify=verify(),
    )
    first = await minted(provider, leak_guard)
    # RFC 8705 §3: the server binds the token to the certificate it saw.
    bound = claims_of(first.value)["cnf"]["x5t#S256"]
    rotated = tmp_path / "rotated"
    rotated.mkdir()
    renewed = idp.issue_client_certificate("mtls", rotated)
    leak_guard.secrets.add(install_certificate(renewed, cert, key))
    second = await minted(provider, leak_guard)
    assert claims_of(second.value)["cnf"]["x5t#S256"] != bound
    # A certificate for another subject is refused by the server.
    intruder = idp.issue_client_certificate("intruder", rotated)
    leak_guard.secrets.add(install_certificate(intruder, cert, key))
    with pytest.raises(UnauthorizedError, match="client authentication failed"):
        await provider.fetch(None)


async def test_a_wrong_client_secret_is_invalid_client(make, leak_guard) -> None:
    leak_guard.secrets.add("not-the-secret-0123456789")
    provider = make(client_id="post", client_secret="not-the-secret-0123456789")
    with pytest.raises(UnauthorizedError) as caught:
        await provider.fetch(None)
    assert caught.value.problem is not None and caught.value.problem.title == "invalid_client"


# ---------------------------------------------------------------------------- refresh tokens


@pytest.mark.parametrize(
    ("client", "fields"),
    [
        ("public", {"client_id": "public", "client_auth": "none"}),
        ("basic", {"client_id": "basic", "client_auth": "client_secret_basic", "client_secret": BASIC_SECRET}),
    ],
)
async def test_refresh_token_rotation_survives_a_restart(make, idp, tmp_path, leak_guard, client, fields) -> None:
    seed = idp.refresh_token(client)
    leak_guard.secrets.add(seed)
    (tmp_path / "rt").write_text(seed + "\n")
    state = tmp_path / "state"
    state.mkdir()
    grant = {"grant": "refresh_token", "refresh_token_file": str(tmp_path / "rt"),
             "state_dir": str(state), "verify": verify(), **fields}
    provider = make(**grant)
    token = await minted(provider, leak_guard)
    assert claims_of(token.value)["aud"] == RESOURCE
    saved = json.loads((state / "idp.refresh-token.json").read_text())
    leak_guard.secrets.add(saved["refresh_token"])
    assert saved["refresh_token"] != seed  # oidc-provider rotated it
    # A new process (a new provider) continues from the saved token, not the seed.
    again = make(**grant)
    await minted(again, leak_guard)
    newer = json.loads((state / "idp.refresh-token.json").read_text())["refresh_token"]
    leak_guard.secrets.add(newer)
    assert newer != saved["refresh_token"]


async def test_a_replayed_refresh_token_is_invalid_grant_and_not_sent_again(make, idp, tmp_path, leak_guard) -> None:
    """What losing a rotation costs: oidc-provider treats a used refresh token as
    stolen, refuses it and revokes its grant."""
    seed = idp.refresh_token("public")
    leak_guard.secrets.add(seed)
    (tmp_path / "rt").write_text(seed)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = make(client_id="public", client_auth="none", grant="refresh_token",
                 refresh_token_file=str(tmp_path / "rt"), state_dir=str(tmp_path / "a"))
    await minted(first, leak_guard)
    leak_guard.secrets.add(json.loads((tmp_path / "a" / "idp.refresh-token.json").read_text())["refresh_token"])
    # Another state_dir has not seen the rotation: it replays the seed.
    lost = make(client_id="public", client_auth="none", grant="refresh_token",
                refresh_token_file=str(tmp_path / "rt"), state_dir=str(tmp_path / "b"))
    with pytest.raises(UnauthorizedError, match="refresh token was refused"):
        await lost.fetch(None)
    with pytest.raises(SecretUnusableError, match="not sent again"):
        await lost.fetch(None)
    # The server revoked the whole grant: the rotated token is dead too.
    with pytest.raises(UnauthorizedError):
        await first.fetch(None)


# ---------------------------------------------------------------------------- verification


async def test_jwks_key_rotation_is_followed(make, idp, clock, leak_guard) -> None:
    provider = make(client_id="post", client_secret=POST_SECRET, resource=[RESOURCE], verify=verify())
    await minted(provider, leak_guard)
    assert provider.jwks is not None and provider.jwks.fetches == 1
    kid = f"idp-rotated-{time.monotonic_ns()}"
    idp.rotate(kid)
    await clock.advance(JWKS_REFETCH_INTERVAL)
    token = await minted(provider, leak_guard)
    assert jwt.get_unverified_header(token.value)["kid"] == kid
    assert provider.jwks.fetches == 2  # the unknown kid fetched the JWKS again


async def test_a_wrong_expected_audience_is_never_written(idp, start_daemon, clock, tmp_path, leak_guard) -> None:
    leak_guard.secrets.add(POST_SECRET)
    job = {
        "name": "idp",
        "provider": {"kind": "oauth2", "issuer": idp.issuer, "ca_file": str(idp.ca_file),
                     "client_id": "post", "client_secret": POST_SECRET, "resource": [RESOURCE],
                     "verify": verify(audience="https://other.example.test")},
        "sinks": [{"kind": "file", "path": str(tmp_path / "idp.token")}],
    }
    async with start_daemon({"jobs": [job]}) as daemon:
        runtime = next(iter(daemon.scheduler.jobs.values()))
        await wait_for(lambda: runtime.failures >= 1, timeout=20)
        assert runtime.failure_reason == "bad_response"
        assert "wrong audience" in (runtime.failure_message or "")
        assert metric(daemon, "refresher_refresh_failures_total", token_job="idp", reason="bad_response") == 1
    assert not (tmp_path / "idp.token").exists()


async def test_a_token_from_another_issuer_is_refused(make, idp, leak_guard) -> None:
    provider = make(client_id="post", client_secret=POST_SECRET, resource=[RESOURCE],
                    verify=verify(issuer="https://someone-else.example.test"))
    with pytest.raises(BadResponseError, match="wrong issuer"):
        await provider.fetch(None)
