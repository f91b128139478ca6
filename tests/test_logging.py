"""The log redaction processor: what it masks and what it leaves readable."""

from __future__ import annotations

import io
import json

import jwt
import structlog

from refresher.logging import TOKENS_PER_OWNER, Redactor, configure_logging, mask
from refresher.token import fingerprint

SECRET = "s3cr3t-client-secret-value"
TOKEN = "opaque-token-value-0123456789"


def redact(redactor: Redactor, **event: object) -> dict[str, object]:
    return dict(redactor(None, "info", dict(event)))


def test_masks_known_secrets_and_tokens_everywhere_and_keeps_the_rest() -> None:
    redactor = Redactor()
    redactor.add_secret(SECRET)
    redactor.add_token(TOKEN, ("api", None))
    a_jwt = jwt.encode({"sub": "someone", "exp": 2_000_000_000}, "k" * 32)
    out = redact(
        redactor,
        event="token refreshed",
        job="api",
        fingerprint=fingerprint(TOKEN),
        consecutive_failures=3,
        token_still_valid=True,
        error=f"POST /oauth/token failed, body said client_secret={SECRET}",
        value=TOKEN,
        client_secret="anything at all",
        api_key=12345,
        header=f"Authorization: Bearer {TOKEN[:20]}",
        nested={"access_token": "x" * 10, "note": f"got {a_jwt}"},
        items=[TOKEN, "fine"],
        exc=RuntimeError(f"boom {SECRET}"),
        retry_in=None,
    )
    text = json.dumps(out)
    for leaked in (SECRET, TOKEN, a_jwt, TOKEN[:20], "anything at all", "12345"):
        assert leaked not in text, leaked
    assert out["event"] == "token refreshed" and out["job"] == "api"
    assert out["fingerprint"] == fingerprint(TOKEN), "fingerprints stay readable"
    assert out["consecutive_failures"] == 3 and out["token_still_valid"] is True
    assert out["retry_in"] is None
    assert out["value"] == mask(TOKEN) == f"[redacted:{fingerprint(TOKEN)}]"
    assert out["error"] == f"POST /oauth/token failed, body said client_secret={mask(SECRET)}"
    assert out["items"] == [mask(TOKEN), "fine"]
    assert out["nested"] == {"access_token": mask("x" * 10), "note": f"got {mask(a_jwt)}"}
    assert out["exc"] == f"RuntimeError: boom {mask(SECRET)}"


def test_short_values_are_not_treated_as_secrets() -> None:
    redactor = Redactor()
    redactor.add_secret("abc")  # too short to search for: it would mask half the log
    assert redact(redactor, msg="abcdef")["msg"] == "abcdef"


def test_token_memory_keeps_each_owners_current_and_previous_token() -> None:
    redactor = Redactor()
    for value in ("first-token-value", "second-token-value", "third-token-value"):
        redactor.add_token(value, ("api", None))
    redactor.add_token("other-tenant-value", ("deb", "t-1"))
    assert redactor.scrub("first-token-value") == "first-token-value"
    for value in ("second-token-value", "third-token-value", "other-tenant-value"):
        assert redactor.scrub(value) == mask(value)
    redactor.forget(("api", None))
    assert redactor.scrub("third-token-value") == "third-token-value"
    assert redactor.scrub("other-tenant-value") == mask("other-tenant-value")


def test_token_memory_is_bounded_by_its_owners_whatever_the_churn() -> None:
    redactor = Redactor()
    owners = [("deb", f"t-{i}") for i in range(500)]
    for round_ in range(20):
        for owner in owners:
            redactor.add_token(f"token-{owner[1]}-{round_}", owner)
        assert redactor.remembered_tokens == min(round_ + 1, TOKENS_PER_OWNER) * len(owners)
    # Two owners sharing a token, then one leaving: still masked for the other.
    redactor.add_token("shared-token-value", owners[0])
    redactor.add_token("shared-token-value", owners[1])
    redactor.forget(owners[0])
    assert redactor.scrub("shared-token-value") == mask("shared-token-value")
    for owner in owners:
        redactor.forget(owner)
    assert redactor.remembered_tokens == 0


def test_pipeline_renders_json_with_redaction() -> None:
    stream = io.StringIO()
    redactor = Redactor()
    redactor.add_secret(SECRET)
    configure_logging(redactor, level="info", fmt="json", stream=stream)
    try:
        structlog.get_logger("t").bind(job="api").info("refresh failed", error=f"said {SECRET}")
        structlog.get_logger("t").debug("not shown at info")
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["job"] == "api" and lines[0]["level"] == "info"
    assert lines[0]["error"] == f"said {mask(SECRET)}"
