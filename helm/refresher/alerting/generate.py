#!/usr/bin/env python3
"""Generate Grafana-managed alert rules from the Prometheus rules, so the two cannot drift.

    python helm/refresher/alerting/generate.py           # (re)write files/grafana-alerts.yaml
    python helm/refresher/alerting/generate.py --check   # exit 1 if it is stale

The one source is files/alerts.yaml, the Prometheus rule file that promtool unit-tests.
Each alerting rule becomes one Grafana rule, built with grafana-foundation-sdk's alerting
types and written in Grafana's file-provisioning format (``apiVersion: 1``, ``groups:``),
the way Grafana's own Prometheus-rule import converts them:

  A  the rule's PromQL, an instant query against the Prometheus data source;
  B  math ``is_number($A) || is_nan($A) || is_inf($A)``: 1 for every series A returns,
     whatever its value (a series present means firing, as in Prometheus);
  C  threshold ``B > 0``, the rule's condition.

``for``, labels and annotations are copied; ``noDataState: OK`` (no series, nothing to
alert on, as in Prometheus) and ``execErrState: Error``. In annotations ``$value`` becomes
``$values.A.Value``: Grafana's ``$value`` is a string of every query's values.

Every query reads the Prometheus data source with uid ``prometheus`` (kube-prometheus-stack's
default); the chart's `grafanaAlerts.datasourceUid` replaces it. The output is deterministic,
so tests/test_grafana_alerts.py checks the committed file is `render()`'s output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import alerting, expr, prometheus
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import alerting as alerting_model
from grafana_foundation_sdk.models import dashboard as dashboard_model

CHART = Path(__file__).resolve().parent.parent
SOURCE = CHART / "files" / "alerts.yaml"
OUTPUT = CHART / "files" / "grafana-alerts.yaml"

DATASOURCE_UID = "prometheus"
EXPRESSION_UID = "__expr__"  # Grafana's server-side expressions
FOLDER = "Refresher"
ORG_ID = 1
INTERVAL = "1m"  # Prometheus's default evaluation interval, which the `for:` values assume
#: Look-back of the instant query; the PromQL carries its own ranges.
QUERY_RANGE_SECONDS = 600
QUERY, PRESENT, CONDITION = "A", "B", "C"

HEADER = """\
# Grafana-managed alert rules for refresher (Grafana file provisioning, apiVersion 1).
#
# GENERATED from files/alerts.yaml by alerting/generate.py: do not edit, regenerate.
# Same alerts, expressions, `for:`, labels and annotations as the Prometheus rules; query A is
# the rule's PromQL, B turns each series A returns into 1, C (the condition) fires on B > 0.
#
# Load it from Grafana's provisioning directory (provisioning/alerting/), or let the chart's
# ConfigMap (grafanaAlerts.enabled) reach the Grafana sidecar. Every query reads the Prometheus
# data source with uid "prometheus": edit `datasourceUid` (and model.datasource.uid) if yours
# differs; the chart does it for you (grafanaAlerts.datasourceUid). RefresherDown selects the
# scrape job with up{job="refresher"}, as in alerts.yaml: the one selector to edit.
"""


def uid_of(alert: str) -> str:
    """A stable Grafana uid of at most 40 characters (RefresherTokenExpired ->
    refresher-token-expired)."""
    words = re.findall(r"[A-Z][a-z0-9]*", alert.removeprefix("Refresher"))
    uid = "-".join(["refresher", *(w.lower() for w in words)])
    if len(uid) > 40 or not re.fullmatch(r"[a-z0-9-]+", uid):
        raise ValueError(f"alert {alert!r}: uid {uid!r} is not a valid Grafana uid")
    return uid


def grafana_template(text: str) -> str:
    """A Prometheus alert template as a Grafana one (`$value` is query A's value)."""
    return re.sub(r"\$value\b(?!s)", f"$values.{QUERY}.Value", text)


def _datasource(uid: str, kind: str) -> dashboard_model.DataSourceRef:
    return dashboard_model.DataSourceRef(type_val=kind, uid=uid)


def build_rule(rule: dict[str, Any], group: str) -> alerting.Rule:
    """One Prometheus alerting rule as a Grafana rule (SDK builder)."""
    name = rule.get("alert")
    if not name:
        raise ValueError(f"group {group!r}: only alerting rules are converted, got {rule!r}")
    query = (
        alerting.Query(QUERY)
        .datasource_uid(DATASOURCE_UID)
        .relative_time_range(alerting_model.RelativeTimeRange(from_val=QUERY_RANGE_SECONDS, to=0))
        .model(
            prometheus.Dataquery()
            .datasource(_datasource(DATASOURCE_UID, "prometheus"))
            .expr(rule["expr"].strip())
            .instant()
            .ref_id(QUERY)
        )
    )
    present = (
        alerting.Query(PRESENT)
        .datasource_uid(EXPRESSION_UID)
        .model(
            expr.TypeMath()
            .datasource(_datasource(EXPRESSION_UID, EXPRESSION_UID))
            .expression(f"is_number(${QUERY}) || is_nan(${QUERY}) || is_inf(${QUERY})")
            .ref_id(PRESENT)
        )
    )
    condition = (
        alerting.Query(CONDITION)
        .datasource_uid(EXPRESSION_UID)
        .model(
            expr.TypeThreshold()
            .datasource(_datasource(EXPRESSION_UID, EXPRESSION_UID))
            .expression(PRESENT)
            .conditions(
                [
                    expr.ExprTypeThresholdConditions().evaluator(
                        expr.ExprTypeThresholdConditionsEvaluator().type("gt").params([0])
                    )
                ]
            )
            .ref_id(CONDITION)
        )
    )
    return (
        alerting.Rule(name)
        .uid(uid_of(name))
        .rule_group(group)
        .org_id(ORG_ID)
        .folder_uid(FOLDER)  # the API's fields; file provisioning names the folder per group
        .queries([query, present, condition])
        .condition(CONDITION)
        .no_data_state("OK")
        .exec_err_state("Error")
        .for_val(str(rule.get("for", "0s")))
        .labels({k: str(v) for k, v in (rule.get("labels") or {}).items()})
        .annotations(
            {k: grafana_template(str(v)) for k, v in (rule.get("annotations") or {}).items()}
        )
        .is_paused(False)
    )


#: SDK `Rule` JSON keys that file provisioning keeps on the group (or does not have).
GROUP_LEVEL = ("folderUID", "ruleGroup", "orgID")
#: Rule keys in the order they are written.
RULE_KEYS = (
    "uid",
    "title",
    "condition",
    "data",
    "noDataState",
    "execErrState",
    "for",
    "labels",
    "annotations",
    "isPaused",
)
QUERY_KEYS = ("refId", "relativeTimeRange", "datasourceUid", "queryType", "model")


def provisioning_rule(rule: alerting.Rule) -> dict[str, Any]:
    """The SDK rule as a rule of a file-provisioning group."""
    data: dict[str, Any] = json.loads(json.dumps(rule.build(), cls=JSONEncoder))
    unknown = set(data) - set(RULE_KEYS) - set(GROUP_LEVEL)
    if unknown:
        raise ValueError(f"rule {data.get('title')!r}: no provisioning field for {sorted(unknown)}")
    data["data"] = [{key: q[key] for key in QUERY_KEYS if key in q} for q in data["data"]]
    return {key: data[key] for key in RULE_KEYS if key in data}


def to_document(source: dict[str, Any]) -> dict[str, Any]:
    """The provisioning document for a parsed Prometheus rule file."""
    groups = []
    for group in source.get("groups") or []:
        rules = [provisioning_rule(build_rule(rule, group["name"])) for rule in group["rules"]]
        groups.append(
            {
                "orgId": ORG_ID,
                "name": group["name"],
                "folder": FOLDER,
                "interval": INTERVAL,
                "rules": rules,
            }
        )
    if not groups:
        raise ValueError("the Prometheus rule file has no groups")
    return {"apiVersion": 1, "groups": groups}


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line strings, so PromQL reads as in alerts.yaml."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(source: Path = SOURCE) -> str:
    """The exact text of files/grafana-alerts.yaml."""
    document = to_document(yaml.safe_load(source.read_text()))
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
