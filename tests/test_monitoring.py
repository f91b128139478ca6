"""The alerting rules in helm/refresher/files/alerts.yaml, checked and unit-tested with promtool.

* `promtool check rules` and `promtool test rules tests/monitoring/alerts_test.yaml` must pass.
* Every alert carries severity, summary, description and a runbook_url pointing at its
  heading in docs/runbooks.md (RUNBOOK_HEADINGS below is the list the page must contain;
  tests/test_docs.py checks that the anchors exist in the built site too).
* The promtool tests cover every alert with a firing and a silent case, and they are sharp
  enough to catch deliberately broken copies of the rules (MUTANTS).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from refresher import errors
from refresher.metrics import FAILURE_REASONS, JobSnapshot, Metrics
from tests.conftest import deb_job, get_json, oauth2_job

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "helm" / "refresher" / "files" / "alerts.yaml"
RULE_TESTS = ROOT / "tests" / "monitoring" / "alerts_test.yaml"
DASHBOARD = ROOT / "helm" / "refresher" / "dashboards" / "refresher.json"
PROMTOOL = shutil.which("promtool")


def needs_promtool(test: Any) -> Any:
    """Mark a test as needing promtool; skipped only when promtool is not on PATH."""
    skip = pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (Debian: prometheus)")
    return pytest.mark.prometheus(skip(test))


RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOK_BASE = "https://github.com/refresher-dev/refresher/blob/main/docs/runbooks.md#"

# docs/runbooks.md must contain these headings (any level): the alert's name. GitHub and
# mkdocs both turn "## RefresherDown" into the anchor #refresherdown, which is what each
# alert's runbook_url points at.
RUNBOOK_HEADINGS = {
    name: name
    for name in (
        "RefresherDown",
        "RefresherRefreshFailing",
        "RefresherTokenExpiringSoon",
        "RefresherTokenExpired",
        "RefresherRateLimited",
        "RefresherSinkWriteFailing",
        "RefresherNoLeader",
        "RefresherConfigReloadRejected",
        "RefresherInternalError",
        "RefresherTenantsRejected",
        "RefresherCredentialInvalid",
    )
}

# Alerts about a whole process or deployment: their series carry no token_job/provider labels,
# only target labels (`job` is the scrape job), so their descriptions name the scrape job.
PROCESS_ALERTS = {
    "RefresherDown",
    "RefresherNoLeader",
    "RefresherConfigReloadRejected",
    "RefresherInternalError",
}

# The selector of RefresherDown, the one place the plain rule file names the scrape job.
DOWN_SELECTOR = 'up{job="refresher"}'

# Metrics the rules read that another work stream adds to refresher/metrics.py.
PENDING_METRICS = {"refresher_scope_missing"}

SEVERITIES = {"critical", "warning"}


def github_anchor(heading: str) -> str:
    """The fragment GitHub generates for a Markdown heading (ASCII headings)."""
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@functools.cache
def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules_doc() -> dict[str, Any]:
    """The parsed rules file (a fresh copy: callers may modify it)."""
    return copy.deepcopy(_load_yaml(RULES))


def rule_tests() -> dict[str, Any]:
    """The parsed promtool test file (a fresh copy: callers may modify it)."""
    return copy.deepcopy(_load_yaml(RULE_TESTS))


def load_rules() -> list[dict[str, Any]]:
    return [rule for group in rules_doc()["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for rule in load_rules():
        name = rule["alert"]
        assert name not in found, f"duplicate alert {name}"
        found[name] = rule
    return found


# ------------------------------------------------------------------------------ promtool


@needs_promtool
def test_promtool_check_rules() -> None:
    proc = run("check", "rules", RULES)
    print(output(proc))
    assert proc.returncode == 0, output(proc)
    assert f"SUCCESS: {len(load_rules())} rules found" in proc.stdout, output(proc)


@needs_promtool
def test_promtool_test_rules() -> None:
    proc = run("test", "rules", RULE_TESTS)
    print(output(proc))
    assert proc.returncode == 0, output(proc)
    assert "SUCCESS" in proc.stdout, output(proc)


# ------------------------------------------------------------------------------ metadata


def test_alert_set_matches_runbook_list() -> None:
    assert sorted(alerts()) == sorted(RUNBOOK_HEADINGS)


@pytest.mark.parametrize("name", sorted(RUNBOOK_HEADINGS))
def test_alert_metadata(name: str) -> None:
    rule = alerts()[name]
    assert rule["expr"].strip()
    assert rule.get("for"), f"{name} has no `for:`; every alert here needs one"
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    description = annotations["description"]
    if name in PROCESS_ALERTS:
        assert "{{ $labels.job }}" in description
        assert "token_job" not in rule["expr"] + description
    else:
        assert "{{ $labels.token_job }}" in description
        assert "{{ $labels.provider }}" in description
        assert "$labels.job " not in description, "`job` is the scrape job, not the token job"
    assert annotations["runbook_url"] == RUNBOOK_BASE + github_anchor(RUNBOOK_HEADINGS[name])
    assert annotations["runbook_url"] == RUNBOOK_BASE + name.lower()


def test_runbooks_page_has_every_runbook_heading() -> None:
    headings = {
        line.lstrip("#").strip()
        for line in RUNBOOKS.read_text().splitlines()
        if line.startswith("#")
    }
    assert sorted(set(RUNBOOK_HEADINGS.values()) - headings) == []


def test_down_selector_is_the_one_place_naming_the_scrape_job() -> None:
    """The plain file selects the scrape job in exactly one rule, with one exact selector
    that the header documents and the chart replaces (tests/test_helm_chart.py)."""
    text = RULES.read_text()
    header = text.split("\ngroups:", 1)[0]
    assert f"THE ONE SELECTOR TO EDIT: {DOWN_SELECTOR}" in header
    down = alerts()["RefresherDown"]
    assert down["expr"].count(DOWN_SELECTOR) == 2
    assert down["annotations"]["description"].count(DOWN_SELECTOR) == 1
    for name, rule in alerts().items():
        if name != "RefresherDown":
            assert "up{" not in rule["expr"] and 'job="' not in rule["expr"], name
    assert "job=~" not in text, "no guessing the scrape job by a name pattern"


def test_github_anchor() -> None:
    assert github_anchor("Runbook: RefresherDown") == "runbook-refresherdown"
    assert github_anchor("Load the rules (VM)") == "load-the-rules-vm"


# ------------------------------------------------------------------------------ the tests


def test_rule_tests_load_the_shipped_rules() -> None:
    files = rule_tests()["rule_files"]
    assert [(RULE_TESTS.parent / f).resolve() for f in files] == [RULES.resolve()]


def test_rule_tests_cover_every_alert_both_ways() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for case in rule_tests()["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = set(alerts())
    assert names - firing == set(), "alerts without a firing test case"
    assert names - silent == set(), "alerts without a must-not-fire test case"
    assert (firing | silent) <= names, "tests name alerts that do not exist"


def test_firing_cases_check_labels_and_annotations() -> None:
    for case in rule_tests()["tests"]:
        for check in case.get("alert_rule_test", []):
            for exp in check.get("exp_alerts") or []:
                where = f"{case['name']} @ {check['eval_time']}"
                assert exp["exp_labels"]["severity"] in SEVERITIES, where
                assert set(exp["exp_annotations"]) >= {"summary", "description", "runbook_url"}, (
                    where
                )


@dataclass(frozen=True)
class Mutant:
    """A deliberately broken copy of one alert, and the promtool test case that must catch it."""

    alert: str
    key: str  # "expr" or "for"
    value: str | None  # None: delete the key
    caught_by: str  # name of the test case in alerts_test.yaml


MUTANTS = {
    "refresh-failing-no-for": Mutant(
        "RefresherRefreshFailing",
        "for",
        None,
        "RefresherRefreshFailing stays silent for one transient failure followed by success",
    ),
    "refresh-failing-no-success-guard": Mutant(
        "RefresherRefreshFailing",
        "expr",
        "sum without (reason) (increase(refresher_refresh_failures_total[15m])) > 0",
        "RefresherRefreshFailing stays silent for one transient failure followed by success",
    ),
    # the rule before tenant series: blind to a series born at its first failure
    "refresh-failing-misses-new-series": Mutant(
        "RefresherRefreshFailing",
        "expr",
        "sum without (reason) (increase(refresher_refresh_failures_total[15m])) > 0"
        " unless (time() - refresher_token_last_success_timestamp_seconds) < 900",
        "RefresherRefreshFailing fires on a tenant series born at its first failure",
    ),
    # needs a second failure to see the first
    "refresh-failing-needs-two-failures": Mutant(
        "RefresherRefreshFailing",
        "expr",
        "sum without (reason) (increase(refresher_refresh_failures_total[15m])) > 1"
        " unless (time() - refresher_token_last_success_timestamp_seconds) < 900",
        "RefresherRefreshFailing fires on a job's first failure (counters start at 0)",
    ),
    # the brief's first sketch: silent for a process that never succeeded
    "refresh-failing-needs-timestamp": Mutant(
        "RefresherRefreshFailing",
        "expr",
        "sum without (reason) (increase(refresher_refresh_failures_total[15m])) > 0"
        " and (time() - refresher_token_last_success_timestamp_seconds) > 900",
        "RefresherRefreshFailing fires for a process that never succeeded (no timestamp series)",
    ),
    "expiring-soon-includes-standby": Mutant(
        "RefresherTokenExpiringSoon",
        "expr",
        "(refresher_token_expiry_timestamp_seconds - time()) < 300 and refresher_token_valid == 1",
        "RefresherTokenExpiringSoon stays silent for a normal refresh, an invalid token and a "
        "standby replica",
    ),
    "expired-ignores-tenants": Mutant(
        "RefresherTokenExpired",
        "expr",
        "refresher_token_valid == 0",
        "RefresherTokenExpired fires for an invalid token and for missing tenants",
    ),
    "expired-standby-ignores-election-flag": Mutant(
        "RefresherTokenExpired",
        "expr",
        "(refresher_token_valid == 0 or refresher_tenants_valid < refresher_tenants_configured)"
        " unless on (namespace, instance) refresher_is_leader == 0",
        "RefresherTokenExpired fires for an invalid token and for missing tenants",
    ),
    "rate-limited-any-429": Mutant(
        "RefresherRateLimited",
        "expr",
        "increase(refresher_rate_limited_total[15m]) > 0",
        "RefresherRateLimited stays silent for occasional 429s with short Retry-After",
    ),
    # misses a long Retry-After after the first 429 (the counter series appears at 1)
    "rate-limited-misses-first-429": Mutant(
        "RefresherRateLimited",
        "expr",
        "increase(refresher_rate_limited_total[15m]) > 2 or (refresher_backoff_seconds > 600"
        " and increase(refresher_rate_limited_total[30m]) > 0)",
        "RefresherRateLimited fires on repeated 429s and on one long Retry-After",
    ),
    "sink-short-for": Mutant(
        "RefresherSinkWriteFailing",
        "for",
        "5m",
        "RefresherSinkWriteFailing stays silent for a single failed write",
    ),
    "no-leader-ignores-election-flag": Mutant(
        "RefresherNoLeader",
        "expr",
        "max by (namespace, job) (refresher_is_leader) == 0",
        "RefresherNoLeader stays silent with a leader, during handover and without leader election",
    ),
    # never resolves until a restart
    "reload-rejected-forever": Mutant(
        "RefresherConfigReloadRejected",
        "expr",
        "refresher_config_reload_failures_total > 0",
        "RefresherConfigReloadRejected fires after a rejected reload and resolves after an hour",
    ),
    # fires on the counter's mere presence
    "reload-rejected-any-series": Mutant(
        "RefresherConfigReloadRejected",
        "expr",
        "refresher_config_reload_failures_total >= 0",
        "RefresherConfigReloadRejected fires after a rejected reload and resolves after an hour",
    ),
    "down-without-absent": Mutant(
        "RefresherDown",
        "expr",
        'up{job="refresher"} == 0',
        "RefresherDown fires when no target matches the selector",
    ),
    # the old selector: any scrape job whose name contains "refresher"
    "down-regex-selector": Mutant(
        "RefresherDown",
        "expr",
        'up{job=~".*refresher.*"} == 0 or absent(up{job=~".*refresher.*"})',
        "RefresherDown stays silent for a healthy target and a short restart",
    ),
    "internal-error-counter-value": Mutant(
        "RefresherInternalError",
        "expr",
        "refresher_internal_errors_total > 0",
        "RefresherInternalError fires on the first internal error and resolves 15 minutes later",
    ),
    "internal-error-any-series": Mutant(
        "RefresherInternalError",
        "expr",
        "refresher_internal_errors_total >= 0",
        "RefresherInternalError stays silent without errors and across a restart",
    ),
    "tenants-rejected-no-for": Mutant(
        "RefresherTenantsRejected",
        "for",
        None,
        "RefresherTenantsRejected stays silent for a clean file and a moment during an edit",
    ),
    "credential-invalid-misses-new-series": Mutant(
        "RefresherCredentialInvalid",
        "expr",
        'increase(refresher_refresh_failures_total{reason=~"invalid_link|unauthorized'
        '|tenant_mismatch"}[30m]) > 0 or label_replace(refresher_scope_missing > 0, "reason",'
        ' "scope_missing", "", "")',
        "RefresherCredentialInvalid fires on failures no retry fixes and on a missing scope",
    ),
    "credential-invalid-ignores-scope": Mutant(
        "RefresherCredentialInvalid",
        "expr",
        'increase(refresher_refresh_failures_total{reason=~"invalid_link|unauthorized'
        '|tenant_mismatch"}[30m]) > 0 or (refresher_refresh_failures_total{reason=~"invalid_link'
        '|unauthorized|tenant_mismatch"} > 0 unless refresher_refresh_failures_total'
        '{reason=~"invalid_link|unauthorized|tenant_mismatch"} offset 30m)',
        "RefresherCredentialInvalid fires on failures no retry fixes and on a missing scope",
    ),
    "credential-invalid-any-failure": Mutant(
        "RefresherCredentialInvalid",
        "expr",
        "increase(refresher_refresh_failures_total[30m]) > 0",
        "RefresherCredentialInvalid stays silent for retryable failures and healthy jobs",
    ),
}


def write_case(directory: Path, mutant: Mutant | None, case_name: str) -> Path:
    """A rules file (mutated when `mutant` is given) and a test file with one test case."""
    directory.mkdir()
    doc = rules_doc()
    if mutant is not None:
        [rule] = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == mutant.alert]
        if mutant.value is None:
            del rule[mutant.key]
        else:
            rule[mutant.key] = mutant.value
    rules = directory / "alerts.yaml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    tests = rule_tests()
    tests["rule_files"] = [str(rules)]
    tests["tests"] = [case for case in tests["tests"] if case["name"] == case_name]
    assert len(tests["tests"]) == 1, f"no test case named {case_name!r}"
    path = directory / "alerts_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return path


@needs_promtool
def test_rule_tests_reject_broken_rules(tmp_path: Path) -> None:
    """Each mutant must make its named test case fail on an alert assertion."""
    jobs: dict[str, Path] = {}
    for name, mutant in MUTANTS.items():
        jobs[name] = write_case(tmp_path / name, mutant, mutant.caught_by)
    # control: an unmodified case through the same YAML round trip passes
    control_case = next(iter(MUTANTS.values())).caught_by
    jobs["control"] = write_case(tmp_path / "control", None, control_case)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        results = dict(zip(jobs, pool.map(lambda p: run("test", "rules", p), jobs.values())))
    control = results.pop("control")
    assert control.returncode == 0, output(control)
    survived = sorted(name for name, proc in results.items() if proc.returncode == 0)
    assert not survived, f"promtool tests did not catch these broken rules: {survived}"
    for name, proc in results.items():
        mutant = MUTANTS[name]
        # a failed expectation of that alert (promtool reports it on stderr), not a broken file
        assert f"name: {mutant.caught_by}," in proc.stderr, output(proc)
        assert f"alertname: {mutant.alert}," in proc.stderr, output(proc)


# ------------------------------------------------------------------------------ metric names


def exported_sample_names() -> set[str]:
    """Every sample name the daemon's metric set can expose (refresher/metrics.py)."""
    from refresher.metrics import Metrics

    metrics = Metrics()
    metrics.register_state(lambda: [], is_leader=lambda: True)
    names: set[str] = set()
    for family in metrics.registry.collect():
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [rule["expr"] for rule in load_rules()]
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels") or [])
        exprs.extend(target["expr"] for target in panel.get("targets") or [])
    used = {name for expr in exprs for name in re.findall(r"\brefresher_[a-z_]+\b", expr)}
    exported = exported_sample_names()
    assert used, "no refresher_* metric found in the rules/dashboard"
    assert sorted(used - exported - PENDING_METRICS) == [], f"not exported: {exported}"


def test_rules_and_dashboard_use_only_exported_labels() -> None:
    """After the rename, no expression may group or match on a label the daemon does not
    export: `job` is only ever the scrape job (target labels are allowed)."""
    metrics = Metrics(tenant_labels=True)
    metrics.register_state(lambda: [], is_leader=lambda: True)
    exported = {"le", "reason", "result", "sink", "notifier", "component", "version"}
    exported |= set(metrics._labels)
    target = {"job", "instance", "namespace"}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [rule["expr"] for rule in load_rules()]
    exprs += [t["expr"] for p in _panels(dashboard) for t in p.get("targets") or []]
    for expr in exprs:
        used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            used |= {name.strip() for name in clause.split(",") if name.strip()}
        assert used <= exported | target, (expr, used - exported - target)
        if "refresher_is_leader" not in expr and "by (namespace, job)" in expr:
            raise AssertionError(f"groups token series by the scrape job: {expr}")


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels") or [] if panel["type"] == "row" else [panel])
    return found


# ------------------------------------------------------------------------------ the first scrape


def samples_of(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def test_failure_reasons_cover_every_error_class() -> None:
    """FAILURE_REASONS is the one list of reasons: every error the scheduler counts has its
    reason there (so its counter exists from the first scrape)."""

    def subclasses(cls: type) -> set[type]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    reasons = {cls.reason for cls in subclasses(errors.ProviderError)}
    reasons |= {errors.SinkError.reason, "internal"}
    assert sorted(reasons - set(FAILURE_REASONS)) == []
    assert len(set(FAILURE_REASONS)) == len(FAILURE_REASONS)


def test_docs_document_every_failure_reason() -> None:
    [row] = [
        line
        for line in (ROOT / "docs" / "monitoring.md").read_text().splitlines()
        if line.startswith("| `refresher_refresh_failures_total`")
    ]
    assert [r for r in FAILURE_REASONS if f"`{r}`" not in row] == []


@pytest.mark.parametrize("tenant_labels", [False, True], ids=["per-job", "tenant-labels"])
def test_counters_exist_at_the_first_collect(tenant_labels: bool) -> None:
    """Before any refresh: the very first collect already has every (token_job, reason) at 0,
    per job and not per tenant (the counters are collected after the state declared them)."""
    metrics = Metrics(tenant_labels=tenant_labels)
    snapshots = [
        JobSnapshot("api", "oauth2", None, False, None, None, 0.0),
        *(JobSnapshot("deb", "debitura", f"t-{i}", False, None, None, 0.0) for i in range(50)),
    ]
    metrics.register_state(lambda: snapshots, is_leader=None)
    found = samples_of(generate_latest(metrics.registry).decode())
    failures = [s for s in found if s.name == "refresher_refresh_failures_total"]
    expected = {(job, reason) for job in ("api", "deb") for reason in FAILURE_REASONS}
    assert {(s.labels["token_job"], s.labels["reason"]) for s in failures} == expected
    assert len(failures) == len(expected), "one series per job and reason, not per tenant"
    assert all(s.value == 0 for s in failures)
    if tenant_labels:
        assert {s.labels["tenant"] for s in failures} == {""}
    attempts = [s for s in found if s.name == "refresher_refresh_total"]
    assert {(s.labels["token_job"], s.labels["result"]) for s in attempts} == {
        (job, result) for job in ("api", "deb") for result in ("success", "failure")
    }
    assert {s.labels["token_job"] for s in found if s.name == "refresher_rate_limited_total"} == {
        "api",
        "deb",
    }
    [enabled] = [s for s in found if s.name == "refresher_leader_election_enabled"]
    assert enabled.value == 0, "exported when leader election is off, as 0"
    assert all("job" not in s.labels for s in found)


@pytest.mark.anyio
@pytest.mark.parametrize("tenant_labels", [False, True], ids=["per-job", "tenant-labels"])
async def test_daemon_scrape_has_every_reason_at_zero_and_no_job_label(
    start_daemon: Any,
    oauth2_emulator: Any,
    debitura: Any,
    tmp_path: Path,
    leak_guard: Any,
    tenant_labels: bool,
) -> None:
    """A real daemon against the emulators, scraped over HTTP: every (token_job, reason)
    is there at 0, leader election is exported as off, and no series has a `job` label."""
    config = {
        "metrics": {"tenant_labels": tenant_labels},
        "jobs": [
            oauth2_job(oauth2_emulator, tmp_path),
            deb_job(debitura, tmp_path, tenants=["t-1", "t-2", "t-3"]),
        ],
    }
    async with start_daemon(config) as daemon:
        status, text = await get_json(daemon, "/metrics", leak_guard)
    assert status == 200
    found = samples_of(text)
    zeros = {
        (s.labels["token_job"], s.labels["reason"])
        for s in found
        if s.name == "refresher_refresh_failures_total" and s.value == 0
    }
    assert zeros == {(job, r) for job in ("api", "debitura") for r in FAILURE_REASONS}
    assert [s for s in found if "job" in s.labels] == []
    [enabled] = [s for s in found if s.name == "refresher_leader_election_enabled"]
    assert enabled.value == 0
    if tenant_labels:
        tenants = {s.labels["tenant"] for s in found if s.name == "refresher_token_valid"}
        assert tenants == {"", "t-1", "t-2", "t-3"}


@needs_promtool
def test_promtool_lints_the_exposition() -> None:
    metrics = Metrics(tenant_labels=True)
    metrics.register_state(
        lambda: [JobSnapshot("deb", "debitura", "t-1", True, 2e9, 1.9e9, 0.0)],
        is_leader=lambda: False,
    )
    proc = subprocess.run(
        [str(PROMTOOL), "check", "metrics"],
        input=generate_latest(metrics.registry).decode(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), output(proc)
