"""``refresher demo``: the three partner emulators plus a daemon against them.

No credentials needed: the emulators run on loopback with demo credentials and
short-lived tokens (60 s by default), so a newcomer sees tokens rotate in ``./tokens``
within a minute while metrics and status are served on 127.0.0.1:9464.

Beside one file per token, every token also lands in one bundle (``tokens.env``), and
Gooclaim's in an nginx include rendered from ``gooclaim-nginx.conf.tmpl`` (written
there unless it exists: edit it and watch ``gooclaim-nginx.conf`` follow).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

from refresher.config import load_settings
from refresher.demo.base import Emulator
from refresher.demo.debitura import DebituraEmulator
from refresher.demo.dutyclaims import DutyClaimsEmulator
from refresher.demo.gooclaim import GooclaimEmulator
from refresher.errors import ConfigError, ListenError, SinkOwnedError
from refresher.logging import Redactor, configure_logging

DEMO_TENANTS = ["acme-001", "globex-002", "initech-003"]
#: The demo's template: an nginx include that sends Gooclaim's token upstream.
NGINX_TEMPLATE = """\
# Rendered by refresher from gooclaim-nginx.conf.tmpl: expires ${expires_at}
proxy_set_header Authorization "${token_type} ${value}";
"""


def demo_config(
    dutyclaims: DutyClaimsEmulator,
    debitura: DebituraEmulator,
    gooclaim: GooclaimEmulator,
    *,
    tokens_dir: Path,
    public_key_file: Path,
    listen: str,
) -> dict[str, Any]:
    """One DutyClaims sandbox job, a 3-tenant Debitura job, a verified Gooclaim job;
    all three in one env bundle, Gooclaim's token also through a template."""
    ((dc_client, dc_secret),) = dutyclaims.clients.items()
    bundle = {"kind": "bundle", "path": str(tokens_dir / "tokens.env")}
    ((goo_client, goo_secret),) = gooclaim.clients.items()
    (deb_key,) = debitura.api_keys
    return {
        "server": {"listen": listen},
        "refresh": {"min_remaining": "10s", "backoff": {"initial": "1s", "max": "15s"}},
        "logging": {"format": "console"},
        "jobs": [
            {
                "name": "dutyclaims",
                "provider": {
                    "kind": "dutyclaims",
                    "mode": "sandbox",
                    "base_url": dutyclaims.url,
                    "client_id": dc_client,
                    "client_secret": dc_secret,
                    "scopes": ["clients.read", "webhooks.read"],
                },
                "sinks": [
                    {"kind": "file", "path": str(tokens_dir / "dutyclaims.json"), "format": "json"},
                    {"kind": "file", "path": str(tokens_dir / "dutyclaims.token")},
                    bundle,
                ],
            },
            {
                "name": "debitura",
                "provider": {
                    "kind": "debitura",
                    "base_url": debitura.url,
                    "api_key": deb_key,
                    "tenants": DEMO_TENANTS,
                },
                "sinks": [
                    {"kind": "file", "path": str(tokens_dir / "debitura-{tenant}.jwt")},
                    bundle,
                ],
            },
            {
                "name": "gooclaim",
                "provider": {
                    "kind": "gooclaim",
                    "base_url": gooclaim.url,
                    "client_id": goo_client,
                    "client_secret": goo_secret,
                    "issuer": gooclaim.issuer,
                    "public_key_file": str(public_key_file),
                    "introspect": True,
                },
                "sinks": [
                    {"kind": "file", "path": str(tokens_dir / "gooclaim.token")},
                    {
                        "kind": "file",
                        "path": str(tokens_dir / "gooclaim.env"),
                        "format": "env",
                        "env_name": "GOOCLAIM_TOKEN",
                    },
                    bundle,
                    {
                        "kind": "template",
                        "template": str(tokens_dir / "gooclaim-nginx.conf.tmpl"),
                        "path": str(tokens_dir / "gooclaim-nginx.conf"),
                    },
                ],
            },
        ],
    }


def run_demo(*, tokens_dir: Path, listen: str, lifetime: float) -> int:
    from refresher.daemon import Daemon

    tokens_dir.mkdir(parents=True, exist_ok=True)
    template = tokens_dir / "gooclaim-nginx.conf.tmpl"
    if not template.exists():
        template.write_text(NGINX_TEMPLATE)
    dutyclaims = DutyClaimsEmulator(token_lifetime=lifetime)
    debitura = DebituraEmulator(token_lifetime=lifetime)
    gooclaim = GooclaimEmulator(token_lifetime=lifetime)
    emulators: list[Emulator] = [dutyclaims, debitura, gooclaim]
    with tempfile.TemporaryDirectory(prefix="refresher-demo-") as scratch:
        try:
            for emulator in emulators:
                emulator.start()
            public_key = Path(scratch) / "gooclaim.pem"
            public_key.write_bytes(gooclaim.public_key_pem())
            data = demo_config(
                dutyclaims,
                debitura,
                gooclaim,
                tokens_dir=tokens_dir.resolve(),
                public_key_file=public_key,
                listen=listen,
            )
            settings = load_settings(data=data)
            redactor = Redactor()
            configure_logging(redactor, level="info", fmt="console")
            print(
                f"refresher demo: DutyClaims {dutyclaims.url}, Debitura {debitura.url}, "
                f"Gooclaim {gooclaim.url} (emulated, {lifetime:g}s tokens)\n"
                f"tokens in {tokens_dir}/ (all of them in tokens.env; edit "
                "gooclaim-nginx.conf.tmpl and gooclaim-nginx.conf follows) - "
                f"metrics http://{listen}/metrics - "
                f"status http://{listen}/v1/tokens (or: refresher status) - Ctrl-C stops",
                flush=True,
            )
            anyio.run(Daemon(settings, redactor=redactor).serve_forever)
        except (ListenError, SinkOwnedError, ConfigError) as exc:
            print(f"refresher demo: {exc}", file=sys.stderr)
            return 2
        finally:
            for emulator in emulators:
                emulator.stop()
    return 0
