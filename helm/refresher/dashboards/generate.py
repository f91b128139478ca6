#!/usr/bin/env python3
"""Generate the refresher Grafana dashboard with grafana-foundation-sdk.

    python helm/refresher/dashboards/generate.py           # (re)write refresher.json
    python helm/refresher/dashboards/generate.py --check   # exit 1 if refresher.json is stale

The output is deterministic (sorted keys, two-space indent, trailing newline), so the
committed refresher.json must always equal `render()`; tests/test_dashboard.py checks that.

The daemon's series name the token job `token_job`; `job` is always the scrape job.
`promql_expressions()` returns every panel query with the dashboard variables replaced by
match-all values, for running them against a real Prometheus in tests.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_model

OUTPUT = Path(__file__).resolve().with_name("refresher.json")

UID = "refresher-overview"
TITLE = "Refresher"
RUNBOOKS_URL = "https://github.com/refresher-dev/refresher/blob/main/docs/runbooks.md"

DATASOURCE = dashboard_model.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label matchers shared by the panel queries.
TOKEN_JOB = 'namespace=~"$namespace", token_job=~"$token_job"'
# Series about the whole process (is_leader, build_info, ...) carry no token_job: only the
# namespace filter applies.
PROCESS = 'namespace=~"$namespace"'
# Failures no retry fixes (RefresherCredentialInvalid); refresher_scope_missing joins them.
UNFIXABLE_REASONS = "invalid_link|unauthorized|tenant_mismatch"

# What promql_expressions() substitutes for the dashboard and Grafana built-in variables.
MATCH_ALL = {
    "namespace": ".*",
    "token_job": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}

PANEL_HEIGHT = 8


def _query(expr: str, legend: str, ref_id: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id).range()


def _queries(*targets: tuple[str, str]) -> list[prometheus.Dataquery]:
    return [
        _query(expr, legend, chr(ord("A") + index)) for index, (expr, legend) in enumerate(targets)
    ]


def _thresholds(*steps: tuple[float | None, str]) -> dashboard_builder.ThresholdsConfig:
    return (
        dashboard_builder.ThresholdsConfig()
        .mode(dashboard_model.ThresholdsMode.ABSOLUTE)
        .steps([dashboard_model.Threshold(value=value, color=color) for value, color in steps])
    )


def _value_text(mapping: dict[str, tuple[str, str]]) -> list[dashboard_model.ValueMapping]:
    return [
        dashboard_model.ValueMap(
            options={
                value: dashboard_model.ValueMappingResult(text=text, color=color, index=index)
                for index, (value, (text, color)) in enumerate(sorted(mapping.items()))
            }
        )
    ]


def _timeseries(
    panel_id: int,
    title: str,
    description: str,
    targets: list[prometheus.Dataquery],
    *,
    unit: str,
    width: int,
) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .id(panel_id)
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(targets)
        .unit(unit)
        .span(width)
        .height(PANEL_HEIGHT)
        .line_width(1)
        .fill_opacity(10)
        .legend(
            common_builder.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(
            common_builder.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )


def _stat(
    panel_id: int,
    title: str,
    description: str,
    targets: list[prometheus.Dataquery],
    *,
    width: int,
) -> stat.Panel:
    return (
        stat.Panel()
        .id(panel_id)
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(targets)
        .span(width)
        .height(PANEL_HEIGHT)
        .reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .justify_mode(common.BigValueJustifyMode.AUTO)
        .orientation(common.VizOrientation.AUTO)
    )


def _variable(name: str, label: str, query: str) -> dashboard_builder.QueryVariable:
    return (
        dashboard_builder.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(dashboard_model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        # ".*" also matches series without the label (e.g. no `namespace` on a VM)
        .all_value(".*")
        .current(dashboard_model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


def build() -> dashboard_model.Dashboard:
    """The dashboard model. Panel ids are fixed so links to panels stay valid."""
    per_hour = "3600 * sum by (token_job, {by}) (rate({metric}{{{sel}}}[$__rate_interval]))"

    def quantile(q: str, metric: str, by: str) -> str:
        return (
            f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{{{TOKEN_JOB}}}[$__rate_interval])))"
        )

    builder = (
        dashboard_builder.Dashboard(TITLE)
        .uid(UID)
        .description(
            "Token refresher: token validity and expiry, refreshes and failures, "
            "rate limiting, latency, sinks, leader election, and the errors that need a "
            "human (internal errors, refused tenants, invalid credentials)."
        )
        .tags(["refresher", "tokens"])
        .time("now-6h", "now")
        .refresh("1m")
        .timezone("browser")
        .tooltip(dashboard_model.DashboardCursorSync.CROSSHAIR)
        .link(
            dashboard_builder.DashboardLink("Alerts and runbooks")
            .type(dashboard_model.DashboardLinkType.LINK)
            .url(RUNBOOKS_URL)
            .icon("doc")
            .target_blank(True)
        )
        .with_variable(
            dashboard_builder.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
        )
        .with_variable(
            _variable("namespace", "Namespace", "label_values(refresher_build_info, namespace)")
        )
        .with_variable(
            _variable(
                "token_job",
                "Token job",
                'label_values(refresher_token_valid{namespace=~"$namespace"}, token_job)',
            )
        )
        # ------------------------------------------------------------------ tokens
        .with_row(dashboard_builder.Row("Tokens").id(1))
        .with_panel(
            _stat(
                2,
                "Tokens valid",
                "Whether each token job currently holds a valid token (refresher_token_valid).",
                _queries(
                    (
                        f"max by (token_job, provider) (refresher_token_valid{{{TOKEN_JOB}}})",
                        "{{token_job}}",
                    )
                ),
                width=8,
            )
            .mappings(_value_text({"0": ("expired", "red"), "1": ("valid", "green")}))
            .thresholds(_thresholds((None, "red"), (1, "green")))
        )
        .with_panel(
            _stat(
                3,
                "Tenants valid",
                "Per-tenant jobs: tenants holding a valid token, and tenants configured.",
                _queries(
                    (
                        f"max by (token_job) (refresher_tenants_valid{{{TOKEN_JOB}}})",
                        "{{token_job}} valid",
                    ),
                    (
                        f"max by (token_job) (refresher_tenants_configured{{{TOKEN_JOB}}})",
                        "{{token_job}} total",
                    ),
                ),
                width=6,
            ).thresholds(_thresholds((None, "blue")))
        )
        .with_panel(
            _timeseries(
                4,
                "Time to expiry",
                "Seconds until each job's current token expires; alert below 5 minutes.",
                _queries(
                    (
                        "max by (token_job, provider) "
                        f"(refresher_token_expiry_timestamp_seconds{{{TOKEN_JOB}}}) - time()",
                        "{{token_job}}",
                    )
                ),
                unit="s",
                width=10,
            ).thresholds(_thresholds((None, "red"), (300, "green")))
        )
        # ------------------------------------------------------------------ refreshes
        .with_row(dashboard_builder.Row("Refreshes").id(5))
        .with_panel(
            _timeseries(
                6,
                "Refresh rate by result",
                "Refresh attempts per hour, split into success and failure.",
                _queries(
                    (
                        per_hour.format(
                            by="result", metric="refresher_refresh_total", sel=TOKEN_JOB
                        ),
                        "{{token_job}} {{result}}",
                    )
                ),
                unit="short",
                width=12,
            )
        )
        .with_panel(
            _timeseries(
                7,
                "Refresh failures by reason",
                "Failed refreshes per hour by reason (transport, timeout, server_error, "
                "rate_limited, unauthorized, forbidden, bad_response, invalid_link, "
                "tenant_mismatch, scope_missing, sink, config, internal).",
                _queries(
                    (
                        per_hour.format(
                            by="reason", metric="refresher_refresh_failures_total", sel=TOKEN_JOB
                        ),
                        "{{token_job}} {{reason}}",
                    )
                ),
                unit="short",
                width=12,
            )
        )
        # ------------------------------------------------------------------ rate limits
        .with_row(dashboard_builder.Row("Rate limiting and backoff").id(8))
        .with_panel(
            _timeseries(
                9,
                "HTTP 429 responses",
                "Rate-limited responses from the provider, per hour.",
                _queries(
                    (
                        per_hour.format(
                            by="provider", metric="refresher_rate_limited_total", sel=TOKEN_JOB
                        ),
                        "{{token_job}}",
                    )
                ),
                unit="short",
                width=8,
            )
        )
        .with_panel(
            _timeseries(
                10,
                "Current backoff",
                "How long each job is currently waiting before its next attempt.",
                _queries(
                    (
                        f"max by (token_job, provider) (refresher_backoff_seconds{{{TOKEN_JOB}}})",
                        "{{token_job}}",
                    )
                ),
                unit="s",
                width=8,
            )
        )
        .with_panel(
            _timeseries(
                11,
                "Retry-After p95",
                "95th percentile of the Retry-After the providers asked for.",
                _queries(
                    (
                        quantile("0.95", "refresher_retry_after_seconds", "token_job, provider"),
                        "{{token_job}}",
                    )
                ),
                unit="s",
                width=8,
            )
        )
        # ------------------------------------------------------------------ latency
        .with_row(dashboard_builder.Row("Latency").id(12))
        .with_panel(
            _timeseries(
                13,
                "Refresh latency",
                "Provider round trip of a refresh: p50, p95 and p99 per job.",
                _queries(
                    *(
                        (
                            quantile(q, "refresher_refresh_duration_seconds", "token_job"),
                            f"{name} {{{{token_job}}}}",
                        )
                        for q, name in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))
                    )
                ),
                unit="s",
                width=12,
            )
        )
        .with_panel(
            _timeseries(
                14,
                "Sink write latency p95",
                "95th percentile of writing a token to each sink (file, kubernetes).",
                _queries(
                    (
                        quantile(
                            "0.95", "refresher_sink_write_duration_seconds", "token_job, sink"
                        ),
                        "{{token_job}} {{sink}}",
                    )
                ),
                unit="s",
                width=12,
            )
        )
        # ------------------------------------------------------------------ sinks, leader
        .with_row(dashboard_builder.Row("Sinks and leader election").id(15))
        .with_panel(
            _timeseries(
                16,
                "Sink write failures",
                "Failed sink writes per hour, per job and sink.",
                _queries(
                    (
                        per_hour.format(
                            by="sink", metric="refresher_sink_failures_total", sel=TOKEN_JOB
                        ),
                        "{{token_job}} {{sink}}",
                    )
                ),
                unit="short",
                width=12,
            )
        )
        .with_panel(
            _stat(
                17,
                "Leader",
                "Which replica holds the Lease (only meaningful with leader election enabled).",
                _queries(
                    (
                        f"max by (namespace, instance) (refresher_is_leader{{{PROCESS}}})",
                        "{{namespace}} {{instance}}",
                    )
                ),
                width=4,
            )
            .mappings(_value_text({"0": ("standby", "blue"), "1": ("leader", "green")}))
            .thresholds(_thresholds((None, "blue"), (1, "green")))
        )
        .with_panel(
            _stat(
                18,
                "Config reload failures",
                "Failed config reloads (SIGHUP) in the selected time range.",
                _queries(
                    (
                        "sum(increase(refresher_config_reload_failures_total"
                        f"{{{PROCESS}}}[$__range]))",
                        "reload failures",
                    )
                ),
                width=4,
            ).thresholds(_thresholds((None, "green"), (1, "orange")))
        )
        .with_panel(
            _stat(
                19,
                "Versions",
                "Running refresher processes per version (refresher_build_info).",
                _queries(
                    (f"count by (version) (refresher_build_info{{{PROCESS}}})", "{{version}}")
                ),
                width=4,
            ).thresholds(_thresholds((None, "blue")))
        )
        # ------------------------------------------------------------------ needs a human
        .with_row(dashboard_builder.Row("Errors that need a human").id(20))
        .with_panel(
            _timeseries(
                21,
                "Internal errors",
                "Unexpected errors (bugs) caught at a job's boundary, per hour and component; "
                "the job retries. Alert: RefresherInternalError.",
                _queries(
                    (
                        "3600 * sum by (namespace, instance, component) "
                        f"(rate(refresher_internal_errors_total{{{PROCESS}}}[$__rate_interval]))",
                        "{{instance}} {{component}}",
                    )
                ),
                unit="short",
                width=8,
            )
        )
        .with_panel(
            _stat(
                22,
                "Tenants refused",
                "Lines of each job's tenants_file refused at its last read (bad tenant id, "
                "colliding or escaping target). Alert: RefresherTenantsRejected.",
                _queries(
                    (
                        f"max by (token_job) (refresher_tenants_rejected{{{TOKEN_JOB}}})",
                        "{{token_job}}",
                    )
                ),
                width=6,
            ).thresholds(_thresholds((None, "green"), (1, "red")))
        )
        .with_panel(
            _timeseries(
                23,
                "Invalid credentials, links and scopes",
                "Failures no retry fixes (invalid_link, unauthorized, tenant_mismatch) "
                "in the selected range, and jobs whose token lacks a required scope. "
                "Alert: RefresherCredentialInvalid.",
                _queries(
                    (
                        "sum by (token_job, reason) (increase(refresher_refresh_failures_total"
                        f'{{{TOKEN_JOB}, reason=~"{UNFIXABLE_REASONS}"}}[$__range]))',
                        "{{token_job}} {{reason}}",
                    ),
                    (
                        f"max by (token_job) (refresher_scope_missing{{{TOKEN_JOB}}})",
                        "{{token_job}} scope_missing",
                    ),
                ),
                unit="short",
                width=10,
            )
        )
    )
    return builder.build()


def to_dict() -> dict[str, Any]:
    """The dashboard as plain JSON data."""
    data: dict[str, Any] = json.loads(json.dumps(build(), cls=JSONEncoder))
    return data


def render() -> str:
    """The exact text of refresher.json."""
    return json.dumps(to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def iter_panels(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every non-row panel, including panels nested in collapsed rows."""
    for panel in data.get("panels") or []:
        if panel.get("type") == "row":
            yield from panel.get("panels") or []
        else:
            yield panel


_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def substitute_match_all(expr: str) -> str:
    """Replace dashboard/Grafana variables in a query with match-all values (MATCH_ALL)."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in MATCH_ALL:
            raise ValueError(f"no match-all value for ${name} in {expr!r}")
        return MATCH_ALL[name]

    return _VARIABLE.sub(replace, expr)


def promql_expressions() -> list[str]:
    """Every panel query, variables replaced by match-all values, in panel order."""
    return [
        substitute_match_all(target["expr"])
        for panel in iter_panels(to_dict())
        for target in panel.get("targets") or []
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
