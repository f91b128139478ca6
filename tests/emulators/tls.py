"""HTTPS for the test emulators, with a throw-away CA made by trustme."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import trustme


class ServesTLS:
    """Mixin for an `Emulator`: ``tls=True`` serves HTTPS with a fresh CA (`ca_pem`,
    written to `ca_file` on start) and a certificate for the emulator's host, for
    ``localhost`` and for the in-cluster name ``kubernetes.default.svc``."""

    host: str

    def __init__(self, *args: Any, tls: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls = tls
        self.ca_pem: bytes | None = None
        self.ca_file: Path | None = None
        self._tls_dir: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

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
        return {"ssl_certfile": str(chain)}

    def cleanup(self) -> None:
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
            self._tls_dir = None
