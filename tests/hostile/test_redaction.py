"""Secrets never leave the process: a provider that echoes the
client secret — as is, percent-encoded as the form body carried it, base64 alone or
as HTTP Basic's ``id:secret`` — gets it masked in logs, and the API and
``refresher status --json`` show only classified fields (reason, HTTP status, a
short redacted title), never the provider's free-text detail."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote_plus

import anyio
import pytest

from refresher.cli import main
from refresher.demo.base import Fault
from refresher.logging import Redactor
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEB_KEY,
    deb_job,
    get_json,
    oauth2_job,
    wait_for,
)
from tests.hostile.conftest import alive
from tests.reliability.servers import WebhookReceiver

pytestmark = pytest.mark.anyio

FORMS = {
    "raw": CLIENT_SECRET,
    "form-encoded": quote_plus(CLIENT_SECRET + "/+&="),
    "base64": base64.b64encode(CLIENT_SECRET.encode()).decode(),
    "basic": base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode(),
    "urlsafe-base64-inside-json": base64.urlsafe_b64encode(
        json.dumps({"client_secret": CLIENT_SECRET}).encode()
    ).decode(),
}


@pytest.mark.parametrize("form", list(FORMS), ids=list(FORMS))
async def test_echoed_secret_never_reaches_logs_api_or_status(
    start_daemon, oauth2_emulator, tmp_path, leak_guard, capsys, form
) -> None:
    secret = CLIENT_SECRET + "/+&=" if form == "form-encoded" else CLIENT_SECRET
    leak_guard.secrets.add(secret)
    oauth2_emulator.clients[CLIENT_ID] = secret
    echoed = FORMS[form]
    oauth2_emulator.inject(
        Fault(
            status=401,
            body=json.dumps(
                {"title": f"Unauthorized {echoed}", "detail": f"client secret {echoed} is wrong"}
            ).encode(),
        )
    )
    job = oauth2_job(oauth2_emulator, tmp_path)
    job["provider"]["client_secret"] = secret
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.failures == 1 and rt.refreshing is None)
        assert rt.failure_reason == "unauthorized"
        status, body = await get_json(daemon, "/v1/tokens", leak_guard)
        entry = body["jobs"][0]
        assert entry["last_error"] == "unauthorized" and entry["last_error_status"] == 401
        assert "is wrong" not in json.dumps(body), "the provider's detail is never shown"
        title = entry["last_error_title"]
        assert title.startswith("Unauthorized ") and "[redacted:" in title and echoed not in title
        url = f"127.0.0.1:{daemon.port}"
        code = await anyio.to_thread.run_sync(main, ["status", "--json", "--url", url])
        assert code == 1
    out = capsys.readouterr().out
    leak_guard.extra_outputs.append(out)
    assert json.loads(out)[0]["last_error"] == "unauthorized"
    # The log line carries the detail, masked in every form (the leak guard checks all).
    [failed] = leak_guard.events("refresh failed")
    assert "is wrong" in failed["problem_detail"] and "[redacted:" in failed["problem_detail"]


def test_redactor_masks_every_form_of_a_secret() -> None:
    redactor = Redactor()
    secret = "p@ss/w+rd&more=1"
    redactor.add_secret(secret)
    redactor.add_secret(f"client:{secret}")
    for text in (
        secret,
        quote_plus(secret),
        base64.b64encode(secret.encode()).decode(),
        base64.b64encode(secret.encode()).decode().rstrip("="),
        base64.urlsafe_b64encode(secret.encode()).decode(),
        "Basic " + base64.b64encode(f"client:{secret}".encode()).decode(),
        base64.b64encode(b"x" + secret.encode() + b"yy").decode(),
        base64.b64encode(b"xy" + secret.encode()).decode(),
    ):
        scrubbed = redactor.scrub(f"before {text} after")
        assert "[redacted:" in scrubbed and text not in scrubbed, text
    # Short secrets are not searched in encoded forms shorter than 8 characters.
    redactor.add_secret("abcd")
    assert redactor.scrub("YWJjZA") == "YWJjZA"


async def test_notifications_pass_the_same_redactor(start_daemon, debitura, tmp_path, leak_guard) -> None:
    # A tenant id that happens to be the API key (an operator's paste error).
    with WebhookReceiver() as hook:
        job = deb_job(debitura, tmp_path, [DEB_KEY, "t-1"])
        job["notify"] = [{"kind": "webhook", "url": hook.url}]
        async with start_daemon({"jobs": [job]}) as daemon:
            jobs = daemon.scheduler.jobs
            await wait_for(lambda: len(hook.calls) == 2)
            assert alive(daemon) and all(r.token for r in jobs.values())
        payloads: list[dict[str, Any]] = [json.loads(body) for _, body in hook.calls]
    leak_guard.extra_outputs.append(hook.text())
    tenants = sorted(p["tenant"] for p in payloads)
    assert tenants[0].startswith("[redacted:") and tenants[1] == "t-1"
