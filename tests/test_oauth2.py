"""The generic ``oauth2`` provider against the project's emulator (tests/emulators/
oauth2.py): what the independent server of test_oauth2_idp.py lacks (RFC 8693 token
exchange, RFC 7523 JWT bearer grants, RFC 8414-only discovery, mTLS certificate
rotation through the daemon) and each failure mode on cue: discovery down, JWKS
down, unknown ``kid``, expired assertion, clock skew, ``invalid_grant``,
``invalid_client``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
import structlog
import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from refresher.clock import ManualClock
from refresher.demo.base import Fault
from refresher.errors import (
    BadResponseError,
    SecretUnusableError,
    ServerError,
    UnauthorizedError,
)
from refresher.jwtverify import JWKS_REFETCH_INTERVAL, LEEWAY
from refresher.providers.oauth2 import OAuth2Provider, OAuth2ProviderConfig
from refresher.token import Token
from tests.conftest import CLIENT_ID, CLIENT_SECRET, wait_for
from tests.emulators.oauth2 import ACCESS_TOKEN_TYPE, OAuth2Emulator
from tests.emulators.tls import install_certificate
from tests.kube_rbac import SERVICE_ACCOUNT, install_chart_rbac
from tests.kube_support import NS, SECRET

pytestmark = pytest.mark.anyio

CLUSTER_ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
CLIENT_KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def emulator(make_emulator, clock) -> OAuth2Emulator:
    return make_emulator(
        OAuth2Emulator,
        clients={CLIENT_ID: CLIENT_SECRET},
        client_keys={CLIENT_ID: CLIENT_KEY.public_key(), "sa@project.example": CLIENT_KEY.public_key()},
        public_clients={"public-app"},
        trusted_issuers={CLUSTER_ISSUER: CLUSTER_KEY.public_key()},
        clock=clock,
        token_lifetime=3600,
    )


@pytest.fixture
def make(emulator, http_clients, clock, leak_guard) -> Any:
    def build(job: str = "api", **fields: Any) -> OAuth2Provider:
        settings: dict[str, Any] = {"kind": "oauth2", "issuer": emulator.issuer, **fields}
        if "client_id" not in fields:
            settings["client_id"] = CLIENT_ID
        config = OAuth2ProviderConfig.model_validate(settings)
        provider = OAuth2Provider(config, clients=http_clients, clock=clock)
        provider.starting(job)
        leak_guard.secrets.update(provider.secrets())
        return provider

    return build


def key_file(key: Any, path: Path, leak_guard: Any) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    leak_guard.secrets.add(pem.decode().strip())
    return path


def cluster_token(clock: ManualClock, *, sub: str = "system:serviceaccount:apps:refresher",
                  audience: str | None = None, lifetime: float = 3600, leak_guard: Any = None) -> str:
    """What the kubelet puts in a projected ServiceAccount token volume."""
    now = int(clock.now())
    claims = {"iss": CLUSTER_ISSUER, "sub": sub, "aud": audience, "iat": now, "nbf": now,
              "exp": now + int(lifetime)}
    token = jwt.encode({k: v for k, v in claims.items() if v is not None}, CLUSTER_KEY,
                       algorithm="RS256", headers={"kid": "cluster-1"})
    if leak_guard is not None:
        leak_guard.secrets.add(token)
    return token


def form(request: Any) -> dict[str, list[str]]:
    return parse_qs(request.body.decode())


def token_requests(emulator: OAuth2Emulator) -> list[Any]:
    return [r for r in emulator.requests if r.path == emulator.token_path]


# ---------------------------------------------------------------------------- discovery


async def test_rfc8414_metadata_when_there_is_no_openid_configuration(make_emulator, clock, http_clients) -> None:
    """RFC 8414 §3.1: for an issuer with a path the well-known part goes before it."""
    emulator = make_emulator(OAuth2Emulator, clients={CLIENT_ID: CLIENT_SECRET}, clock=clock,
                             issuer_path="/tenants/acme", discovery="rfc8414")
    config = OAuth2ProviderConfig.model_validate(
        {"kind": "oauth2", "issuer": emulator.issuer, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    )
    provider = OAuth2Provider(config, clients=http_clients, clock=clock)
    await provider.fetch(None)
    paths = [r.path for r in emulator.requests]
    assert paths == [
        "/tenants/acme/.well-known/openid-configuration",  # 404
        "/.well-known/oauth-authorization-server/tenants/acme",
        "/oauth/token",
    ]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"token_endpoint": None}, "no 'token_endpoint'"),
        ({"token_endpoint": "ftp://x"}, "no usable 'token_endpoint'"),
        ({"issuer": "https://impostor.example"}, "is not the configured issuer"),
        ({"grant_types_supported": "client_credentials"}, "'grant_types_supported' is not a list"),
    ],
)
async def test_discovery_documents_are_checked(make, emulator, patch, message) -> None:
    emulator.metadata_patch = patch
    provider = make(client_secret=CLIENT_SECRET)
    with pytest.raises(BadResponseError, match=message) as caught:
        await provider.fetch(None)
    assert f"{emulator.issuer}/.well-known/openid-configuration" in str(caught.value)
    assert not token_requests(emulator)


async def test_discovery_down(make, emulator, clock) -> None:
    emulator.discovery_down = True
    provider = make(client_secret=CLIENT_SECRET)
    with pytest.raises(ServerError, match=r"discovery of .* failed.*HTTP 503"):
        await provider.fetch(None)
    assert not token_requests(emulator)
    # Once it is back, the next attempt discovers and mints.
    emulator.discovery_down = False
    await clock.advance(60)
    await provider.fetch(None)
    # Down again later: the metadata held is used, no refresh is lost to it.
    emulator.discovery_down = True
    await clock.advance(2 * 86400)
    await provider.fetch(None)
    assert len(token_requests(emulator)) == 2


async def test_discovery_is_fetched_again_after_a_failed_token_request(make, emulator, clock) -> None:
    provider = make(client_secret=CLIENT_SECRET)
    await provider.fetch(None)
    emulator.inject(Fault.server_error())
    with pytest.raises(ServerError):
        await provider.fetch(None)
    await clock.advance(60)
    await provider.fetch(None)
    assert provider.discovery is not None and provider.discovery.fetches == 2


async def test_an_unsupported_client_auth_is_reported(make, emulator, leak_guard) -> None:
    emulator.auth_methods = ["private_key_jwt"]
    await make(client_secret=CLIENT_SECRET).fetch(None)
    warned = leak_guard.events("discovery: client_auth client_secret_post is not in the server's "
                               "token_endpoint_auth_methods_supported (private_key_jwt)")
    assert len(warned) == 1


# ---------------------------------------------------------------------------- verification


async def test_jwks_down_writes_nothing_until_it_is_back(make, emulator, clock) -> None:
    emulator.jwks_down = True
    provider = make(client_secret=CLIENT_SECRET, verify={"audience": emulator.audience})
    with pytest.raises(ServerError, match="JWKS request: HTTP 503"):
        await provider.fetch(None)
    emulator.jwks_down = False
    await clock.advance(JWKS_REFETCH_INTERVAL)
    await provider.fetch(None)


async def test_an_unknown_kid_is_refused_and_refetched_at_most_every_30s(make, emulator, clock) -> None:
    provider = make(client_secret=CLIENT_SECRET, verify={"audience": emulator.audience})
    await provider.fetch(None)
    emulator.rotate_key(publish=False)
    await clock.advance(JWKS_REFETCH_INTERVAL)
    with pytest.raises(BadResponseError, match="not in the JWKS"):
        await provider.fetch(None)
    with pytest.raises(BadResponseError, match="re-fetched at most every 30s"):
        await provider.fetch(None)
    assert provider.jwks is not None and provider.jwks.fetches == 2
    # Published late: found at the next allowed re-fetch.
    emulator.published = set(emulator.keys)
    await clock.advance(JWKS_REFETCH_INTERVAL)
    await provider.fetch(None)
    assert provider.jwks.fetches == 3


@pytest.mark.parametrize(
    ("skew", "outcome"),
    [
        (LEEWAY / 2, None),  # within the leeway
        (LEEWAY + 3600, "not valid before"),  # the server's clock an hour ahead
        (-(3600 + 2 * LEEWAY), "already expired"),  # an hour behind: expired on arrival
    ],
)
async def test_clock_skew_against_the_access_token(make, emulator, skew, outcome) -> None:
    emulator.skew = skew
    provider = make(client_secret=CLIENT_SECRET, verify={"audience": emulator.audience})
    if outcome is None:
        await provider.fetch(None)
    else:
        with pytest.raises(BadResponseError, match=outcome):
            await provider.fetch(None)


async def test_verify_with_an_explicit_jwks_url_and_no_discovery(emulator, http_clients, clock) -> None:
    config = OAuth2ProviderConfig.model_validate({
        "kind": "oauth2", "token_url": emulator.token_url, "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "verify": {"audience": "https://api.example", "issuer": emulator.issuer,
                   "jwks_url": emulator.url + "/jwks"},
        "resource": ["https://api.example", "https://other.example"],
    })
    provider = OAuth2Provider(config, clients=http_clients, clock=clock)
    token = await provider.fetch(None)
    # RFC 8707: one resource parameter each, both in the audience.
    assert form(emulator.requests[0])["resource"] == ["https://api.example", "https://other.example"]
    assert jwt.decode(token.value, options={"verify_signature": False})["aud"] == [
        "https://api.example", "https://other.example"]
    assert all(not r.path.startswith("/.well-known") for r in emulator.requests)


# ---------------------------------------------------------------------------- client authentication


async def test_client_secret_basic_is_form_encoded(make_emulator, clock, http_clients, leak_guard) -> None:
    secret = "p@ss:word/with+plus&and%percent"
    leak_guard.secrets.add(secret)
    emulator = make_emulator(OAuth2Emulator, clients={"id:with space": secret}, clock=clock)
    config = OAuth2ProviderConfig.model_validate({
        "kind": "oauth2", "token_url": emulator.token_url, "client_id": "id:with space",
        "client_secret": secret, "client_auth": "client_secret_basic",
    })
    await OAuth2Provider(config, clients=http_clients, clock=clock).fetch(None)
    assert emulator.authentications == [("client_secret_basic", "id:with space")]
    # RFC 6749 §2.3.1: each form-encoded, then joined and base64-encoded.
    encoded = base64.b64encode(b"id%3Awith+space:p%40ss%3Aword%2Fwith%2Bplus%26and%25percent")
    assert emulator.requests[0].headers["authorization"] == "Basic " + encoded.decode()


async def test_json_body_and_extra_headers(make, emulator) -> None:
    provider = make(client_secret=CLIENT_SECRET, body="json", headers={"X-Tenant": "acme"},
                    audience="https://api.example", resource=["https://api.example"])
    await provider.fetch(None)
    request = token_requests(emulator)[0]
    assert request.headers["x-tenant"] == "acme"
    assert json.loads(request.body) == {
        "grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
        "audience": "https://api.example", "resource": "https://api.example",
    }


async def test_invalid_client_is_a_credential_failure(make, emulator, tmp_path, leak_guard) -> None:
    provider = make(client_auth="private_key_jwt",
                    private_key_file=str(key_file(ec.generate_private_key(ec.SECP256R1()), tmp_path / "k.pem", leak_guard)))
    with pytest.raises(UnauthorizedError, match="client authentication failed") as caught:
        await provider.fetch(None)
    assert caught.value.status == 401 and caught.value.problem.title == "invalid_client"


async def test_a_client_assertion_expired_by_the_servers_clock(make, emulator, tmp_path, leak_guard) -> None:
    """The server's clock five minutes ahead: our two-minute assertion is expired
    there. Clock skew is a credential failure here, named as such by the server."""
    emulator.skew = 300
    provider = make(client_auth="private_key_jwt",
                    private_key_file=str(key_file(CLIENT_KEY, tmp_path / "k.pem", leak_guard)))
    with pytest.raises(UnauthorizedError) as caught:
        await provider.fetch(None)
    assert caught.value.problem.detail == "assertion expired"
    emulator.skew = 30
    await provider.fetch(None)


async def test_client_secret_jwt_assertion(make, emulator, leak_guard) -> None:
    secret = "x" * 48
    emulator.clients[CLIENT_ID] = secret
    leak_guard.secrets.add(secret)
    await make(client_auth="client_secret_jwt", client_secret=secret, signing_alg="HS384").fetch(None)
    assertion = form(token_requests(emulator)[0])["client_assertion"][0]
    assert jwt.get_unverified_header(assertion)["alg"] == "HS384"
    assert emulator.authentications == [("client_secret_jwt", CLIENT_ID)]


async def test_an_entra_style_certificate_credential(make, emulator, tmp_path, leak_guard) -> None:
    """private_key_jwt with ``certificate_file``: x5t and x5t#S256 name the key."""
    issued = trustme.CA().issue_cert(common_name="app", key_type=trustme.KeyType.RSA)
    key_path = tmp_path / "app.key"
    issued.private_key_pem.write_to_path(str(key_path))
    leak_guard.secrets.add(key_path.read_text().strip())
    cert_path = tmp_path / "app.crt"
    issued.cert_chain_pems[0].write_to_path(str(cert_path))
    emulator.client_keys[CLIENT_ID] = load_pem_private_key(key_path.read_bytes(), None).public_key()
    await make(client_auth="private_key_jwt", private_key_file=str(key_path),
               certificate_file=str(cert_path), signing_alg="PS256").fetch(None)
    header = jwt.get_unverified_header(form(token_requests(emulator)[0])["client_assertion"][0])
    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert header["x5t#S256"] == base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert header["alg"] == "PS256" and header["typ"] == "JWT"


# ---------------------------------------------------------------------------- mTLS


async def test_tls_client_auth_picks_up_a_rotated_certificate_in_the_daemon(
    make_emulator, clock, start_daemon, tmp_path, leak_guard
) -> None:
    emulator = make_emulator(OAuth2Emulator, clients={}, mtls_clients={"edge": "edge"},
                             clock=clock, mtls=True)
    cert, key = emulator.issue_client_certificate("edge", tmp_path)
    leak_guard.secrets.add(key.read_text().strip())
    job = {
        "name": "mtls",
        "provider": {"kind": "oauth2", "issuer": emulator.issuer, "ca_file": str(emulator.ca_file),
                     "client_id": "edge", "client_auth": "tls_client_auth",
                     "tls_client_cert_file": str(cert), "tls_client_key_file": str(key)},
        "sinks": [{"kind": "file", "path": str(tmp_path / "mtls.token")}],
    }
    async with start_daemon({"jobs": [job]}) as daemon:
        runtime = daemon.scheduler.jobs[("mtls", None)]
        await wait_for(lambda: runtime.token is not None and runtime.refreshing is None)
        first = runtime.token
        # A certificate for another CN, written over both files: re-minted at once
        # (the key file is a credential), and refused by the server.
        other = tmp_path / "other"
        other.mkdir()
        intruder = emulator.issue_client_certificate("intruder", other)
        leak_guard.secrets.add(install_certificate(intruder, cert, key))
        await wait_for(lambda: runtime.failures >= 1, timeout=10)
        assert runtime.failure_reason == "unauthorized"
        # The right CN again, a new certificate: the daemon uses it without a restart.
        renewed = emulator.issue_client_certificate("edge", other)
        leak_guard.secrets.add(install_certificate(renewed, cert, key))
        await wait_for(lambda: runtime.token is not first and runtime.failures == 0, timeout=10)
    assert emulator.peer_names[0] == "edge" and "intruder" in emulator.peer_names
    assert emulator.peer_names[-1] == "edge"
    assert (tmp_path / "mtls.token").read_text().strip() == runtime.token.value


# ---------------------------------------------------------------------------- jwt_bearer and token_exchange


async def test_jwt_bearer_reads_its_assertion_file_at_every_use(make, emulator, clock, tmp_path, leak_guard) -> None:
    """Workload identity: a projected ServiceAccount token, rotated by the kubelet."""
    assertion = tmp_path / "token"
    assertion.write_text(cluster_token(clock, audience=emulator.token_url, leak_guard=leak_guard))
    provider = make(client_id=None, client_auth="none", grant="jwt_bearer",
                    assertion_file=str(assertion), scopes=["read"])
    token = await provider.fetch(None)
    claims = jwt.decode(token.value, options={"verify_signature": False})
    assert claims["sub"] == "system:serviceaccount:apps:refresher"
    assertion.write_text(cluster_token(clock, sub="system:serviceaccount:apps:rotated",
                                       audience=emulator.token_url, leak_guard=leak_guard))
    token = await provider.fetch(None)
    assert jwt.decode(token.value, options={"verify_signature": False})["sub"].endswith("rotated")
    sent = form(token_requests(emulator)[0])
    assert sent["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    assert sent["scope"] == ["read"] and "client_id" not in sent


async def test_an_expired_assertion_file_is_not_sent(make, emulator, clock, tmp_path, leak_guard) -> None:
    assertion = tmp_path / "token"
    assertion.write_text(cluster_token(clock, audience=emulator.token_url, lifetime=600, leak_guard=leak_guard))
    provider = make(client_id=None, client_auth="none", grant="jwt_bearer", assertion_file=str(assertion))
    await clock.advance(600 + LEEWAY)
    with pytest.raises(SecretUnusableError, match=r"expired at .* still being rotated"):
        await provider.fetch(None)
    assert not token_requests(emulator)
    # An assertion the server alone sees as expired (its clock ahead) is invalid_grant.
    assertion.write_text(cluster_token(clock, audience=emulator.token_url, lifetime=600, leak_guard=leak_guard))
    emulator.skew = 900
    with pytest.raises(UnauthorizedError, match="the assertion was refused"):
        await provider.fetch(None)


async def test_jwt_bearer_signed_with_a_service_account_key(make, emulator, tmp_path, leak_guard) -> None:
    """Google's service-account flow: iss is the account, scope a claim."""
    provider = make(client_id="sa@project.example", client_auth="none", grant="jwt_bearer",
                    private_key_file=str(key_file(CLIENT_KEY, tmp_path / "sa.pem", leak_guard)),
                    assertion_claims={"scope": "https://www.googleapis.com/auth/cloud-platform"})
    token = await provider.fetch(None)
    assert jwt.decode(token.value, options={"verify_signature": False})["sub"] == "sa@project.example"
    sent = form(token_requests(emulator)[0])
    claims = jwt.decode(sent["assertion"][0], options={"verify_signature": False})
    assert claims["iss"] == "sa@project.example" and claims["aud"] == emulator.token_url
    assert claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    assert claims["exp"] - claims["iat"] == 120 and "sub" not in claims
    assert set(sent) == {"grant_type", "assertion"}  # what Google documents, nothing more


async def test_token_exchange(make, emulator, clock, tmp_path, leak_guard) -> None:
    subject = tmp_path / "token"
    subject.write_text(cluster_token(clock, audience="sts", leak_guard=leak_guard))
    provider = make(grant="token_exchange", client_secret=CLIENT_SECRET, subject_token_file=str(subject),
                    requested_token_type=ACCESS_TOKEN_TYPE, audience="https://partner.example")
    token = await provider.fetch(None)
    claims = jwt.decode(token.value, options={"verify_signature": False})
    assert claims["sub"] == "system:serviceaccount:apps:refresher"
    assert claims["aud"] == "https://partner.example"
    sent = form(token_requests(emulator)[0])
    assert sent["subject_token_type"] == ["urn:ietf:params:oauth:token-type:jwt"]
    assert sent["requested_token_type"] == [ACCESS_TOKEN_TYPE]


async def test_token_exchange_answers_are_checked(make, emulator, clock, tmp_path, leak_guard) -> None:
    subject = tmp_path / "token"
    subject.write_text(cluster_token(clock, audience="sts", leak_guard=leak_guard))
    provider = make(grant="token_exchange", client_secret=CLIENT_SECRET, subject_token_file=str(subject),
                    requested_token_type="urn:ietf:params:oauth:token-type:id_token")
    with pytest.raises(BadResponseError, match="not the requested"):
        await provider.fetch(None)
    emulator.inject(Fault.body_json({"access_token": "opaque-token-value", "expires_in": 60}))
    with pytest.raises(BadResponseError, match="no 'issued_token_type'"):
        await provider.fetch(None)
    subject.write_text(jwt.encode({"iss": "https://untrusted.example", "sub": "x", "exp": int(clock.now()) + 60},
                                  CLUSTER_KEY, algorithm="RS256"))
    leak_guard.secrets.add(subject.read_text())
    with pytest.raises(UnauthorizedError, match="the subject token was refused"):
        await provider.fetch(None)


# ---------------------------------------------------------------------------- refresh tokens


def refresh_setup(emulator: OAuth2Emulator, tmp_path: Path, leak_guard: Any, client: str = CLIENT_ID) -> dict[str, Any]:
    seed = emulator.issue_refresh_token(client)
    (tmp_path / "rt").write_text(seed + "\n")
    (tmp_path / "state").mkdir(exist_ok=True)
    return {"grant": "refresh_token", "refresh_token_file": str(tmp_path / "rt"),
            "state_dir": str(tmp_path / "state")}


def saved(tmp_path: Path, job: str = "api") -> str:
    return json.loads((tmp_path / "state" / f"{job}.refresh-token.json").read_text())["refresh_token"]


async def test_the_rotated_refresh_token_is_saved_before_the_token_is_published(
    emulator, start_daemon, tmp_path, leak_guard
) -> None:
    """The state file holds the new refresh token when the sink is written: a crash
    in between cannot lose it (the SIGKILL test does it for real)."""
    grant = refresh_setup(emulator, tmp_path, leak_guard, client="public-app")
    job = {"name": "api", "provider": {"kind": "oauth2", "issuer": emulator.issuer, "client_id": "public-app",
                                       "client_auth": "none", **grant},
           "sinks": [{"kind": "file", "path": str(tmp_path / "api.token")}]}
    seen: list[str] = []
    async with start_daemon({"jobs": [job]}) as daemon:
        runtime = daemon.scheduler.jobs[("api", None)]
        sink = runtime.sinks[0]
        original = sink.write

        async def write(token: Token) -> None:
            seen.append(saved(tmp_path))
            await original(token)

        sink.write = write  # type: ignore[method-assign]
        await wait_for(lambda: runtime.token is not None and runtime.refreshing is None)
        await daemon.scheduler.refresh(runtime, force=True)
    issued = [value for value in emulator.issued if value.startswith("rt-")]
    assert seen == issued[1:3]  # each write saw the refresh token of its own mint
    assert emulator.revoked_lines == set()


async def test_invalid_grant_is_not_retried_until_a_new_refresh_token_is_given(
    make, emulator, tmp_path, leak_guard
) -> None:
    grant = refresh_setup(emulator, tmp_path, leak_guard)
    (tmp_path / "rt").write_text("rt-unknown-to-the-server\n")
    leak_guard.secrets.add("rt-unknown-to-the-server")
    provider = make(client_secret=CLIENT_SECRET, **grant)
    with pytest.raises(UnauthorizedError, match="refresh token was refused: put a new one"):
        await provider.fetch(None)
    with pytest.raises(SecretUnusableError, match="not sent again"):
        await provider.fetch(None)
    assert len(token_requests(emulator)) == 1
    # The operator consents again and puts the new refresh token in the file.
    (tmp_path / "rt").write_text(emulator.issue_refresh_token(CLIENT_ID))
    await provider.fetch(None)
    assert saved(tmp_path) == emulator.issued[-2]


async def test_a_new_refresh_token_file_starts_a_new_line(make, emulator, tmp_path, leak_guard) -> None:
    grant = refresh_setup(emulator, tmp_path, leak_guard)
    provider = make(client_secret=CLIENT_SECRET, **grant)
    await provider.fetch(None)
    first_line = saved(tmp_path)
    fresh = emulator.issue_refresh_token(CLIENT_ID)
    (tmp_path / "rt").write_text(fresh)
    await provider.fetch(None)
    assert form(token_requests(emulator)[-1])["refresh_token"] == [fresh]
    assert saved(tmp_path) != first_line


async def test_a_refresh_token_that_cannot_be_saved_is_kept_and_nothing_published(
    make, emulator, tmp_path, leak_guard
) -> None:
    grant = refresh_setup(emulator, tmp_path, leak_guard)
    provider = make(client_secret=CLIENT_SECRET, **grant)
    (tmp_path / "state").rmdir()  # the directory is gone: nothing can be saved
    with pytest.raises(SecretUnusableError, match="cannot save the rotated refresh token"):
        await provider.fetch(None)
    # The rotated token is kept in memory: the next attempt redeems it, not the seed
    # (a replay would revoke the line).
    (tmp_path / "state").mkdir()
    await provider.fetch(None)
    assert emulator.revoked_lines == set()
    requests = token_requests(emulator)
    assert form(requests[1])["refresh_token"] == [emulator.issued[1]]


async def test_a_corrupt_state_file_is_not_guessed_around(make, emulator, tmp_path, leak_guard) -> None:
    grant = refresh_setup(emulator, tmp_path, leak_guard)
    provider = make(client_secret=CLIENT_SECRET, **grant)
    (tmp_path / "state" / "api.refresh-token.json").write_text("{not json")
    with pytest.raises(SecretUnusableError, match="not a refresh-token state document"):
        await provider.fetch(None)
    assert not token_requests(emulator)


async def test_the_redactor_learns_refresh_tokens_keys_and_assertions(
    make, emulator, clock, tmp_path, leak_guard
) -> None:
    """A server echoing what it was sent in its error text: the log shows none of it."""
    grant = refresh_setup(emulator, tmp_path, leak_guard)
    provider = make(client_auth="private_key_jwt",
                    private_key_file=str(key_file(CLIENT_KEY, tmp_path / "k.pem", leak_guard)), **grant)
    await provider.fetch(None)
    rotated = saved(tmp_path)
    pem = (tmp_path / "k.pem").read_text().strip()
    log = structlog.get_logger("test")
    log.error("echo", detail=f"refresh token {rotated} key {pem}")
    assertion = form(token_requests(emulator)[0])["client_assertion"][0]
    log.error("echo", detail=f"assertion {assertion}")
    leak_guard.secrets.update({rotated, assertion})
    text = leak_guard.buffer.getvalue()
    assert rotated not in text and pem not in text and assertion not in text
    assert "[redacted:" in text


def test_a_state_dir_on_tmpfs_is_warned_about(emulator, tmp_path, capsys, leak_guard) -> None:
    from refresher.cli import main
    from refresher.sinks.file import memory_backed

    shm = Path("/dev/shm")
    if not memory_backed(str(shm)):
        pytest.skip("no tmpfs at /dev/shm")
    state = Path(tempfile.mkdtemp(dir=shm))
    try:
        config = {"jobs": [{"name": "api", "provider": {
            "kind": "oauth2", "issuer": emulator.issuer, "client_id": "public-app", "client_auth": "none",
            "grant": "refresh_token", "refresh_token_file": str(tmp_path / "rt"), "state_dir": str(state)},
            "sinks": [{"kind": "file", "path": str(tmp_path / "api.token")}]}]}
        (tmp_path / "rt").write_text("rt-seed-value-0123456789")
        leak_guard.secrets.add("rt-seed-value-0123456789")
        (tmp_path / "refresher.yaml").write_text(yaml.safe_dump(config))
        assert main(["check", "--config", str(tmp_path / "refresher.yaml")]) == 0
        out = capsys.readouterr().out
        assert f"warning: jobs[0].provider.state_dir (api): {state} is on a memory file system" in out
    finally:
        shutil.rmtree(state)


# ---------------------------------------------------------------------------- state Secret


def state_secret_job(emulator: OAuth2Emulator, kube: Any, tmp_path: Path, user: str) -> dict[str, Any]:
    """A replica's job: refresh token rotation kept in a state Secret, as the chart
    deploys it (its RBAC installed in the emulator)."""
    kube.add_token(f"sa-token-{user}", SERVICE_ACCOUNT)
    kubeconfig = kube.write_kubeconfig(tmp_path / f"kubeconfig-{user}", namespace=NS,
                                       token=f"sa-token-{user}", user=user)
    return {
        "name": "api",
        "provider": {"kind": "oauth2", "issuer": emulator.issuer, "client_id": "public-app",
                     "client_auth": "none", "grant": "refresh_token",
                     "refresh_token_file": str(tmp_path / "rt"),
                     "state_secret": {"name": "refresher-state", "kubeconfig": str(kubeconfig)}},
        "sinks": [{"kind": "kubernetes", "namespace": NS, "secret": SECRET, "key": "api",
                   "kubeconfig": str(kubeconfig)}],
    }


async def test_a_state_secret_hands_the_rotation_to_the_next_leader(
    emulator, kube, http_clients, clock, tmp_path, leak_guard
) -> None:
    seed = emulator.issue_refresh_token("public-app")
    (tmp_path / "rt").write_text(seed)
    leader = state_secret_job(emulator, kube, tmp_path, "leader")
    install_chart_rbac(kube, {"jobs": [leader]})
    first = OAuth2Provider(OAuth2ProviderConfig.model_validate(leader["provider"]),
                           clients=http_clients, clock=clock)
    first.starting("api")
    await first.fetch(None)
    stored = kube.secret(NS, "refresher-state")
    assert stored is not None
    document = json.loads(base64.b64decode(stored["data"]["api.refresh-token.json"]))
    rotated = document["refresh_token"]
    leak_guard.secrets.add(rotated)
    assert rotated == emulator.issued[-2] and rotated != seed
    # The replica that takes over (another pod, another token, no shared disk).
    follower = state_secret_job(emulator, kube, tmp_path, "follower")
    second = OAuth2Provider(OAuth2ProviderConfig.model_validate(follower["provider"]),
                            clients=http_clients, clock=clock)
    second.starting("api")
    await second.fetch(None)
    assert form(token_requests(emulator)[-1])["refresh_token"] == [rotated]
    assert emulator.revoked_lines == set()


async def test_a_state_secret_without_rbac_is_a_config_failure(
    emulator, kube, http_clients, clock, tmp_path, leak_guard
) -> None:
    (tmp_path / "rt").write_text(emulator.issue_refresh_token("public-app"))
    job = state_secret_job(emulator, kube, tmp_path, "unbound")  # no RBAC installed
    provider = OAuth2Provider(OAuth2ProviderConfig.model_validate(job["provider"]),
                              clients=http_clients, clock=clock)
    provider.starting("api")
    with pytest.raises(SecretUnusableError, match=r'cannot read state_secret apps/refresher-state.*RBAC: grant "get" on secrets'):
        await provider.fetch(None)
    assert not token_requests(emulator)  # nothing redeemed that could not be saved
