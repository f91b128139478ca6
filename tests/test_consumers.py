"""The consumer snippets of docs/consuming-tokens.md (examples/consumers/), each run
against a real ``refresher demo`` process: it reads a token file, reports the token
rejected, and reloads the file when the daemon's fresh token lands in it. A second
report of that fresh token is the partner's "second 401": the snippet stops.

Each language runs where its toolchain is installed (.ci/install-deps installs Go and
a JDK from Debian's packages; Node and curl come with the machine)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.test_cli_process import free_port, until

CONSUMERS = Path(__file__).resolve().parent.parent / "examples" / "consumers"

#: language -> (command, token file of the demo, job, tenant): one target each, since a
#: report of a token minted in answer to a report marks its link invalid.
LANGUAGES = {
    "shell": (["sh", "consumer.sh"], "debitura-acme-001.jwt", "debitura", "acme-001"),
    "python": (
        [sys.executable, "consumer.py"],
        "debitura-globex-002.jwt",
        "debitura",
        "globex-002",
    ),
    "go": (["go", "run", "consumer.go"], "debitura-initech-003.jwt", "debitura", "initech-003"),
    "node": (["node", "consumer.js"], "gooclaim.token", "gooclaim", ""),
    "java": (["java", "TokenConsumer.java"], "dutyclaims.token", "dutyclaims", ""),
}
TOOLS = {"shell": "curl", "python": "python3", "go": "go", "node": "node", "java": "java"}


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """`refresher demo` in a process: (its tokens directory, its URL)."""
    tokens = tmp_path_factory.mktemp("demo") / "tokens"
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "refresher",
            "demo",
            "--tokens-dir",
            str(tokens),
            "--lifetime",
            "120",
            "--listen",
            url.removeprefix("http://"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def ready() -> bool:
            try:
                return httpx2.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx2.HTTPError:
                return False

        until(ready, timeout=30)
        yield tokens, url
    finally:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def current(url: str, job: str, tenant: str) -> str:
    """The fingerprint the daemon says (job, tenant) holds now."""
    jobs = httpx2.get(f"{url}/v1/tokens", timeout=5).json()["jobs"]
    [entry] = [j for j in jobs if j["job"] == job and (j.get("tenant") or "") == tenant]
    return str(entry["fingerprint"])


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_a_consumer_reads_reports_and_reloads(
    demo: tuple[Path, str], language: str, tmp_path: Path
) -> None:
    if shutil.which(TOOLS[language]) is None:
        pytest.skip(f"{TOOLS[language]} is not installed (see .ci/install-deps)")
    tokens, url = demo
    command, file, job, tenant = LANGUAGES[language]
    before = (tokens / file).read_text().strip()
    env = {
        **os.environ,
        "GOCACHE": str(tmp_path / "go-cache"),
        "GOPATH": str(tmp_path / "go"),
        "GOPROXY": "off",
        "GOFLAGS": "",
    }
    run = subprocess.run(
        [*command, str(tokens / file), job, tenant, url],
        cwd=CONSUMERS,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line.split() for line in run.stdout.splitlines()]
    assert [line[0] for line in lines] == ["token", "answer", "reloaded"], run.stdout
    (_, read), (_, answered), (_, reloaded) = lines
    assert read == fingerprint(before)
    assert answered != read and reloaded == answered
    after = (tokens / file).read_text().strip()
    assert fingerprint(after) == answered == current(url, job, tenant)
    assert before not in run.stdout + run.stderr and after not in run.stdout + run.stderr
    if language == "shell":
        # The fresh token rejected too: the link is invalid, and the snippet stops.
        again = subprocess.run(
            [*command, str(tokens / file), job, tenant, url],
            cwd=CONSUMERS,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 3 and "link invalid" in again.stderr
