"""The documentation: a short README and the mkdocs site in docs/.

* `mkdocs build --strict` succeeds: no broken link or anchor, no page missing from the
  nav (mkdocs.yml turns each of those into a warning, --strict into an error), and it
  would fail on each of them (a negative control on a copy).
* Every link into docs/ from outside it (alert runbook_url annotations, the dashboard,
  the chart, the READMEs) lands on a built page and, with a fragment, on a heading.
* The README stays a five-minute read that leads with the commands .ci/run runs.
* No document points at files outside the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
REPO_BLOB = "https://github.com/refresher-dev/refresher/blob/main/"
README_LIMIT = 12 * 1024


def mkdocs_build(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    # cwd: pymdownx.snippets resolves included files (CHANGELOG.md) from the project root.
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    result = mkdocs_build(ROOT, target)
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def page_of(site: Path, doc: str) -> Path:
    """The built HTML of docs/<doc> (e.g. "runbooks.md" → site/runbooks/index.html)."""
    stem = doc.removesuffix(".md")
    return site / "index.html" if stem == "index" else site / stem / "index.html"


def ids_of(html: Path) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', html.read_text()))


def assert_lands(site: Path, doc: str, fragment: str, source: str) -> None:
    html = page_of(site, doc)
    assert html.is_file(), f"{source}: docs/{doc} is not a page of the site"
    if fragment:
        assert fragment in ids_of(html), f"{source}: docs/{doc} has no heading #{fragment}"


# ---------------------------------------------------------------------------- the site


def test_every_docs_page_is_built(site: Path) -> None:
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert {"index.md", "runbooks.md", "configuration.md", "design.md"} <= set(pages)
    assert [p for p in pages if not page_of(site, p).is_file()] == []


def test_the_design_page_draws_the_data_flow(site: Path) -> None:
    html = page_of(site, "design.md").read_text()
    assert '<pre class="mermaid"><code>flowchart' in html


def test_upgrading_includes_the_changelog(site: Path) -> None:
    html = page_of(site, "upgrading.md").read_text()
    assert "upgrade-notes" in ids_of(page_of(site, "upgrading.md"))
    assert "replicaCount" in html


def test_a_broken_link_anchor_or_orphan_page_fails_the_build(tmp_path: Path) -> None:
    """The negative control: the same strict build refuses each kind of breakage."""
    project = tmp_path / "project"
    shutil.copytree(DOCS, project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project)
    shutil.copy(ROOT / "CHANGELOG.md", project)
    shutil.copytree(ROOT / "examples", project / "examples")  # files the pages include
    page = project / "docs" / "getting-started.md"
    page.write_text(
        page.read_text() + "\n[gone](no-such-page.md) and [typo](runbooks.md#refresherdwon)\n"
    )
    (project / "docs" / "orphan.md").write_text("# Not in the nav\n")
    result = mkdocs_build(project, tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "no-such-page.md" in output
    assert "refresherdwon" in output
    assert "orphan.md" in output


# ---------------------------------------------------------------------------- links into docs/


def alert_rules(path: Path) -> dict[str, str]:
    """{alert name: runbook_url} of a Prometheus or a Grafana rule file."""
    found = {}
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("title")
            found[name] = rule["annotations"]["runbook_url"]
    return found


@pytest.mark.parametrize("rules", ["alerts.yaml", "grafana-alerts.yaml"])
def test_every_runbook_url_lands_on_its_alerts_runbook(site: Path, rules: str) -> None:
    urls = alert_rules(ROOT / "helm" / "refresher" / "files" / rules)
    assert len(urls) == 11
    for alert, url in urls.items():
        page, _, fragment = url.removeprefix(REPO_BLOB).partition("#")
        assert page == "docs/runbooks.md", f"{alert}: {url}"
        assert fragment == alert.lower(), f"{alert}: {url}"
        assert_lands(site, "runbooks.md", fragment, f"{rules} {alert}")


# Files outside docs/ that link into it, as absolute GitHub URLs or relative paths.
LINKING_FILES = [
    README,
    ROOT / "tests" / "bench" / "README.md",
    ROOT / "tests" / "reliability" / "README.md",
    ROOT / "tests" / "monitoring" / "alerts_test.yaml",
    *sorted(p for p in (ROOT / "helm").rglob("*") if p.is_file() and "__pycache__" not in p.parts),
    *sorted((ROOT / "systemd").iterdir()),
]
_BLOB = re.compile(re.escape(REPO_BLOB) + r"(?P<path>[^\s\"'#)<>]+)(?:#(?P<fragment>[\w-]+))?")
_RELATIVE = re.compile(r"\]\((?!https?:|#|mailto:)(?P<path>[^)#\s]+)(?:#(?P<fragment>[\w-]+))?\)")


def links_of(path: Path) -> list[tuple[str, str]]:
    """(repository path, fragment) of every link in `path` into the repository."""
    text = path.read_text()
    found = [(m["path"], m["fragment"] or "") for m in _BLOB.finditer(text)]
    if path.suffix == ".md":
        for m in _RELATIVE.finditer(text):
            target = (path.parent / m["path"]).resolve().relative_to(ROOT)
            found.append((target.as_posix(), m["fragment"] or ""))
    return found


def test_every_link_into_the_repository_lands(site: Path) -> None:
    checked = 0
    for path in LINKING_FILES:
        source = path.relative_to(ROOT).as_posix()
        for target, fragment in links_of(path):
            assert (ROOT / target).exists(), f"{source}: {target} does not exist"
            if target.startswith("docs/"):
                assert_lands(site, target.removeprefix("docs/"), fragment, source)
            else:
                assert not fragment, f"{source}: #{fragment} into {target} is not checked"
            checked += 1
    # The alerts (11 each, and their promtool expectations), the dashboard, the chart's
    # links, and the READMEs' pages are all among them.
    assert checked >= 70


def test_link_checker_sees_a_broken_link(site: Path, tmp_path: Path) -> None:
    doc = tmp_path / "x.yaml"
    doc.write_text(f"runbook_url: {REPO_BLOB}docs/runbooks.md#refresherdwon\n")
    [(target, fragment)] = links_of(doc)
    assert (target, fragment) == ("docs/runbooks.md", "refresherdwon")
    with pytest.raises(AssertionError, match="no heading #refresherdwon"):
        assert_lands(site, "runbooks.md", fragment, "x.yaml")
    with pytest.raises(AssertionError, match="not a page"):
        assert_lands(site, "runbook.md", "", "x.yaml")


# ---------------------------------------------------------------------------- the README


def test_readme_is_a_five_minute_read() -> None:
    text = README.read_text()
    assert len(text.encode()) <= README_LIMIT, f"README.md is {len(text.encode())} bytes"
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:3] == ["Quick start", "A minimal config", "Features"]
    assert "Documentation" in headings and "Upgrading" in headings


def test_readme_quick_start_is_what_ci_runs() -> None:
    """.ci/run runs exactly the README's install and test commands."""
    quick_start = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)\n```", quick_start, re.S)
    assert blocks == [
        "python3 -m pip install -e . && refresher demo",
        "bash .ci/install-deps && python3 -m pytest",
    ]
    install, test = blocks[1].split(" && ")
    ci = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert install in ci and test in ci
    assert ci.index(install) < ci.index(test)


def test_readme_links_every_docs_page() -> None:
    text = README.read_text()
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "index.md")
    assert [p for p in pages if f"(docs/{p})" not in text] == []


# ---------------------------------------------------------------------------- self-contained


# A reference to something only the project's authors had: a design note, the partner
# documents or the issue tracker, none of which ship with the repository.
OUTSIDE = re.compile(
    r"DESIGN\.md|\bseeds/|(?<![\w/.-])shared/|\b[Ii]ssues? \d+|\bthe issue's\b|\bas the issue\b"
)
SELF_CONTAINED = [
    README,
    ROOT / "mkdocs.yml",
    *sorted(DOCS.rglob("*.md")),
    *sorted((ROOT / "tests").glob("*/README.md")),
    *sorted(p for p in (ROOT / "helm").rglob("*") if p.is_file() and "__pycache__" not in p.parts),
    *sorted((ROOT / "systemd").iterdir()),
    *sorted(p for p in (ROOT / "examples").rglob("*") if p.is_file()),
]


def test_docs_reference_nothing_outside_the_repository() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in SELF_CONTAINED
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert found == []


@pytest.mark.parametrize(
    "line",
    [
        "Shape: DESIGN.md §3.",
        "Each partner contract in `shared/seeds/` is",
        "## DutyClaims (`seeds/000_487d262a7d482ade.txt`)",
        "checks the five invariants of issue 8",
        "120 s tokens (the issue's example)",
    ],
)
def test_outside_reference_pattern_catches(line: str) -> None:
    assert OUTSIDE.search(line)


@pytest.mark.parametrize(
    "line",
    ["mount a shared volume", "/run/refresher/api.token", "`tests/reliability/`", "issuer: x"],
)
def test_outside_reference_pattern_spares(line: str) -> None:
    assert not OUTSIDE.search(line)
