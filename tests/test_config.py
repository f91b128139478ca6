"""Config validation through the real CLI entry point: every error names its field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from refresher.cli import main
from refresher.config import load_settings
from refresher.fields import parse_duration


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "refresher.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def good_job(tmp_path: Path, **overrides: object) -> dict[str, object]:
    secret = tmp_path / "secret"
    secret.write_text("the-secret\n")
    job: dict[str, object] = {
        "name": "api",
        "provider": {
            "kind": "oauth2",
            "token_url": "https://auth.example.com/oauth/token",
            "client_id": "abc",
            "client_secret_file": str(secret),
        },
        "sinks": [{"kind": "file", "path": str(tmp_path / "api.token")}],
    }
    job.update(overrides)
    return job


BAD_CONFIGS = [
    # (description, mutate(config, tmp_path), expected "path: message" fragment)
    (
        "missing secret file",
        lambda c, t: c["jobs"][1]["provider"].update(client_secret_file=str(t / "nope")),
        "jobs[1].provider.client_secret_file: file not found",
    ),
    ("unknown top-level key", lambda c, t: c.update(frobnicate=True), "frobnicate: unknown key"),
    (
        "unknown job key",
        lambda c, t: c["jobs"][0].update(colour="red"),
        "jobs[0].colour: unknown key",
    ),
    (
        "unknown provider kind",
        lambda c, t: c["jobs"][0]["provider"].update(kind="kerberos"),
        "jobs[0].provider: Input tag 'kerberos'",
    ),
    (
        "bad duration",
        lambda c, t: c.update(refresh={"min_remaining": "5 fortnights"}),
        "refresh.min_remaining: invalid duration",
    ),
    (
        "refresh_at out of range",
        lambda c, t: c.update(refresh={"refresh_at": 1.5}),
        "refresh.refresh_at",
    ),
    (
        "bad file mode",
        lambda c, t: c["jobs"][0]["sinks"][0].update(mode="rw-r--r--"),
        "jobs[0].sinks[0].mode: must be an octal mode",
    ),
    (
        "no sinks",
        lambda c, t: c["jobs"][0].update(sinks=[]),
        "jobs[0].sinks: List should have at least 1 item",
    ),
    (
        "duplicate job names",
        lambda c, t: c["jobs"][1].update(name="api"),
        "duplicate job name 'api'",
    ),
    (
        "two secret sources",
        lambda c, t: c["jobs"][0]["provider"].update(client_secret="inline"),
        "set only one of client_secret, client_secret_file",
    ),
    (
        "no secret at all",
        lambda c, t: c["jobs"][0]["provider"].pop("client_secret_file"),
        "one of client_secret, client_secret_file or client_secret_env is required",
    ),
    (
        "secret env var unset",
        lambda c, t: (
            c["jobs"][0]["provider"].pop("client_secret_file"),
            c["jobs"][0]["provider"].update(client_secret_env="REFRESHER_TEST_UNSET_VAR"),
        ),
        "client_secret_env: environment variable REFRESHER_TEST_UNSET_VAR is not set",
    ),
    (
        "token_url not a URL",
        lambda c, t: c["jobs"][0]["provider"].update(token_url="auth.example.com"),
        "jobs[0].provider.token_url: must be an http:// or https:// URL",
    ),
    (
        "bad listen address",
        lambda c, t: c.update(server={"listen": "9464"}),
        "server.listen: must be host:port",
    ),
    (
        "zero max_connections",
        lambda c, t: c.update(server={"max_connections": 0}),
        "server.max_connections: Input should be greater than or equal to 1",
    ),
    (
        "boolean max_connections",
        lambda c, t: c.update(server={"max_connections": True}),
        "server.max_connections: must be a number of connections, not true/false",
    ),
    (
        "fractional max_connections",
        lambda c, t: c.update(server={"max_connections": 2.5}),
        "server.max_connections: Input should be a valid integer",
    ),
    (
        "max_connections beyond any fd limit",
        lambda c, t: c.update(server={"max_connections": 1_000_000}),
        "server.max_connections: Input should be less than or equal to 65536",
    ),
    (
        "zero header_timeout",
        lambda c, t: c.update(server={"header_timeout": "0s"}),
        "server.header_timeout: Input should be greater than 0",
    ),
    (
        "header_timeout that never frees a slot",
        lambda c, t: c.update(server={"header_timeout": "1h"}),
        "server.header_timeout: must be at most 10m",
    ),
    (
        "header_timeout not a duration",
        lambda c, t: c.update(server={"header_timeout": "soon"}),
        "server.header_timeout: invalid duration 'soon'",
    ),
    ("bad job name", lambda c, t: c["jobs"][0].update(name="has space"), "jobs[0].name"),
    (
        "backoff initial above max",
        lambda c, t: c.update(refresh={"backoff": {"initial": "10m", "max": "1m"}}),
        "refresh.backoff: initial must not exceed max",
    ),
    (
        "http2 not a boolean",
        lambda c, t: c["jobs"][0]["provider"].update(http2="yes"),
        "jobs[0].provider.http2: Input should be a valid boolean",
    ),
    (
        "wrong sink format",
        lambda c, t: c["jobs"][0]["sinks"][0].update(format="xml"),
        "jobs[0].sinks[0].format",
    ),
]


@pytest.mark.parametrize(
    ("case", "mutate", "expected"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_exits_2_naming_the_field(tmp_path, capsys, case, mutate, expected) -> None:
    config = {"jobs": [good_job(tmp_path), good_job(tmp_path, name="other")]}
    mutate(config, tmp_path)
    path = write(tmp_path, config)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err, err


def test_every_error_is_reported_at_once(tmp_path, capsys) -> None:
    config = {"jobs": [good_job(tmp_path), good_job(tmp_path, name="other")], "extra": 1}
    config["jobs"][0]["sinks"][0]["mode"] = "bad"
    path = write(tmp_path, config)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "extra: unknown key" in err and "jobs[0].sinks[0].mode" in err
    assert "2 error(s)" in err


def test_invalid_yaml_and_missing_file(tmp_path, capsys) -> None:
    assert main(["check", "--config", str(write(tmp_path, "jobs: [unclosed"))]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert main(["check", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_valid_config_prints_the_plan_and_exits_0(tmp_path, capsys) -> None:
    path = write(tmp_path, {"jobs": [good_job(tmp_path)], "refresh": {"min_remaining": "2m"}})
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "job api: provider oauth2 https://auth.example.com/oauth/token" in out
    assert f"sink file: {tmp_path / 'api.token'}" in out
    assert "at least 120s before expiry" in out
    assert "the-secret" not in out


def test_check_as_a_real_process(tmp_path) -> None:
    config = {"jobs": [good_job(tmp_path)]}
    config["jobs"][0]["provider"]["client_secret_file"] = str(tmp_path / "missing")
    path = write(tmp_path, config)
    result = subprocess.run(
        [sys.executable, "-m", "refresher", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "jobs[0].provider.client_secret_file: file not found" in result.stderr


def test_server_limits_default_and_accept_durations(tmp_path, monkeypatch) -> None:
    settings = load_settings(write(tmp_path, {"jobs": [good_job(tmp_path)]}))
    assert settings.server.max_connections == 256 and settings.server.header_timeout == 10
    path = write(
        tmp_path,
        {"jobs": [good_job(tmp_path)], "server": {"max_connections": 64, "header_timeout": "2m"}},
    )
    assert load_settings(path).server.header_timeout == 120
    monkeypatch.setenv("REFRESHER_SERVER__MAX_CONNECTIONS", "32")
    monkeypatch.setenv("REFRESHER_SERVER__HEADER_TIMEOUT", "500ms")
    server = load_settings(path).server
    assert (server.max_connections, server.header_timeout) == (32, 0.5)


def test_env_overrides_yaml(tmp_path, monkeypatch) -> None:
    path = write(tmp_path, {"jobs": [good_job(tmp_path)], "server": {"listen": "127.0.0.1:9464"}})
    monkeypatch.setenv("REFRESHER_SERVER__LISTEN", "0.0.0.0:9999")
    monkeypatch.setenv("REFRESHER_REFRESH__MIN_REMAINING", "90s")
    settings = load_settings(path)
    assert settings.server.listen == "0.0.0.0:9999"
    assert settings.refresh.min_remaining == 90


def test_secret_file_is_stripped_of_trailing_newlines_and_reread(tmp_path) -> None:
    from refresher.fields import secret_source

    settings = load_settings(write(tmp_path, {"jobs": [good_job(tmp_path)]}))
    source = secret_source(settings.jobs[0].provider, "client_secret")
    assert source is not None and source.read() == "the-secret"
    (tmp_path / "secret").write_bytes(b"rotated\r\n\n")
    assert source.read() == "rotated"
    assert "the-secret" not in repr(source)


def test_relative_secret_paths_resolve_against_the_config_file(tmp_path) -> None:
    job = good_job(tmp_path)
    job["provider"]["client_secret_file"] = "secret"
    settings = load_settings(write(tmp_path, {"jobs": [job]}))
    assert settings.jobs[0].provider.client_secret_file == tmp_path / "secret"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), (42, 42), ("2d", 172800)],
)
def test_durations(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m5", "1h-30m", True])
def test_bad_durations(text) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
