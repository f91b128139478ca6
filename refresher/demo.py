"""``refresher demo``: emulated providers plus a daemon against them, no credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from refresher.config import load_settings
from refresher.logging import Redactor, configure_logging


def demo_config(emulator_urls: dict[str, str], tokens_dir: Path, listen: str) -> dict[str, Any]:
    """The demo's config: one job per emulated provider, files under `tokens_dir`."""
    return {
        "server": {"listen": listen},
        "refresh": {"min_remaining": "10s", "backoff": {"initial": "1s", "max": "15s"}},
        "logging": {"format": "console"},
        "jobs": [
            {
                "name": "oauth2-demo",
                "provider": {
                    "kind": "oauth2",
                    "token_url": emulator_urls["oauth2"] + "/oauth/token",
                    "client_id": "demo-client",
                    "client_secret": "demo-secret",
                    "scopes": ["read"],
                },
                "sinks": [
                    {"kind": "file", "path": str(tokens_dir / "oauth2-demo.token")},
                    {
                        "kind": "file",
                        "path": str(tokens_dir / "oauth2-demo.json"),
                        "format": "json",
                    },
                ],
            }
        ],
    }


def run_demo(*, tokens_dir: Path, listen: str, lifetime: float) -> int:
    from refresher.daemon import Daemon
    from refresher.emulators.oauth2 import OAuth2Emulator

    tokens_dir.mkdir(parents=True, exist_ok=True)
    emulator = OAuth2Emulator(token_lifetime=lifetime).start()
    try:
        settings = load_settings(
            data=demo_config({"oauth2": emulator.url}, tokens_dir.resolve(), listen)
        )
        redactor = Redactor()
        configure_logging(redactor, level="info", fmt="console")
        print(
            f"refresher demo: emulated provider at {emulator.url}, tokens in {tokens_dir}/, "
            f"metrics at http://{listen}/metrics, status at http://{listen}/v1/tokens"
            " - Ctrl-C stops",
            flush=True,
        )
        anyio.run(Daemon(settings, redactor=redactor).serve_forever)
    finally:
        emulator.stop()
    return 0
