"""Every config the project ships passes `refresher check --no-files`.

* systemd/refresher.yaml.example, through the real command line;
* every values file in helm/refresher/examples/: the chart's ConfigMap is rendered by the
  real Helm engine (as tests/test_helm_chart.py does) and its config.yaml checked;
* every ```yaml block in README.md and docs/*.md that is a refresher config (a whole
  file, a section of one, or a list of jobs), and every one that is chart values
  (`config:` inside).

`--no-files`: the secrets, PEM keys and kubeconfigs these examples name exist only on a
real host or in a real pod. Everything else is checked exactly as the daemon would.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from refresher.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "refresher"
SYSTEMD_EXAMPLE = ROOT / "systemd" / "refresher.yaml.example"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def check_no_files(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "refresher", "check", "--no-files", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---------------------------------------------------------------------------- systemd


def test_systemd_example_passes_check() -> None:
    result = check_no_files(SYSTEMD_EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK: 3 job(s)")


# ---------------------------------------------------------------------------- chart examples


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[helm.Chart]:
    target = tmp_path_factory.mktemp("chart") / "refresher"
    shutil.copytree(CHART, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with helm.Chart.load(target) as loaded:
        yield loaded


def rendered_config(chart: helm.Chart, values: dict[str, Any], tmp_path: Path) -> Path:
    """config.yaml of the chart's ConfigMap for `values`, written to a file."""
    manifests = chart.render(values, name="refresher", namespace="apps", is_install=True)
    docs = [d for d in yaml.safe_load_all(manifests["refresher/templates/configmap.yaml"]) if d]
    [config_map] = docs
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    return path


def chart_values_examples() -> list[Path]:
    """Every example that is a values file (the others are manifests with a `kind`)."""
    found = []
    for path in sorted((CHART / "examples").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if "kind" not in doc:
            found.append(path)
    return found


def test_chart_examples_are_found() -> None:
    assert {p.name for p in chart_values_examples()} >= {
        "values-sidecar.yaml",
        "values-standalone.yaml",
    }


@pytest.mark.parametrize("example", chart_values_examples(), ids=lambda p: p.name)
def test_chart_example_config_passes_check(
    chart: helm.Chart, example: Path, tmp_path: Path
) -> None:
    values = yaml.safe_load(example.read_text())
    config = rendered_config(chart, values, tmp_path)
    result = check_no_files(config)
    assert result.returncode == 0, result.stderr
    jobs = len(values["config"]["jobs"])
    assert result.stdout.startswith(f"config OK: {jobs} job(s)")


# ---------------------------------------------------------------------------- doc snippets

# A yaml fence, indented or not (inside a list item); the body loses that indentation.
_FENCE = re.compile(r"^(?P<indent>[ ]*)```yaml\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)


def doc_yaml_blocks() -> list[tuple[str, Any]]:
    """("path:line", parsed YAML) of every ```yaml block in README.md and docs/*.md."""
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for m in _FENCE.finditer(text):
            body = "".join(line.removeprefix(m["indent"]) for line in m["body"].splitlines(True))
            where = f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
            found.append((where, yaml.safe_load(body)))
    return found


def kind_of(doc: Any) -> str:
    """What a doc yaml block is; "unknown" fails the test (classify new shapes here)."""
    sections = set(Settings.model_fields)
    if isinstance(doc, str) and doc.startswith("--8<--"):
        return "included-file"  # a repository file the docs include, tested where it lives
    if isinstance(doc, dict):
        if set(doc) == {"provider"}:
            return "provider"
        if {"apiVersion", "kind"} <= doc.keys():
            return "kubernetes-manifest"
        if {"rule_files", "scrape_configs"} & doc.keys():
            return "prometheus-config"
        if "config" in doc:
            return "chart-values"
        if doc.keys() <= sections:
            return "config"
        if set(doc) == {"env"}:
            return "container-fragment"
    if isinstance(doc, list) and doc and all(isinstance(item, dict) for item in doc):
        if all({"name", "provider"} <= item.keys() for item in doc):
            return "jobs"
        if all("apiGroups" in item for item in doc):
            return "rbac-rules"
    return "unknown"


DOC_BLOCKS = doc_yaml_blocks()


def test_every_doc_yaml_block_is_classified() -> None:
    unknown = [where for where, doc in DOC_BLOCKS if kind_of(doc) == "unknown"]
    assert unknown == [], f"yaml blocks at {unknown}: teach kind_of() about them"
    found = {where: kind_of(doc) for where, doc in DOC_BLOCKS}
    # What the docs are known to hold, so a change in classification shows up.
    kinds = list(found.values())
    assert kinds.count("config") >= 4
    assert kinds.count("jobs") >= 3
    assert kinds.count("chart-values") >= 1
    assert kinds.count("provider") >= 5  # the oauth2 worked examples
    # The README's minimal config and the configuration reference are among them.
    assert {found[w] for w in found if w.startswith("README.md:")} == {"config"}
    assert "config" in {found[w] for w in found if w.startswith("docs/configuration.md:")}


@pytest.mark.parametrize(
    ("where", "doc"),
    [(where, doc) for where, doc in DOC_BLOCKS if kind_of(doc) in {"config", "jobs", "provider"}],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_doc_config_snippet_is_valid(where: str, doc: Any) -> None:
    data = {"jobs": doc} if kind_of(doc) == "jobs" else doc
    if kind_of(doc) == "provider":  # a provider section alone (the worked examples)
        sink = {"kind": "file", "path": "/run/refresher/example.token"}
        data = {"jobs": [{"name": "example", **doc, "sinks": [sink]}]}
    settings = load_settings(data=data, check_files=False)
    if kind_of(doc) == "jobs":
        assert [j.name for j in settings.jobs] == [j["name"] for j in doc]


@pytest.mark.parametrize(
    ("where", "doc"),
    [(where, doc) for where, doc in DOC_BLOCKS if kind_of(doc) == "chart-values"],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_doc_chart_values_render_a_valid_config(
    chart: helm.Chart, where: str, doc: Any, tmp_path: Path
) -> None:
    values = {"credentials": {"existingSecret": "partner-creds"}, **doc}
    result = check_no_files(rendered_config(chart, values, tmp_path))
    assert result.returncode == 0, result.stderr


def test_check_no_files_would_catch_a_broken_example(tmp_path: Path) -> None:
    """The negative control: the same pipeline refuses a broken copy of the example."""
    broken = tmp_path / "refresher.yaml"
    broken.write_text(SYSTEMD_EXAMPLE.read_text().replace("mode: managed", "mode: sandbox"))
    result = check_no_files(broken)
    assert result.returncode == 2
    assert "mode sandbox needs client_id" in result.stderr
