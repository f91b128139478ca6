"""An independent authorization server for the tests: node-oidc-provider (npm
``oidc-provider``, an OpenID Certified implementation nobody here wrote), installed by
``npm ci`` in this directory (``.ci/install-deps`` runs it) and started on loopback,
over HTTPS with a trustme CA, by `IndependentServer`.

server.mjs only configures it: the clients below, signing keys, a resource server
issuing RFC 9068 JWT access tokens, how to read the client certificate for
``tls_client_auth``, and two test routes (mint a refresh token without a browser
login; rotate the signing keys).
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

IDP_DIR = Path(__file__).parent
RESOURCE = "https://api.example.test"
SCOPE = "read write"

#: client_secret_basic / client_secret_post secrets: the first needs form-encoding
#: inside HTTP Basic (RFC 6749 §2.3.1), which the server decodes.
BASIC_SECRET = "basic secret/with:reserved+chars&=%-0123456789"
POST_SECRET = "post-secret-0123456789-abcdefghijklmnop"
#: client_secret_jwt: an HS256 key must be at least 32 bytes (RFC 7518 §3.2).
HMAC_SECRET = "hmac-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        data = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        data = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**data, "kid": kid}


def signing_jwks(kid: str) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    """A new server signing key and the private JWKS oidc-provider takes."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = RSAAlgorithm.to_jwk(key, as_dict=True)
    return key, {"keys": [{**private, "kid": kid, "use": "sig", "alg": "RS256"}]}


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the independent authorization server is a Node program")
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("tests/idp/node_modules is missing: run .ci/install-deps (npm ci in tests/idp)")
    return node


class IndependentServer:
    """node-oidc-provider on 127.0.0.1 (HTTPS, a port of its own), with one client per
    authentication method. `client_keys` holds the private keys of the
    ``private_key_jwt`` clients; `issue_client_certificate` makes ``tls_client_auth``
    certificates."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server_ca = trustme.CA()
        self.client_ca = trustme.CA()
        self.ca_file = workdir / "idp-ca.pem"
        self.server_ca.cert_pem.write_to_path(str(self.ca_file))
        served = self.server_ca.issue_cert("127.0.0.1", "localhost")
        self.client_keys: dict[str, Any] = {
            "rsa-jwt": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-jwt": ec.generate_private_key(ec.SECP256R1()),
            "ed-jwt": ed25519.Ed25519PrivateKey.generate(),
        }
        self.signing_key, jwks = signing_jwks("idp-1")
        confidential = {
            "grant_types": ["client_credentials", "refresh_token", "authorization_code"],
            "response_types": ["code"],
            "redirect_uris": ["https://rp.example.test/cb"],
        }
        clients: list[dict[str, Any]] = [
            {"client_id": "basic", "client_secret": BASIC_SECRET,
             "token_endpoint_auth_method": "client_secret_basic", **confidential},
            {"client_id": "post", "client_secret": POST_SECRET,
             "token_endpoint_auth_method": "client_secret_post", **confidential},
            {"client_id": "hmac", "client_secret": HMAC_SECRET,
             "token_endpoint_auth_method": "client_secret_jwt", **confidential},
            {"client_id": "mtls", "token_endpoint_auth_method": "tls_client_auth",
             "tls_client_auth_subject_dn": "CN=mtls",
             "tls_client_certificate_bound_access_tokens": True, **confidential},
            {"client_id": "public", "token_endpoint_auth_method": "none",
             "grant_types": ["refresh_token", "authorization_code"], "response_types": ["code"],
             "redirect_uris": ["https://rp.example.test/cb"]},
        ]
        for client_id, key in self.client_keys.items():
            clients.append(
                {"client_id": client_id, "token_endpoint_auth_method": "private_key_jwt",
                 "jwks": {"keys": [_jwk(key, f"{client_id}-1")]}, **confidential}
            )
        settings = {
            "tls": {
                "cert": served.cert_chain_pems[0].bytes().decode(),
                "key": served.private_key_pem.bytes().decode(),
                "ca": self.client_ca.cert_pem.bytes().decode(),
            },
            "jwks": jwks,
            "clients": clients,
            "resource": RESOURCE,
            "resources": [RESOURCE, "https://other.example.test"],
            "scope": SCOPE,
            "access_token_ttl": 600,
        }
        config = workdir / "idp-settings.json"
        config.write_text(json.dumps(settings))
        self.log = workdir / "idp.log"
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(
            [node_or_skip(), str(IDP_DIR / "server.mjs"), str(config)],
            cwd=IDP_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
        )
        self.issuer = self._wait_for_issuer()
        self.token_endpoint = self.issuer + "/token"

    def _wait_for_issuer(self) -> str:
        found: list[str] = []
        assert self.process.stdout is not None
        reader = threading.Thread(target=lambda: found.append(self.process.stdout.readline()))
        reader.start()
        reader.join(timeout=20)
        if not found or not found[0]:
            self.stop()
            raise RuntimeError(f"oidc-provider did not start: {self.log.read_text()[-2000:]}")
        return str(json.loads(found[0])["issuer"])

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        trusted = ssl.create_default_context(cafile=str(self.ca_file))
        response = httpx2.post(self.issuer + path, json=body, verify=trusted, timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def refresh_token(self, client_id: str) -> str:
        """A refresh token for `client_id`, as an authorization code flow would end."""
        return str(self._post("/_test/refresh_token", {"client_id": client_id})["refresh_token"])

    def rotate(self, kid: str) -> rsa.RSAPrivateKey:
        """Sign with a new key from now on; the JWKS serves only that one."""
        key, jwks = signing_jwks(kid)
        self._post("/_test/rotate", {"jwks": jwks})
        self.signing_key = key
        return key

    def issue_client_certificate(self, name: str, directory: Path) -> tuple[Path, Path]:
        issued = self.client_ca.issue_cert(common_name=name)
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return cert, key

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self._log_file.close()


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))
