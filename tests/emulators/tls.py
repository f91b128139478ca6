"""HTTPS for the test emulators, with a throw-away CA made by trustme, and optionally
client certificates (RFC 8705 mutual TLS)."""

from __future__ import annotations

import shutil
import ssl
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import trustme
from uvicorn.protocols.http.h11_impl import H11Protocol

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class PeerCertificateProtocol(H11Protocol):
    """uvicorn's h11 protocol, telling the app which client certificate the connection
    presented: ``scope["extensions"]["tls"]["client_cert_chain"]`` as the ASGI TLS
    extension names it (a list of PEM strings; empty without one)."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
        app: ASGIApp = self.app

        async def with_certificate(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": chain}
            await app(scope, receive, send)

        self.app = with_certificate


def install_certificate(issued: tuple[Path, Path], cert: Path, key: Path) -> str:
    """Copy an issued (certificate, key) pair over the files a config names, as a
    rotation would; returns the key's text (for the leak guard)."""
    cert.write_bytes(issued[0].read_bytes())
    key.write_bytes(issued[1].read_bytes())
    return key.read_text().strip()


class ServesTLS:
    """Mixin for an `Emulator`: ``tls=True`` serves HTTPS with a fresh CA (`ca_pem`,
    written to `ca_file` on start) and a certificate for the emulator's host, for
    ``localhost`` and for the in-cluster name ``kubernetes.default.svc``.

    ``mtls=True`` (implies TLS) also asks for a client certificate issued by
    `client_ca` (`issue_client_certificate`), optional at the handshake as on a real
    server whose discovery and JWKS need none, and hands it to the app."""

    host: str

    def __init__(self, *args: Any, tls: bool = False, mtls: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls = tls or mtls
        self.mtls = mtls
        self.ca_pem: bytes | None = None
        self.ca_file: Path | None = None
        self.client_ca = trustme.CA() if mtls else None
        self._tls_dir: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def issue_client_certificate(self, name: str, directory: Path) -> tuple[Path, Path]:
        """A client certificate with CN `name` from `client_ca`: (cert file, key file)."""
        assert self.client_ca is not None, "start the emulator with mtls=True"
        issued = self.client_ca.issue_cert(common_name=name)
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return cert, key

    def server_options(self) -> dict[str, Any]:
        if not self.tls:
            return {}
        ca = trustme.CA()
        certificate = ca.issue_cert(self.host, "localhost", "kubernetes.default.svc")
        self._tls_dir = Path(tempfile.mkdtemp(prefix="emulator-tls-"))
        self.ca_pem = ca.cert_pem.bytes()
        self.ca_file = self._tls_dir / "ca.crt"
        ca.cert_pem.write_to_path(str(self.ca_file))
        chain = self._tls_dir / "tls.pem"
        certificate.private_key_and_cert_chain_pem.write_to_path(str(chain))
        options: dict[str, Any] = {"ssl_certfile": str(chain)}
        if self.client_ca is not None:
            client_ca = self._tls_dir / "client-ca.crt"
            self.client_ca.cert_pem.write_to_path(str(client_ca))
            options.update(
                ssl_ca_certs=str(client_ca),
                ssl_cert_reqs=ssl.CERT_OPTIONAL,
                http=PeerCertificateProtocol,
            )
        return options

    def cleanup(self) -> None:
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
            self._tls_dir = None
