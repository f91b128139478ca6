"""Hostile provider answers: nothing a provider says can put a
line into a consumer's file, crash the daemon, or make a token live for ever."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from refresher.demo.base import Fault
from refresher.token import MAX_LIFETIME
from tests.conftest import get_json, metric, oauth2_job, wait_for
from tests.hostile.conftest import alive

pytestmark = pytest.mark.anyio

FORMATS = ("raw", "json", "env", "header")


def all_format_sinks(tmp_path: Path) -> list[dict[str, str]]:
    return [
        {"kind": "file", "path": str(tmp_path / f"api.{fmt}"), "format": fmt} for fmt in FORMATS
    ]


def snapshot(tmp_path: Path) -> dict[str, bytes]:
    return {fmt: (tmp_path / f"api.{fmt}").read_bytes() for fmt in FORMATS}


def grant(emu, **fields: object) -> dict[str, object]:
    return {"access_token": "placeholder", "token_type": "Bearer", "expires_in": 3600, **fields}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"access_token": "abc\nLD_PRELOAD=/tmp/evil.so"}, "whitespace at position 4"),
        ({"access_token": "abc\r\nX-Injected: 1"}, "whitespace"),
        ({"access_token": "abc;touch${IFS}/tmp/pwned"}, "character ';'"),
        ({"access_token": "a`id`b"}, "character '`'"),
        ({"access_token": "t\ud800k"}, "control character"),
        ({"access_token": "x" * 70_000}, "longer than 65536"),
        ({"token_type": "Bearer\nPATH=/tmp/evil"}, "token_type"),
        ({"token_type": ["Bearer"]}, "token_type"),
        ({"scope": "read\x00write"}, "scope"),
    ],
    ids=[
        "lf-in-token",
        "crlf-in-token",
        "shell-in-token",
        "backtick-in-token",
        "lone-surrogate",
        "huge-token",
        "lf-in-type",
        "type-not-a-string",
        "nul-in-scope",
    ],
)
async def test_unsafe_answer_is_bad_response_and_never_written(
    start_daemon, oauth2_emulator, clock, tmp_path, leak_guard, fields, message
) -> None:
    job = oauth2_job(oauth2_emulator, tmp_path, sinks=all_format_sinks(tmp_path))
    other = oauth2_job(oauth2_emulator, tmp_path / "other", name="other")
    (tmp_path / "other").mkdir()
    async with start_daemon({"jobs": [job, other]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        runtimes = daemon.scheduler.jobs.values()
        await wait_for(lambda: all(r.token and r.refreshing is None for r in runtimes))
        before = snapshot(tmp_path)
        oauth2_emulator.inject(Fault.body_json(grant(oauth2_emulator, **fields)))
        await daemon.scheduler.refresh(rt, force=True)
        assert rt.failure_reason == "bad_response" and message in rt.failure_message
        assert snapshot(tmp_path) == before
        assert metric(daemon, "refresher_refresh_failures_total", token_job="api", reason="bad_response") == 1
        # The API shows a short classified title, never the provider's value.
        status, body = await get_json(daemon, "/v1/tokens", leak_guard)
        entry = next(j for j in body["jobs"] if j["job"] == "api")
        assert entry["last_error"] == "bad_response" and "last_error_message" not in entry
        assert "LD_PRELOAD" not in str(body) and "evil" not in str(body)
        # The other job and the daemon are untouched; the next mint is fine again.
        await daemon.scheduler.refresh(daemon.scheduler.jobs[("other", None)], force=True)
        assert daemon.scheduler.jobs[("other", None)].failures == 0
        await daemon.scheduler.refresh(rt, force=True)
        assert rt.failures == 0 and snapshot(tmp_path) != before
        assert alive(daemon)


async def test_env_file_sources_back_to_exactly_the_token(
    start_daemon, oauth2_emulator, tmp_path
) -> None:
    odd = "ab+/c=d%e@f~g.h-i_j=="  # every character the token alphabet allows
    oauth2_emulator.inject(Fault.body_json({"access_token": odd, "expires_in": 3600}))
    job = oauth2_job(oauth2_emulator, tmp_path, sinks=all_format_sinks(tmp_path))
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
    sourced = subprocess.run(
        ["sh", "-c", '. "$1"; printf "%s|%s" "$TOKEN" "$TOKEN_TYPE"', "sh", tmp_path / "api.env"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
    )
    assert sourced.stdout == f"{odd}|Bearer"
    assert (tmp_path / "api.raw").read_text() == odd + "\n"
    assert (tmp_path / "api.header").read_text() == f"Authorization: Bearer {odd}\n"


@pytest.mark.parametrize(
    "expires_in", [1e12, 1e308, "1e12", 10**400], ids=["1e12", "1e308", "string", "huge-int"]
)
async def test_absurd_expiry_is_clamped_or_refused_never_a_crash(
    start_daemon, oauth2_emulator, clock, tmp_path, leak_guard, expires_in
) -> None:
    job = oauth2_job(oauth2_emulator, tmp_path, sinks=all_format_sinks(tmp_path))
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        body = {"access_token": "opaque-but-fine", "token_type": "Bearer"}
        raw = b'{"access_token": "opaque-but-fine", "expires_in": %s}' % str(expires_in).encode()
        if isinstance(expires_in, str):
            body["expires_in"] = expires_in
            raw = None
        oauth2_emulator.inject(
            Fault(status=200, body=raw, content_type="application/json")
            if raw is not None
            else Fault.body_json(body)
        )
        await daemon.scheduler.refresh(rt, force=True)
        if expires_in == "1e12":
            # Numeric strings are accepted, but only of the plain "3600" kind.
            assert rt.failure_reason == "bad_response"
        elif rt.failures == 0:
            assert rt.token.lifetime == MAX_LIFETIME
            assert (tmp_path / "api.raw").read_text() == "opaque-but-fine\n"
        else:
            assert rt.failure_reason == "bad_response" and "finite" in rt.failure_message
        status, tokens = await get_json(daemon, "/v1/tokens", leak_guard)
        assert status == 200 and tokens["jobs"][0]["expires_at"]
        assert (await get_json(daemon, "/metrics"))[0] == 200
        assert alive(daemon)


async def test_numeric_string_expires_in_is_accepted(start_daemon, oauth2_emulator, tmp_path) -> None:
    oauth2_emulator.inject(Fault.body_json({"access_token": "opaque-value", "expires_in": "3600"}))
    async with start_daemon({"jobs": [oauth2_job(oauth2_emulator, tmp_path)]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        assert rt.token.lifetime == 3600 and rt.failures == 0


async def test_jwt_exp_far_in_the_future_is_clamped(
    start_daemon, oauth2_emulator, clock, tmp_path, leak_guard
) -> None:
    now = int(clock.now())
    token = oauth2_emulator.sign_rs256({"sub": "x", "iat": now, "exp": 10**12})
    oauth2_emulator.issued.append(token)
    oauth2_emulator.inject(Fault.body_json({"access_token": token, "token_type": "Bearer"}))
    job = oauth2_job(oauth2_emulator, tmp_path, sinks=all_format_sinks(tmp_path))
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        await wait_for(lambda: rt.token is not None and rt.refreshing is None)
        assert rt.token.value == token and rt.token.lifetime == MAX_LIFETIME
        status, tokens = await get_json(daemon, "/v1/tokens", leak_guard)
        assert status == 200 and tokens["jobs"][0]["next_refresh_at"] is not None
    # A restart reads the JSON file back with the clamped expiry.
    async with start_daemon({"jobs": [job]}) as daemon:
        rt = daemon.scheduler.jobs[("api", None)]
        assert rt.token is not None and rt.token.lifetime <= MAX_LIFETIME
