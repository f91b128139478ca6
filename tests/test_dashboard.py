"""The Grafana dashboard: helm/refresher/dashboards/refresher.json and its generator.

* The committed JSON is exactly what generate.py renders (regenerate after editing it).
* Structure: fixed uid, the expected variables, every panel titled and queried, unique ids.
* promql_expressions() covers every panel query, with no variables left, and every
  expression parses as PromQL (checked by promtool when installed).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "helm" / "refresher" / "dashboards"
GENERATOR = DASHBOARDS / "generate.py"
COMMITTED = DASHBOARDS / "refresher.json"

UID = "refresher-overview"

# Metrics whose panels must be on the dashboard.
REQUIRED_METRICS = (
    "refresher_token_valid",
    "refresher_token_expiry_timestamp_seconds",
    "refresher_refresh_total",
    "refresher_refresh_failures_total",
    "refresher_rate_limited_total",
    "refresher_backoff_seconds",
    "refresher_refresh_duration_seconds_bucket",
    "refresher_sink_failures_total",
    "refresher_is_leader",
    "refresher_internal_errors_total",
    "refresher_tenants_rejected",
    "refresher_scope_missing",
)


def load_generator() -> ModuleType:
    """Import generate.py by path (helm/ is not a package) without leaving bytecode in the chart."""
    spec = importlib.util.spec_from_file_location("refresher_dashboard_generate", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return load_generator()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(COMMITTED.read_text())
    return data


def panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-row panel, also inside collapsed rows (deliberately not generate.py's)."""
    found = []
    for panel in data["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels") or [])
        else:
            found.append(panel)
    return found


def test_committed_json_is_the_generator_output(generator: ModuleType) -> None:
    expected = generator.render()
    assert COMMITTED.read_text() == expected, (
        "helm/refresher/dashboards/refresher.json is stale: "
        "run python helm/refresher/dashboards/generate.py"
    )


def test_generator_is_deterministic(generator: ModuleType) -> None:
    first = generator.render()
    assert generator.render() == first
    assert load_generator().render() == first
    assert first.endswith("}\n")
    assert (
        first == json.dumps(json.loads(first), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    )


def test_generator_check_mode(generator: ModuleType, tmp_path: Path) -> None:
    target = tmp_path / "refresher.json"
    assert generator.main(["--check", "--output", str(target)]) == 1
    assert generator.main(["--output", str(target)]) == 0
    assert target.read_text() == COMMITTED.read_text()
    assert generator.main(["--check", "--output", str(target)]) == 0
    target.write_text(target.read_text().replace(UID, "something-else"))
    assert generator.main(["--check", "--output", str(target)]) == 1


def test_uid_and_title(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == UID
    assert dashboard["title"] == "Refresher"
    assert "id" not in dashboard, "a numeric id breaks importing into another Grafana"


def test_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "token_job"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "token_job"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variable["includeAll"] is True and variable["allValue"] == ".*"
    assert re.fullmatch(
        r"label_values\(refresher_token_valid(\{[^}]*\})?, token_job\)",
        variables["token_job"]["query"],
    )
    assert variables["namespace"]["query"].endswith(", namespace)")


def test_every_panel_has_a_title_and_a_query(dashboard: dict[str, Any]) -> None:
    found = panels(dashboard)
    assert len(found) >= 10
    for panel in found:
        assert panel.get("title", "").strip(), panel
        targets = panel.get("targets") or []
        assert targets, f"panel {panel['title']!r} has no targets"
        for target in targets:
            assert target["expr"].strip(), panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_panel_ids_unique_and_layout_fits(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    ids += [
        inner["id"]
        for row in dashboard["panels"]
        if row["type"] == "row"
        for inner in row.get("panels") or []
    ]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) and i > 0 for i in ids)
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        assert pos["h"] > 0, panel["title"]


def test_required_metrics_are_shown(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(t["expr"] for p in panels(dashboard) for t in p["targets"])
    missing = [m for m in REQUIRED_METRICS if not re.search(rf"\b{m}\b", exprs)]
    assert missing == []
    for quantile in ("0.5", "0.95", "0.99"):
        assert re.search(
            rf"histogram_quantile\({quantile}, .*refresher_refresh_duration_seconds_bucket", exprs
        ), quantile


def test_token_queries_filter_by_job_and_namespace(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'namespace=~"$namespace"' in expr, expr
            # process-wide series carry no token_job label
            if not re.search(
                r"refresher_(is_leader|build_info|config_reload_failures|internal_errors)", expr
            ):
                assert 'token_job=~"$token_job"' in expr, expr
            # `job` is the scrape job: never a token job filter, grouping or legend
            assert not re.search(r"\bjob\b", expr.replace("token_job", "")), expr
            assert "{{job}}" not in target["legendFormat"], target


def test_promql_expressions(generator: ModuleType, dashboard: dict[str, Any]) -> None:
    exprs = generator.promql_expressions()
    raw = [t["expr"] for p in panels(dashboard) for t in p["targets"]]
    assert len(exprs) == len(raw)
    for expression in exprs:
        assert "$" not in expression, expression
    assert any('token_job=~".*"' in e for e in exprs)
    assert any('namespace=~".*"' in e for e in exprs)
    assert any("[1m]" in e for e in exprs)
    for before, after in zip(raw, exprs, strict=True):
        assert after == (
            before.replace("$namespace", ".*")
            .replace("$token_job", ".*")
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
        )


def test_substitute_match_all(generator: ModuleType) -> None:
    substitute = generator.substitute_match_all
    assert substitute('x{token_job=~"${token_job}"}[$__rate_interval]') == (
        'x{token_job=~".*"}[1m]'
    )
    assert substitute('x{namespace=~"${namespace:regex}"}') == 'x{namespace=~".*"}'
    with pytest.raises(ValueError, match="unknown_var"):
        substitute("x{a=~'$unknown_var'}")


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH")
def test_promql_expressions_parse(generator: ModuleType, tmp_path: Path) -> None:
    """Every panel query is valid PromQL: wrap them as recording rules for `promtool check`."""
    exprs = generator.promql_expressions()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"refresher_dashboard:expr_{i}", "expr": e}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run(
        ["promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout
