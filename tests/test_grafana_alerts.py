"""Grafana-managed alert rules: helm/refresher/files/grafana-alerts.yaml and its generator.

Grafana cannot run here, so the file is held to what Grafana would check:

* it is exactly the generator's output, and says the same as files/alerts.yaml (same alerts,
  PromQL, `for:`, labels, annotations): the two cannot drift;
* every rule parses with grafana-foundation-sdk's alerting types and serialises back to the
  same JSON (no field the SDK does not know), each query model is a known SDK variant, and
  every `Literal` field holds one of its allowed values;
* the file-provisioning envelope has exactly Grafana's fields (AlertRuleGroupV1 in
  pkg/services/provisioning/alerting/rules_types.go), refIds resolve, and no value Grafana
  interpolates contains a `$` it would eat;
* the PromQL parses (promtool). tests/test_prometheus_e2e.py runs each query against a real
  Prometheus after injecting the failure it alerts on.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.builders import alerting as alerting_builder
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import alerting, expr, prometheus

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "refresher"
GENERATOR = CHART / "alerting" / "generate.py"
COMMITTED = CHART / "files" / "grafana-alerts.yaml"
PROMETHEUS_RULES = CHART / "files" / "alerts.yaml"

#: Grafana's file-provisioning group and rule fields (AlertRuleGroupV1, AlertRuleV1, QueryV1).
GROUP_FIELDS = {"orgId", "name", "folder", "interval", "rules"}
RULE_FIELDS = {
    "uid", "title", "condition", "data", "dashboardUid", "panelId", "noDataState",
    "execErrState", "for", "keepFiringFor", "annotations", "labels", "isPaused",
    "notification_settings", "record",
}  # fmt: skip
QUERY_FIELDS = {"refId", "queryType", "relativeTimeRange", "datasourceUid", "model"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def load_generator() -> ModuleType:
    """Import generate.py by path (helm/ is not a package) without leaving bytecode."""
    spec = importlib.util.spec_from_file_location("refresher_grafana_alerts", GENERATOR)
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
def document() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMMITTED.read_text())
    return data


def rules_of(document: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(group, rule) for group in document["groups"] for rule in group["rules"]]


def prometheus_alerts() -> dict[str, dict[str, Any]]:
    source = yaml.safe_load(PROMETHEUS_RULES.read_text())
    return {r["alert"]: r for g in source["groups"] for r in g["rules"] if "alert" in r}


# ------------------------------------------------------------------------------ one source


def test_committed_file_is_the_generator_output(generator: ModuleType) -> None:
    assert COMMITTED.read_text() == generator.render(), (
        "files/grafana-alerts.yaml is stale: run python helm/refresher/alerting/generate.py"
    )


def test_generator_check_mode(generator: ModuleType, tmp_path: Path) -> None:
    target = tmp_path / "grafana-alerts.yaml"
    assert generator.main(["--check", "--output", str(target)]) == 1
    assert generator.main(["--output", str(target)]) == 0
    assert target.read_text() == COMMITTED.read_text()
    assert generator.main(["--check", "--output", str(target)]) == 0
    target.write_text(target.read_text().replace("for: 5m", "for: 1m", 1))
    assert generator.main(["--check", "--output", str(target)]) == 1


def test_same_alerts_as_the_prometheus_rules(document: dict[str, Any]) -> None:
    """Read independently of the generator: a hand edit of either file is a failure."""
    alerts = prometheus_alerts()
    rules = {rule["title"]: rule for _, rule in rules_of(document)}
    assert list(rules) == list(alerts)
    for name, rule in rules.items():
        source = alerts[name]
        [query] = [q for q in rule["data"] if q["refId"] == "A"]
        assert query["model"]["expr"] == source["expr"].strip(), name
        assert rule["for"] == source["for"], name
        assert rule["labels"] == source["labels"], name
        assert set(rule["annotations"]) == set(source["annotations"]), name
        for key, text in source["annotations"].items():
            assert rule["annotations"][key] == text.replace("$value", "$values.A.Value"), key
        assert "$value " not in json.dumps(rule["annotations"]), "Grafana's $value is a string"


def test_generator_refuses_what_it_cannot_convert(generator: ModuleType, tmp_path: Path) -> None:
    recording = tmp_path / "recording.yaml"
    recording.write_text("groups: [{name: g, rules: [{record: x:y, expr: up}]}]\n")
    with pytest.raises(ValueError, match="only alerting rules"):
        generator.render(recording)
    empty = tmp_path / "empty.yaml"
    empty.write_text("groups: []\n")
    with pytest.raises(ValueError, match="no groups"):
        generator.render(empty)
    with pytest.raises(ValueError, match="not a valid Grafana uid"):
        generator.uid_of("Refresher" + "VeryLong" * 6)


def test_uid_of(generator: ModuleType) -> None:
    assert generator.uid_of("RefresherDown") == "refresher-down"
    assert generator.uid_of("RefresherTokenExpiringSoon") == "refresher-token-expiring-soon"


# ------------------------------------------------------------------------------ Grafana's schema


def test_provisioning_envelope(document: dict[str, Any]) -> None:
    assert set(document) == {"apiVersion", "groups"} and document["apiVersion"] == 1
    uids: list[str] = []
    for group in document["groups"]:
        assert set(group) == GROUP_FIELDS, group.keys()
        assert group["orgId"] == 1 and group["name"].strip() and group["folder"].strip()
        assert DURATION.match(group["interval"]), group["interval"]
        for rule in group["rules"]:
            assert set(rule) <= RULE_FIELDS, set(rule) - RULE_FIELDS
            assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", rule["uid"]), rule["uid"]
            assert DURATION.match(rule["for"]), rule["for"]
            uids.append(rule["uid"])
            refs = [q["refId"] for q in rule["data"]]
            assert len(set(refs)) == len(refs) and rule["condition"] in refs
            for query in rule["data"]:
                assert set(query) <= QUERY_FIELDS, set(query) - QUERY_FIELDS
                model = query["model"]
                assert model["refId"] == query["refId"]
                assert model["datasource"]["uid"] == query["datasourceUid"]
                if query["datasourceUid"] == "__expr__":
                    # Math refers to queries as $A, threshold/reduce by plain refId.
                    used = set(re.findall(r"\$(\w+)", model.get("expression", "")))
                    if model["type"] != "math":
                        used = {model["expression"]}
                    assert used and used <= set(refs) - {query["refId"]}, (rule["title"], used)
                else:
                    assert model["instant"] is True and model.get("range") is False
                    assert query["relativeTimeRange"]["from"] > 0
    assert len(set(uids)) == len(uids)


def test_nothing_grafana_interpolates_holds_a_dollar(document: dict[str, Any]) -> None:
    """Grafana expands environment variables ($VAR) in provisioned labels, uids and data
    source uids, and ${VAR} in annotations: a `$` there would silently vanish."""
    for group, rule in rules_of(document):
        for value in (group["name"], group["folder"], rule["uid"], rule["title"]):
            assert "$" not in value, value
        assert "$" not in json.dumps(rule["labels"]), rule["labels"]
        assert "${" not in json.dumps(rule["annotations"]), rule["title"]
        assert all("$" not in q["datasourceUid"] for q in rule["data"])


def _literal_violations(obj: Any, where: str) -> list[str]:
    """Fields of SDK model objects whose type is a `Literal` but whose value is not one of
    its members, recursively."""
    if isinstance(obj, list):
        return [v for i, item in enumerate(obj) for v in _literal_violations(item, f"{where}[{i}]")]
    module = getattr(type(obj), "__module__", "")
    if not module.startswith("grafana_foundation_sdk.models"):
        return []
    hints = typing.get_type_hints(type(obj))
    found: list[str] = []
    for name, hint in hints.items():
        value = getattr(obj, name, None)
        if value is None:
            continue
        options = [hint, *typing.get_args(hint)] if _is_union(hint) else [hint]
        literals = [o for o in options if typing.get_origin(o) is typing.Literal]
        if literals and not any(value in typing.get_args(lit) for lit in literals):
            found.append(f"{where}.{name}={value!r}")
        found.extend(_literal_violations(value, f"{where}.{name}"))
    return found


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def test_every_rule_matches_the_sdk_types(document: dict[str, Any]) -> None:
    register_default_plugins()
    for group, rule in rules_of(document):
        api = {**rule, "folderUID": group["folder"], "ruleGroup": group["name"], "orgID": 1}
        parsed = alerting.Rule.from_json(api)
        # The SDK drops what it does not know: a round trip that loses nothing means every
        # field, at every depth, is one the SDK (Grafana's API schema) defines.
        again = json.loads(json.dumps(parsed, cls=JSONEncoder))
        assert again == api, rule["title"]
        kinds = [type(q.model) for q in parsed.data]
        assert kinds == [prometheus.Dataquery, expr.TypeMath, expr.TypeThreshold], kinds
        assert not any(isinstance(q.model, cogruntime.UnknownDataquery) for q in parsed.data)
        assert _literal_violations(parsed, rule["title"]) == []
        # The builders' own constraints (title and group length).
        alerting_builder.Rule(rule["title"]).rule_group(group["name"]).build()


def test_literal_check_catches_a_bad_value(document: dict[str, Any]) -> None:
    register_default_plugins()
    group, rule = rules_of(document)[0]
    bad = json.loads(json.dumps(rule))
    bad["noDataState"] = "Sometimes"
    bad["data"][2]["model"]["conditions"][0]["evaluator"]["type"] = "bigger"
    parsed = alerting.Rule.from_json({**bad, "folderUID": "f", "ruleGroup": "g", "orgID": 1})
    violations = _literal_violations(parsed, "rule")
    assert any("no_data_state='Sometimes'" in v for v in violations), violations
    assert any("type_val='bigger'" in v for v in violations), violations


def test_round_trip_catches_an_unknown_field(document: dict[str, Any]) -> None:
    register_default_plugins()
    group, rule = rules_of(document)[0]
    api = {**rule, "folderUID": "f", "ruleGroup": "g", "orgID": 1, "forr": "5m"}
    assert json.loads(json.dumps(alerting.Rule.from_json(api), cls=JSONEncoder)) != api


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH")
def test_every_query_parses(document: dict[str, Any], tmp_path: Path) -> None:
    exprs = [
        q["model"]["expr"] for _, r in rules_of(document) for q in r["data"] if "expr" in q["model"]
    ]
    rules = {
        "groups": [
            {
                "name": "grafana",
                "rules": [{"record": f"grafana:query_{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run(
        ["promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout
