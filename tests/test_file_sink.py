"""The file sink on a real filesystem: atomic, permissioned, failure-safe."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import jwt
import pytest

from refresher.config import FileSinkConfig
from refresher.errors import SinkError
from refresher.sinks.file import FileSink, parse, render
from refresher.token import Token


def token(n: int, size: int = 4000) -> Token:
    # Big values make a torn write observable if the sink were not atomic.
    return Token(
        value=f"tok{n:06d}-" + "x" * size,
        token_type="Bearer",
        obtained_at=1000.0,
        expires_at=5000.0 + n,
    )


def sink(path: Path, **kw: object) -> FileSink:
    return FileSink(FileSinkConfig(kind="file", path=str(path), **kw), path)


@pytest.mark.anyio
async def test_concurrent_reader_never_sees_partial_or_empty_file(tmp_path: Path) -> None:
    target = tmp_path / "t.token"
    s = sink(target)
    await s.write(token(0))
    bad: list[str] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            data = target.read_text()
            reads += 1
            if not (data.startswith("tok") and data.endswith("x\n") and len(data) == 4011):
                bad.append(repr(data[:20]))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(1, 300):
            await s.write(token(n))
    finally:
        stop.set()
        thread.join()
    assert reads > 50
    assert bad == []
    assert target.read_text().startswith("tok000299")
    assert [p.name for p in tmp_path.iterdir()] == ["t.token"], "temp files left behind"


@pytest.mark.anyio
async def test_mode_defaults_to_0600_and_is_configurable(tmp_path: Path) -> None:
    await sink(tmp_path / "a").write(token(1))
    await sink(tmp_path / "b", mode="0640").write(token(1))
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o640


@pytest.mark.anyio
async def test_missing_directory_is_a_sink_error(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="directory does not exist"):
        await sink(tmp_path / "nope" / "t").write(token(1))


@pytest.mark.anyio
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_read_only_directory_keeps_previous_file(tmp_path: Path) -> None:  # pragma: no cover
    target = tmp_path / "t"
    await sink(target).write(token(1))
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(SinkError):
            await sink(target).write(token(2))
    finally:
        tmp_path.chmod(0o700)
    assert target.read_text().startswith("tok000001")


@pytest.mark.anyio
async def test_write_failure_leaves_previous_file_untouched(tmp_path: Path, monkeypatch) -> None:
    # Injected at os.fsync: stands in for ENOSPC/EIO, which a test cannot provoke
    # on this filesystem without root-only mounts.
    target = tmp_path / "t"
    s = sink(target)
    await s.write(token(1))

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SinkError, match="No space left on device"):
        await s.write(token(2))
    monkeypatch.undo()
    assert target.read_text().startswith("tok000001")
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


@pytest.mark.anyio
async def test_symlink_at_target_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("do not touch")
    sink_dir = tmp_path / "sink"
    sink_dir.mkdir()
    target = sink_dir / "t"
    target.symlink_to(outside)
    await sink(target).write(token(3))
    assert outside.read_text() == "do not touch"
    assert not target.is_symlink()
    assert target.read_text().startswith("tok000003")


@pytest.mark.anyio
async def test_stale_temp_files_from_a_crash_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".t.tmp-deadbeef").write_text("half")
    await sink(tmp_path / "t").write(token(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def jwt_token() -> Token:
    value = jwt.encode({"exp": 5000, "iat": 1000}, "k" * 32, algorithm="HS256")
    return Token(
        value=value,
        token_type="Bearer",
        obtained_at=1000.0,
        expires_at=5000.0,
        scope="a b",
        extra={"creditorId": "c-1"},
    )


@pytest.mark.parametrize("fmt", ["raw", "json", "env", "header"])
def test_every_format_round_trips_for_restart(fmt: str) -> None:
    config = FileSinkConfig(kind="file", path="/x", format=fmt)
    original = jwt_token()
    back = parse(render(original, config), config)
    assert back is not None
    assert back.value == original.value
    assert back.expires_at == original.expires_at


def test_formats_look_like_what_consumers_expect() -> None:
    t = jwt_token()
    assert (
        render(t, FileSinkConfig(kind="file", path="/x", format="header")).decode()
        == f"Authorization: Bearer {t.value}\n"
    )
    assert (
        render(
            t, FileSinkConfig(kind="file", path="/x", format="header", header_name="X-API-Key")
        ).decode()
        == f"X-API-Key: {t.value}\n"
    )
    env = render(
        t, FileSinkConfig(kind="file", path="/x", format="env", env_name="GOOCLAIM_TOKEN")
    ).decode()
    assert f"GOOCLAIM_TOKEN={t.value}\n" in env and "GOOCLAIM_TOKEN_EXPIRES_AT=" in env
    doc = json.loads(render(t, FileSinkConfig(kind="file", path="/x", format="json")))
    assert doc["value"] == t.value and doc["fingerprint"] == t.fingerprint()
    assert (
        doc["expires_at"].endswith("Z")
        and doc["metadata"] == {"creditorId": "c-1"}
        and doc["scope"] == "a b"
    )


def test_opaque_raw_token_cannot_be_trusted_on_restart() -> None:
    config = FileSinkConfig(kind="file", path="/x", format="raw")
    assert parse(b"opaque-value\n", config) is None
    assert parse(b"", config) is None
