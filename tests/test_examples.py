"""Every config the project ships passes `refresher check --no-files`.

* systemd/refresher.yaml.example, through the real command line;
* every values file in helm/refresher/examples/: the chart's ConfigMap is rendered by the
  real Helm engine (as tests/test_helm_chart.py does) and its config.yaml checked;
* every ```yaml block in README.md that is a refresher config (a whole file, a section
  of one, or a list of jobs), and every one that is chart values (`config:` inside).

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
README = ROOT / "README.md"


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


# ---------------------------------------------------------------------------- README snippets

_FENCE = re.compile(r"^```yaml\n(?P<body>.*?)^```", re.S | re.M)


def readme_yaml_blocks() -> list[tuple[int, Any]]:
    """(line number, parsed YAML) of every ```yaml block in README.md."""
    text = README.read_text()
    return [
        (text[: m.start()].count("\n") + 1, yaml.safe_load(m["body"]))
        for m in _FENCE.finditer(text)
    ]


def kind_of(doc: Any) -> str:
    """What a README yaml block is; "unknown" fails the test (classify new shapes here)."""
    sections = set(Settings.model_fields)
    if isinstance(doc, dict):
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


README_BLOCKS = readme_yaml_blocks()


def test_every_readme_yaml_block_is_classified() -> None:
    unknown = [line for line, doc in README_BLOCKS if kind_of(doc) == "unknown"]
    assert unknown == [], f"README.md yaml blocks at lines {unknown}: teach kind_of() about them"
    found = [kind_of(doc) for _, doc in README_BLOCKS]
    # What the README is known to hold, so a change in classification shows up.
    assert found.count("config") >= 2
    assert found.count("jobs") >= 3
    assert found.count("chart-values") >= 1


@pytest.mark.parametrize(
    ("line", "doc"),
    [(line, doc) for line, doc in README_BLOCKS if kind_of(doc) in {"config", "jobs"}],
    ids=lambda v: f"README.md:{v}" if isinstance(v, int) else "",
)
def test_readme_config_snippet_is_valid(line: int, doc: Any) -> None:
    data = {"jobs": doc} if kind_of(doc) == "jobs" else doc
    settings = load_settings(data=data, check_files=False)
    if kind_of(doc) == "jobs":
        assert [j.name for j in settings.jobs] == [j["name"] for j in doc]


@pytest.mark.parametrize(
    ("line", "doc"),
    [(line, doc) for line, doc in README_BLOCKS if kind_of(doc) == "chart-values"],
    ids=lambda v: f"README.md:{v}" if isinstance(v, int) else "",
)
def test_readme_chart_values_render_a_valid_config(
    chart: helm.Chart, line: int, doc: Any, tmp_path: Path
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
