"""Logging to systemd's journal: syslog priority prefixes, no second timestamp.

systemd connects a unit's stderr to journald and sets ``JOURNAL_STREAM`` to that
stream's ``<device>:<inode>``. journald strips a leading ``<N>`` from each line and
stores N as the entry's PRIORITY, which is what ``journalctl -p err`` filters on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TextIO

import pytest
import structlog
import yaml

from refresher.logging import Redactor, configure_logging, is_journal
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.emulators.oauth2 import OAuth2Emulator

SECRET = "journal-secret-value-0123"


def journal_id(stream: TextIO) -> str:
    found = os.fstat(stream.fileno())
    return f"{found.st_dev}:{found.st_ino}"


def log_every_level(level: str = "debug") -> None:
    log = structlog.get_logger("journal-test")
    log.debug("debug line", job="api")
    log.info("info line", job="api")
    log.warning("warning line", job="api")
    log.error("error line", job="api", error=f"provider said {SECRET}")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("exception line", job="api")
    log.critical("critical line", job="api")


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture
def redactor() -> Redactor:
    redactor = Redactor()
    redactor.add_secret(SECRET)
    return redactor


def test_journal_lines_carry_syslog_priority_and_no_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redactor: Redactor
) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", journal_id(stream))
        configure_logging(redactor, level="debug", fmt="json", stream=stream)
        log_every_level()
    lines = lines_of(path)
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<3>", "<2>"]
    events = [json.loads(line[3:]) for line in lines]
    assert [e["event"] for e in events] == [
        "debug line",
        "info line",
        "warning line",
        "error line",
        "exception line",
        "critical line",
    ]
    for event in events:
        assert "timestamp" not in event, "journald stamps every entry itself"
        assert event["job"] == "api"
    assert SECRET not in path.read_text(), "the redactor still runs"
    assert "RuntimeError: boom" in events[4]["exception"]


def test_console_format_prefixes_every_line_of_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redactor: Redactor
) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", journal_id(stream))
        configure_logging(redactor, level="info", fmt="console", stream=stream)
        try:
            raise ValueError("multi-line")
        except ValueError:
            structlog.get_logger("t").exception("it failed")
    lines = lines_of(path)
    assert len(lines) > 3, "a traceback spans several lines"
    # Otherwise journald would file the traceback's lines as info, lost to `-p err`.
    assert all(line.startswith("<3>") for line in lines), lines
    assert "it failed" in lines[0] and "ValueError: multi-line" in path.read_text()


@pytest.mark.parametrize(
    "value",
    ["", "garbage", "1:2:3", "12:", ":34", "-1:-1", "99999999:99999999"],
    ids=["empty", "garbage", "three-parts", "no-inode", "no-device", "negative", "other-file"],
)
def test_only_the_stream_journald_gave_us_is_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redactor: Redactor, value: str
) -> None:
    """A process that inherited JOURNAL_STREAM but writes elsewhere (a redirect, a pipe)
    keeps plain lines with timestamps; a malformed value is simply not the journal."""
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", value)
        assert not is_journal(stream)
        configure_logging(redactor, level="info", fmt="json", stream=stream)
        structlog.get_logger("t").error("plain line")
    [line] = lines_of(path)
    event = json.loads(line)
    assert event["event"] == "plain line" and "timestamp" in event


def test_a_stream_without_a_file_is_not_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    assert not is_journal(io.StringIO())


def test_the_daemon_process_writes_priorities_to_the_journal_stream(
    tmp_path: Path, leak_guard
) -> None:
    """A real `refresher once` whose stderr is the journal stream: a rejected credential
    is logged at error priority, the successful job at info."""
    with OAuth2Emulator(clients={CLIENT_ID: CLIENT_SECRET}, token_lifetime=3600) as emu:
        leak_guard.emulators.append(emu)
        (tmp_path / "good").write_text(CLIENT_SECRET)
        (tmp_path / "bad").write_text("not-the-client-secret")
        leak_guard.secrets.add("not-the-client-secret")

        def job(name: str) -> dict[str, object]:
            return {
                "name": name,
                "provider": {
                    "kind": "oauth2",
                    "token_url": emu.token_url,
                    "client_id": CLIENT_ID,
                    "client_secret_file": str(tmp_path / name),
                },
                "sinks": [{"kind": "file", "path": str(tmp_path / f"{name}.token")}],
            }

        config = tmp_path / "refresher.yaml"
        config.write_text(yaml.safe_dump({"jobs": [job("good"), job("bad")]}))
        path = tmp_path / "stderr"
        with path.open("w") as stream:
            env = {**os.environ, "JOURNAL_STREAM": journal_id(stream)}
            proc = subprocess.run(
                [sys.executable, "-m", "refresher", "once", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=stream,
                env=env,
                timeout=60,
                check=False,
            )
    text = path.read_text()
    leak_guard.extra_outputs.append(text)
    assert proc.returncode == 1, text
    lines = text.splitlines()
    assert lines and all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), text
    events = [(line[:3], json.loads(line[3:])) for line in lines]
    failed = [(p, e) for p, e in events if e["event"] == "refresh failed"]
    assert failed and all(p == "<3>" and e["job"] == "bad" for p, e in failed), failed
    assert any(p == "<6>" and e.get("job") == "good" for p, e in events), events
    assert all("timestamp" not in e for _, e in events)
