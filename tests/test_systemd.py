"""The shipped systemd files: the unit verifies cleanly, its sandbox scores an exposure
of at most 2.0, sysusers/tmpfiles snippets apply, and the example config matches the
unit's credentials and runtime directory.

These run offline: no systemd as PID 1 is needed (nor present in the CI container).
`systemd-analyze verify` only loads unit files from disk and `security --offline=true`
only reads the file; neither talks to a service manager. Skipped only when
systemd-analyze is not installed; any error it reports fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "refresher.service"
SYSUSERS = REPO / "systemd" / "refresher.sysusers"
TMPFILES = REPO / "systemd" / "refresher.tmpfiles"
EXAMPLE = REPO / "systemd" / "refresher.yaml.example"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")

CREDENTIALS_DIR = "/run/credentials/refresher.service"
RUNTIME_DIR = "/run/refresher"
MAX_EXPOSURE = 2.0

# "<file or unit>[:line]: message" as systemd prints diagnostics.
_UNIT_REF = re.compile(
    r"^(?P<ref>\S+?\.(?:service|socket|target|mount|automount|swap|path|timer|slice|scope"
    r"|device))(?::\d+)?: "
)
_EXPOSURE = re.compile(r"Overall exposure level for (?P<unit>\S+): (?P<score>\d+(?:\.\d+)?) ")


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; repeated keys kept."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in parse_unit(UNIT.read_text()) if s == section and k == key]


def single(key: str, section: str = "Service") -> str:
    found = values(key, section)
    assert len(found) == 1, f"{section}.{key}: expected exactly one assignment, got {found}"
    return found[0]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)


def our_diagnostics(output: str) -> list[str]:
    """Every non-empty output line, except diagnostics that name some *other* unit.

    Warnings about unrelated units installed on the host are not ours to fix;
    anything about refresher.service, or that we cannot attribute, counts.
    """
    ours = []
    for line in output.splitlines():
        if not line.strip():
            continue
        match = _UNIT_REF.match(line)
        if match and Path(match["ref"]).name != "refresher.service":
            print("ignored (other unit):", line)
            continue
        ours.append(line)
    return ours


def refresher_executable() -> str:
    """Something executable to stand in for /usr/local/bin/refresher.

    `systemd-analyze verify` fails when ExecStart='s binary does not exist or is
    not executable, and /usr/local/bin/refresher exists only on an installed
    host, not on a dev machine or in CI. verify never runs the binary, so the
    console script of this checkout (on PATH, or next to the interpreter after
    `pip install -e .`) or, failing that, the interpreter itself will do.
    """
    found = shutil.which("refresher")
    if found:
        return found
    beside = Path(sys.executable).with_name("refresher")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return sys.executable


def unit_copy(tmp_path: Path, *, edit: dict[str, str] | None = None, extra: str = "") -> Path:
    """The shipped unit in `tmp_path`, ExecStart pointed at `refresher_executable()`.

    `edit` replaces whole `Key=` lines in [Service]; `extra` is appended there.
    """
    text = UNIT.read_text()
    exec_start = single("ExecStart")
    binary = exec_start.split()[0]
    assert binary == "/usr/local/bin/refresher"
    # ExecStart= and the ExecReload= config check both run the console script.
    text = re.sub(
        rf"(?m)^(ExecStart|ExecReload)={re.escape(binary)}\b",
        lambda m: f"{m[1]}={refresher_executable()}",
        text,
    )
    for key, value in (edit or {}).items():
        text, count = re.subn(rf"(?m)^{re.escape(key)}=.*$", f"{key}={value}", text)
        assert count == 1, key
    if extra:
        text = text.replace("[Service]\n", f"[Service]\n{extra}\n", 1)
    target = tmp_path / "refresher.service"
    target.write_text(text)
    return target


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    result = run(SYSTEMD_ANALYZE, "verify", "--no-pager", str(unit))
    print(f"systemd-analyze verify: rc={result.returncode}\n{result.stdout}{result.stderr}")
    return result


def exposure(unit: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    assert SYSTEMD_ANALYZE is not None
    result = run(SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit))
    assert result.returncode == 0, result.stderr
    match = _EXPOSURE.search(result.stdout)
    assert match, f"no 'Overall exposure level' line in:\n{result.stdout}"
    assert match["unit"] == "refresher.service"
    return float(match["score"]), result


# ---------------------------------------------------------------------------- the unit itself


def test_unit_declares_the_agreed_contract():
    assert single("Type") == "notify"
    assert single("NotifyAccess") == "main"
    assert single("WatchdogSec") == "30"
    assert single("ExecStart") == (
        "/usr/local/bin/refresher run --config /etc/refresher/refresher.yaml"
    )
    # Check the config first: a bad one fails `systemctl reload` before any SIGHUP.
    assert values("ExecReload") == [
        "/usr/local/bin/refresher check --config /etc/refresher/refresher.yaml",
        "/bin/kill -HUP $MAINPID",
    ]
    assert single("Restart") == "on-failure"
    # Config errors exit 2 (tests/test_operability.py): never restart on those.
    assert single("RestartPreventExitStatus").split() == ["2"]
    assert single("RestartSec") == "5s"
    assert single("TimeoutStopSec") == "30s"
    assert single("User") == "refresher"
    assert single("Group") == "refresher"
    assert single("RuntimeDirectory") == "refresher"
    assert single("RuntimeDirectoryMode") == "0750"
    assert single("RuntimeDirectoryPreserve") == "yes"
    # Rotated refresh tokens (oauth2 state_dir) must survive a reboot: not on tmpfs.
    assert single("StateDirectory") == "refresher"
    assert single("StateDirectoryMode") == "0700"
    assert single("UMask") == "0027"
    assert single("CapabilityBoundingSet") == ""
    assert single("NoNewPrivileges") == "yes"
    assert single("ProtectSystem") == "strict"
    assert single("RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    # Signalling consumers of other users is documented, not granted.
    assert not [v for _, _, v in parse_unit(UNIT.read_text()) if "CAP_KILL" in v]
    assert values("AmbientCapabilities") == [""]
    # The daemon must reach the partner APIs: no blanket IP deny.
    assert values("IPAddressDeny") == []
    assert single("WantedBy", "Install") == "multi-user.target"


def test_reload_check_refuses_a_bad_config_before_signalling(tmp_path):
    """ExecReload= lines run in order and stop at the first failure (systemd.service(5)):
    run the check line as systemd would, against a good and a bad config."""
    check, kill = values("ExecReload")
    assert kill.startswith("/bin/kill -HUP")
    argv = check.split()
    assert argv[:2] == ["/usr/local/bin/refresher", "check"]
    config_arg = argv.index("--config") + 1
    assert argv[config_arg] == single("ExecStart").split()[-1], "reload checks what runs"

    def run_check(config: Path) -> subprocess.CompletedProcess[str]:
        args = [*argv[1:config_arg], str(config), *argv[config_arg + 1 :]]
        return run(sys.executable, "-m", "refresher", *args)

    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(
            {
                "jobs": [
                    {
                        "name": "api",
                        "provider": {
                            "kind": "oauth2",
                            "token_url": "https://auth.example/token",
                            "client_id": "c",
                            "client_secret_file": str(secret),
                        },
                        "sinks": [{"kind": "file", "path": str(tmp_path / "api.token")}],
                    }
                ]
            }
        )
    )
    assert run_check(good).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("client_id:", "client_idd:"))
    rejected = run_check(bad)
    assert rejected.returncode == 2, rejected.stdout
    assert "client_idd: unknown key" in rejected.stderr
    # A missing secret file fails the check too (it runs with the unit's credentials).
    secret.unlink()
    assert run_check(good).returncode == 2


# ---------------------------------------------------------------------------- verify


@needs_analyze
def test_verify_is_clean(tmp_path):
    result = verify(unit_copy(tmp_path))
    assert result.returncode == 0
    assert our_diagnostics(result.stdout + result.stderr) == []


@needs_analyze
def test_verify_does_not_need_the_user_to_exist(tmp_path):
    # So verify passes before systemd-sysusers ran (and on machines without it).
    missing = f"nouser{uuid.uuid4().hex[:8]}"
    result = verify(unit_copy(tmp_path, edit={"User": missing, "Group": missing}))
    assert result.returncode == 0
    assert our_diagnostics(result.stdout + result.stderr) == []


@needs_analyze
def test_verify_would_catch_a_broken_unit(tmp_path):
    # Negative controls, so that "clean" above means something. verify exits 0 on
    # unparsable values and unknown keys: only its output shows them.
    bad = unit_copy(tmp_path, edit={"WatchdogSec": "soon"}, extra="NoSuchSetting=1")
    result = verify(bad)
    problems = our_diagnostics(result.stdout + result.stderr)
    assert any("NoSuchSetting" in line for line in problems)
    assert any("soon" in line for line in problems)

    (tmp_path / "missing").mkdir()
    gone = unit_copy(tmp_path / "missing", edit={})
    gone.write_text(
        gone.read_text().replace(
            f"ExecStart={refresher_executable()}", "ExecStart=/nonexistent/refresher", 1
        )
    )
    result = verify(gone)
    assert result.returncode != 0
    assert "/nonexistent/refresher" in result.stderr


# ---------------------------------------------------------------------------- security


@needs_analyze
def test_security_exposure_is_at_most_2(capsys):
    score, result = exposure(UNIT)
    assert our_diagnostics(result.stderr) == [], "directives were ignored: the score is bogus"
    with capsys.disabled():
        print(f"\nsystemd-analyze security --offline=true: exposure {score} for {UNIT.name}")
    assert score <= MAX_EXPOSURE, result.stdout
    # systemd's own comparison agrees (--threshold is in tenths).
    assert SYSTEMD_ANALYZE is not None
    checked = run(
        SYSTEMD_ANALYZE,
        "security",
        "--offline=true",
        "--no-pager",
        f"--threshold={round(MAX_EXPOSURE * 10)}",
        str(UNIT),
    )
    assert checked.returncode == 0, checked.stdout


@needs_analyze
def test_security_score_parser_sees_an_unhardened_unit(tmp_path):
    bare = tmp_path / "refresher.service"
    bare.write_text("[Service]\nType=notify\nExecStart=/bin/true\n")
    score, _ = exposure(bare)
    assert score > 9.0


# ---------------------------------------------------------------------------- sysusers, tmpfiles


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_creates_user_and_group(tmp_path):
    (tmp_path / "etc").mkdir()
    result = run("systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    user = passwd["refresher"]
    assert user[3] == groups["refresher"][2]  # primary group is "refresher"
    assert int(user[2]) < 1000  # a system user
    assert user[6].endswith("nologin")


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="no systemd-tmpfiles")
def test_tmpfiles_creates_root_only_credentials_dir(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("tmpfiles chowns to root: run as root (CI does)")
    result = run("systemd-tmpfiles", f"--root={tmp_path}", "--create", str(TMPFILES))
    assert result.returncode == 0, result.stderr
    etc = (tmp_path / "etc/refresher").stat()
    creds = (tmp_path / "etc/refresher/credentials").stat()
    assert stat.S_IMODE(etc.st_mode) == 0o755
    assert stat.S_IMODE(creds.st_mode) == 0o700
    assert creds.st_uid == 0
    assert creds.st_gid == 0


# ---------------------------------------------------------------------------- example config


def test_credentials_come_from_a_directory():
    # One directory source: no LoadCredential= line names a single file, so a provider
    # without a credential file neither stops the unit nor needs a unit edit.
    assert values("LoadCredential") == ["refresher:/etc/refresher/credentials"]
    tmpfiles = [line.split() for line in TMPFILES.read_text().splitlines() if line[:1] == "d"]
    assert ["d", "/etc/refresher/credentials", "0700", "root", "root", "-"] in tmpfiles


def test_example_config_matches_the_unit():
    config = yaml.safe_load(EXAMPLE.read_text())
    assert set(config) <= {"server", "refresh", "metrics", "logging", "jobs"}
    assert config["server"]["listen"].startswith("127.0.0.1:")

    [loaded] = values("LoadCredential")
    credential_id, _, source_dir = loaded.partition(":")
    used = set()
    for job in config["jobs"]:
        for key, value in job["provider"].items():
            if key.endswith("_file") and value.startswith("/run/"):
                directory, _, name = value.rpartition("/")
                assert directory == CREDENTIALS_DIR, value
                # A directory source names each file's copy "<ID>_<file name>".
                assert name.startswith(f"{credential_id}_"), value
                used.add(name.removeprefix(f"{credential_id}_"))
    assert source_dir == "/etc/refresher/credentials"
    assert used == {"gooclaim-client-secret", "debitura-api-key", "dutyclaims-credential"}

    for job in config["jobs"]:
        assert job["sinks"], job["name"]
        for sink in job["sinks"]:
            assert sink["kind"] == "file"
            assert sink["path"].startswith(RUNTIME_DIR + "/"), sink
            mode = int(sink.get("mode", "0600"), 8)
            assert mode & 0o007 == 0, f"{sink['path']}: world-accessible"
            assert mode & 0o040, f"{sink['path']}: consumers in group refresher cannot read it"


# ---------------------------------------------------------------------------- bundle consumers

DOCS = REPO / "docs" / "systemd.md"


def documented_units(section: str) -> dict[str, str]:
    """{file name: text} of the ```ini blocks under `section` of docs/systemd.md that
    start with a ``# /etc/systemd/system/<name>`` line."""
    text = DOCS.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    units = {}
    for block in re.findall(r"```ini\n(.*?)```", text, re.S):
        first, _, rest = block.partition("\n")
        assert first.startswith("# /etc/systemd/system/"), first
        units[first.rsplit("/", 1)[1]] = block
    return units


@needs_analyze
def test_the_environment_file_consumer_units_verify(tmp_path):
    units = documented_units("Many tokens in one environment file")
    assert set(units) == {"myapp.service", "myapp-tokens.path", "myapp-restart.service"}
    assert "EnvironmentFile=/run/refresher/tokens.env" in units["myapp.service"]
    assert "PathChanged=/run/refresher/tokens.env" in units["myapp-tokens.path"]
    # The example's program does not exist here: verify checks ExecStart= binaries.
    units["myapp.service"] = units["myapp.service"].replace("/usr/local/bin/myapp", "/bin/true")
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    unit_copy(tmp_path)  # refresher.service, which myapp.service wants
    for name in units:
        result = verify(tmp_path / name)
        assert result.returncode == 0, result.stdout + result.stderr
        problems = [line for line in (result.stdout + result.stderr).splitlines()
                    if line.strip() and "myapp" in line]
        assert problems == [], problems
