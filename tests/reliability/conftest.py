"""Collects one summary row per scenario and prints the matrix at the end of the run.

Set ``RELIABILITY_REPORT=/path/to/file.md`` to also write the table to a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import RESULTS, render_table
from tests.reliability.runner import Env


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    row = RESULTS.get(item.nodeid)
    if row is not None:
        if report.when == "call" or (report.when == "setup" and report.skipped):
            if hasattr(report, "wasxfail"):
                row.outcome = "xfail (bug)" if report.skipped else "XPASS"
            else:
                row.outcome = report.outcome
        elif report.when == "teardown" and report.failed:
            row.outcome = "failed (teardown)"
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    rows = list(RESULTS.values())
    if not rows:
        return
    table = render_table(rows)
    terminalreporter.write_sep("=", "reliability matrix")
    terminalreporter.write_line(table)
    target = os.environ.get("RELIABILITY_REPORT")
    if target:
        Path(target).write_text(table + "\n")


@pytest.fixture
def env(clock, make_emulator, start_daemon, leak_guard, tmp_path, monkeypatch, request) -> Env:
    """The shared fixtures a matrix scenario runs with."""
    return Env(
        clock=clock,
        make_emulator=make_emulator,
        start_daemon=start_daemon,
        leak_guard=leak_guard,
        tmp_path=tmp_path,
        monkeypatch=monkeypatch,
        nodeid=request.node.nodeid,
    )
