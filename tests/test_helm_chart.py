"""The Helm chart in helm/refresher, rendered and linted by the real Helm v4 engine.

`helm_python` (PyPI helm-python-sdk) binds Helm's Go SDK through a bundled shared library
(`libhelm_c.so`, inside the wheel): no helm binary, no network, no cluster. Every rendered
manifest is validated with `kubernetes_validate` against its bundled (offline) JSON schemas
in strict mode; Prometheus Operator resources have no schema there and are checked by hand.

The config the chart renders into its ConfigMap is also loaded with the daemon's own
`refresher.config.load_settings`, so chart and daemon cannot drift apart silently.

The chart is copied to a temporary directory first. files/alerts.yaml and
dashboards/refresher.json are written by other work streams; when one is missing, a
minimal placeholder goes into the copy only (never into the repository).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "refresher"
EXAMPLES = CHART / "examples"
KUBE_VERSION = kubernetes_validate.latest_version()
RELEASE = "refresher"
NAMESPACE = "token-system"
CRD_GROUPS = ("monitoring.coreos.com/",)

PLACEHOLDER_ALERTS = """\
groups:
  - name: refresher-placeholder
    rules:
      - alert: RefresherPlaceholder
        expr: vector(0) > 1
        annotations:
          summary: "placeholder for {{ $labels.job }}"
"""
PLACEHOLDER_DASHBOARD = '{"title": "refresher (placeholder)", "panels": []}\n'

KUBE_SINK_JOBS = [
    {
        "name": "gooclaim",
        "provider": {
            "kind": "gooclaim",
            "client_id": "abc",
            "client_secret_file": "/etc/refresher/credentials/gooclaim",
        },
        "sinks": [
            {"kind": "file", "path": "/tokens/gooclaim.token"},
            {
                "kind": "kubernetes",
                "namespace": "apps",
                "secret": "partner-tokens",
                "key": "gooclaim",
            },
            # No namespace: the pod's, i.e. the release namespace.
            {"kind": "kubernetes", "secret": "gooclaim-token", "key": "token"},
        ],
    },
    {
        "name": "debitura",
        "provider": {
            "kind": "debitura",
            "api_key_file": "/etc/refresher/credentials/debitura",
            "tenants": ["t-001", "t-002"],
        },
        "sinks": [
            # One key per tenant in one Secret.
            {"kind": "kubernetes", "namespace": "apps", "secret": "debitura", "key": "{tenant}"},
            # Shared Secret, other keys: listed once.
            {
                "kind": "kubernetes",
                "namespace": "apps",
                "secret": "partner-tokens",
                "key": "debitura-{tenant}",
            },
        ],
    },
]

KUBE_SINK_VALUES: dict[str, Any] = {
    "config": {"jobs": KUBE_SINK_JOBS},
    "credentials": {"existingSecret": "partner-creds"},
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def chart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("chart") / "refresher"
    shutil.copytree(CHART, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    alerts = target / "files" / "alerts.yaml"
    if not alerts.is_file():
        alerts.parent.mkdir(parents=True, exist_ok=True)
        alerts.write_text(PLACEHOLDER_ALERTS)
    dashboard = target / "dashboards" / "refresher.json"
    if not dashboard.is_file():
        dashboard.parent.mkdir(parents=True, exist_ok=True)
        dashboard.write_text(PLACEHOLDER_DASHBOARD)
    return target


@pytest.fixture(scope="session")
def chart(chart_dir: Path) -> Iterator[helm.Chart]:
    with helm.Chart.load(chart_dir) as loaded:
        yield loaded


def example_values(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return values


def render_raw(
    chart: helm.Chart,
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> dict[str, str]:
    return chart.render(values or {}, name=name, namespace=namespace, is_install=True)


def render(
    chart: helm.Chart,
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[dict[str, Any]]:
    """Render and parse every manifest (NOTES.txt excluded)."""
    manifests: list[dict[str, Any]] = []
    for path, text in sorted(render_raw(chart, values, name=name, namespace=namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert {"apiVersion", "kind", "metadata"} <= doc.keys(), (path, doc)
                manifests.append(doc)
    return manifests


def validate(manifests: list[dict[str, Any]]) -> None:
    """Schema-validate every manifest except CRD-backed kinds; no duplicates."""
    seen = set()
    for manifest in manifests:
        key = (
            manifest["kind"],
            manifest["metadata"].get("namespace"),
            manifest["metadata"]["name"],
        )
        assert key not in seen, f"duplicate object {key}"
        seen.add(key)
        if manifest["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']}: {path}: {exc.message}")


def only(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def kinds(manifests: list[dict[str, Any]]) -> list[str]:
    return sorted(m["kind"] for m in manifests)


def daemon_config(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    config_maps = [m for m in of_kind(manifests, "ConfigMap") if "config.yaml" in m["data"]]
    assert len(config_maps) == 1
    config: dict[str, Any] = yaml.safe_load(config_maps[0]["data"]["config.yaml"])
    return config


def pod_spec(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = only(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(manifests)["containers"]
    assert [c["name"] for c in containers] == ["refresher"]
    result: dict[str, Any] = containers[0]
    return result


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def volumes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in spec.get("volumes", [])}


def rules_by_resource(role: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for rule in role["rules"]:
        for resource in rule["resources"]:
            out.setdefault(resource, []).append(rule)
    return out


def assert_pod_security_context(pod: dict[str, Any]) -> None:
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}


def assert_container_security_context(c: dict[str, Any]) -> None:
    csc = c["securityContext"]
    assert csc["runAsNonRoot"] is True
    assert csc["runAsUser"] == 10001
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not csc.get("privileged", False)


# ----------------------------------------------------------------------------- metadata, lint


def test_chart_metadata_matches_package(chart: helm.Chart) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "refresher"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == project["version"]
    # The default image is the package version built from the repository's Dockerfile.
    image = container(render(chart))["image"]
    assert image == f"ghcr.io/refresher-dev/refresher:{project['version']}"


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(None, id="defaults"),
        pytest.param({"replicas": 3}, id="replicas-3"),
        pytest.param(example_values("values-sidecar.yaml"), id="sidecar-example"),
        pytest.param(example_values("values-standalone.yaml"), id="standalone-example"),
    ],
)
def test_lint_is_clean(chart_dir: Path, values: dict[str, Any] | None) -> None:
    report = helm.lint(
        chart_dir, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_lint_reports_schema_violations(chart_dir: Path) -> None:
    report = helm.lint(chart_dir, {"replicas": 0}, namespace=NAMESPACE)
    assert any("/replicas" in error for error in report["errors"]), report


# ----------------------------------------------------------------------------- default render


def test_default_render(chart: helm.Chart) -> None:
    manifests = render(chart)
    validate(manifests)
    # No kubernetes sinks and one replica: no Role, no PDB, no monitoring objects.
    assert kinds(manifests) == ["ConfigMap", "Deployment", "Secret", "Service", "ServiceAccount"]

    deployment = only(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    pod = pod_spec(manifests)
    c = container(manifests)
    assert_pod_security_context(pod)
    assert pod["securityContext"]["runAsUser"] == 10001
    assert_container_security_context(c)
    assert c["args"] == ["run", "--config", "/etc/refresher/config.yaml"]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # Nothing talks to the Kubernetes API: no token in the pod.
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == only(manifests, "ServiceAccount")["metadata"]["name"]

    # Mounts: the config file, the admin token directory, writable /tokens and /tmp.
    m = mounts(c)
    v = volumes(pod)
    assert m["/etc/refresher/config.yaml"]["subPath"] == "config.yaml"
    assert v[m["/etc/refresher/config.yaml"]["name"]]["configMap"]["name"] == RELEASE
    assert "subPath" not in m["/etc/refresher/admin"]
    assert v[m["/tokens"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert not m["/tokens"].get("readOnly", False)
    assert "/tmp" in m
    assert "/etc/refresher/credentials" not in m

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])

    config = daemon_config(manifests)
    assert config["server"] == {
        "listen": "0.0.0.0:9464",
        "admin_token_file": "/etc/refresher/admin/token",
    }
    assert config["jobs"] == []
    assert "leader_election" not in config
    assert config["refresh"]["min_remaining"] == "5m"

    admin = only(manifests, "Secret")
    assert admin["metadata"]["name"] == v["admin-token"]["secret"]["secretName"]
    assert len(base64.b64decode(admin["data"]["token"])) == 48

    service = only(manifests, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()

    notes = render_raw(chart)["refresher/templates/NOTES.txt"]
    assert "config.jobs is empty" in notes


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels


def test_config_checksum_follows_config(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = only(render(chart, values), "Deployment")
        value: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    base = checksum({})
    assert checksum({}) == base
    assert checksum({"config": {"refresh": {"min_remaining": "10m"}}}) != base


def test_values_are_passed_through(chart: helm.Chart) -> None:
    manifests = render(
        chart,
        {
            "image": {"tag": "1.2.3", "digest": "sha256:" + "a" * 64},
            "extraEnv": [{"name": "REFRESHER_LOGGING__LEVEL", "value": "debug"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "podAnnotations": {"example.com/team": "platform"},
            "config": {"logging": {"format": "json"}, "metrics": {"tenant_labels": True}},
        },
    )
    validate(manifests)
    c = container(manifests)
    assert c["image"] == "ghcr.io/refresher-dev/refresher:1.2.3@sha256:" + "a" * 64
    assert {"name": "REFRESHER_LOGGING__LEVEL", "value": "debug"} in c["env"]
    assert pod_spec(manifests)["nodeSelector"] == {"kubernetes.io/os": "linux"}
    config = daemon_config(manifests)
    assert config["logging"] == {"format": "json"}
    assert config["metrics"] == {"tenant_labels": True}


# ----------------------------------------------------------------------------- replicas > 1


def test_three_replicas_enable_leader_election(chart: helm.Chart) -> None:
    manifests = render(chart, {"replicas": 3})
    validate(manifests)
    assert only(manifests, "Deployment")["spec"]["replicas"] == 3

    config = daemon_config(manifests)
    assert config["leader_election"] == {
        "enabled": True,
        "lease_name": RELEASE,
        "namespace": NAMESPACE,
    }

    pdb = only(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= pod_labels(only(manifests, "Deployment")).items()
    )

    role = only(manifests, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    by_resource = rules_by_resource(role)
    assert set(by_resource) == {"leases"}, "no Secret rules without kubernetes sinks"
    leases = by_resource["leases"]
    assert all(r["apiGroups"] == ["coordination.k8s.io"] for r in leases)
    create = [r for r in leases if "create" in r["verbs"]]
    named = [r for r in leases if "resourceNames" in r]
    assert create == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]}
    ]
    assert len(named) == 1
    assert named[0]["resourceNames"] == [RELEASE]
    assert sorted(named[0]["verbs"]) == ["get", "update"]

    binding = only(manifests, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}
    ]
    # The Lease needs the API: the token is mounted.
    assert pod_spec(manifests)["automountServiceAccountToken"] is True


def test_single_replica_has_no_pdb_and_explicit_leader_election(chart: helm.Chart) -> None:
    assert of_kind(render(chart, {"replicas": 1}), "PodDisruptionBudget") == []
    manifests = render(
        chart, {"config": {"leader_election": {"enabled": True, "lease_name": "my-lease"}}}
    )
    validate(manifests)
    assert daemon_config(manifests)["leader_election"] == {
        "enabled": True,
        "lease_name": "my-lease",
        "namespace": NAMESPACE,
    }
    named = [r for r in only(manifests, "Role")["rules"] if "resourceNames" in r]
    assert named[0]["resourceNames"] == ["my-lease"]
    assert of_kind(manifests, "PodDisruptionBudget") == []


# ----------------------------------------------------------------------------- RBAC for sinks


def test_kubernetes_sinks_get_exact_secret_rbac(chart: helm.Chart) -> None:
    manifests = render(chart, KUBE_SINK_VALUES)
    validate(manifests)
    roles = {r["metadata"]["namespace"]: r for r in of_kind(manifests, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in of_kind(manifests, "RoleBinding")}
    assert set(roles) == set(bindings) == {"apps", NAMESPACE}

    expected = {
        "apps": ["debitura", "partner-tokens"],
        NAMESPACE: ["gooclaim-token"],
    }
    for namespace, role in roles.items():
        assert role["rules"] == [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": expected[namespace],
                "verbs": ["get", "patch"],
            }
        ], namespace
        assert bindings[namespace]["subjects"] == [
            {"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}
        ]
    assert pod_spec(manifests)["automountServiceAccountToken"] is True
    assert only(manifests, "ServiceAccount")["automountServiceAccountToken"] is True
    notes = render_raw(chart, KUBE_SINK_VALUES)["refresher/templates/NOTES.txt"]
    assert "apps: debitura, partner-tokens" in notes
    assert "subPath" in notes


def test_secret_create_is_opt_in(chart: helm.Chart) -> None:
    values = {
        **KUBE_SINK_VALUES,
        "replicas": 2,
        "rbac": {"allowSecretCreate": True},
    }
    manifests = render(chart, values)
    validate(manifests)
    for role in of_kind(manifests, "Role"):
        secrets = rules_by_resource(role)["secrets"]
        create = [r for r in secrets if "create" in r["verbs"]]
        # create cannot be limited by resourceNames: its own rule, nothing else in it.
        assert create == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}]
        named = [r for r in secrets if r is not create[0]]
        assert [sorted(r["verbs"]) for r in named] == [["get", "patch"]]
        assert named[0]["resourceNames"]
    # The lease rules live in the release namespace only, next to its Secret rules.
    lease_namespaces = [
        r["metadata"]["namespace"]
        for r in of_kind(manifests, "Role")
        if "leases" in rules_by_resource(r)
    ]
    assert lease_namespaces == [NAMESPACE]


def test_rbac_never_grants_broad_access(chart: helm.Chart) -> None:
    values = {**KUBE_SINK_VALUES, "replicas": 3}
    manifests = render(chart, values)
    assert (
        of_kind(manifests, "ClusterRole") == [] and of_kind(manifests, "ClusterRoleBinding") == []
    )
    for role in of_kind(manifests, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
            assert not {"list", "watch", "delete", "deletecollection"} & set(rule["verbs"])
            if "create" not in rule["verbs"]:
                assert rule.get("resourceNames"), rule


def test_rbac_can_be_disabled(chart: helm.Chart) -> None:
    manifests = render(chart, {**KUBE_SINK_VALUES, "rbac": {"create": False}})
    assert of_kind(manifests, "Role") == [] and of_kind(manifests, "RoleBinding") == []


def test_sinks_with_their_own_kubeconfig_get_no_rbac(chart: helm.Chart) -> None:
    jobs = [
        {
            "name": "remote",
            "provider": {"kind": "oauth2"},
            "sinks": [
                {"kind": "kubernetes", "secret": "remote-token", "kubeconfig": "/etc/kube/other"}
            ],
        }
    ]
    manifests = render(chart, {"config": {"jobs": jobs}})
    assert of_kind(manifests, "Role") == []
    assert pod_spec(manifests)["automountServiceAccountToken"] is False


def test_rbac_refuses_the_default_service_account(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"serviceAccount\.name"):
        render(chart, {**KUBE_SINK_VALUES, "serviceAccount": {"create": False}})


# ----------------------------------------------------------------------------- secrets


def test_credentials_secret_is_mounted_as_a_directory(chart: helm.Chart) -> None:
    manifests = render(chart, {"credentials": {"files": {"gooclaim": "s3cret"}}})
    validate(manifests)
    secrets = {s["metadata"]["name"]: s for s in of_kind(manifests, "Secret")}
    creds = secrets[f"{RELEASE}-credentials"]
    assert base64.b64decode(creds["data"]["gooclaim"]) == b"s3cret"
    m = mounts(container(manifests))["/etc/refresher/credentials"]
    assert "subPath" not in m and m["readOnly"] is True
    volume = volumes(pod_spec(manifests))[m["name"]]
    assert volume["secret"]["secretName"] == f"{RELEASE}-credentials"
    assert (
        "checksum/credentials"
        in only(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    )
    # The secret value never lands in the ConfigMap.
    assert "s3cret" not in json.dumps(of_kind(manifests, "ConfigMap"))


def test_referenced_credentials_must_be_mounted(chart: helm.Chart) -> None:
    jobs = [
        {
            "name": "partner",
            "provider": {
                "kind": "oauth2",
                "client_secret_file": "/etc/refresher/credentials/partner-secret",
            },
            "sinks": [{"kind": "file", "path": "/tokens/partner.token"}],
        }
    ]
    with pytest.raises(helm.HelmRenderError, match="no credentials are mounted"):
        render(chart, {"config": {"jobs": jobs}})
    with pytest.raises(helm.HelmRenderError, match='has no key "partner-secret"'):
        render(chart, {"config": {"jobs": jobs}, "credentials": {"files": {"partner": "x"}}})
    render(chart, {"config": {"jobs": jobs}, "credentials": {"files": {"partner-secret": "x"}}})
    render(chart, {"config": {"jobs": jobs}, "credentials": {"existingSecret": "mine"}})


def test_existing_secrets_are_referenced_not_created(chart: helm.Chart) -> None:
    manifests = render(
        chart,
        {
            "credentials": {"existingSecret": "partner-creds"},
            "adminToken": {"existingSecret": "my-admin", "key": "bearer"},
        },
    )
    validate(manifests)
    assert of_kind(manifests, "Secret") == []
    v = volumes(pod_spec(manifests))
    assert v["credentials"]["secret"]["secretName"] == "partner-creds"
    assert v["admin-token"]["secret"]["secretName"] == "my-admin"
    assert v["admin-token"]["secret"]["items"] == [{"key": "bearer", "path": "bearer"}]
    assert daemon_config(manifests)["server"]["admin_token_file"] == "/etc/refresher/admin/bearer"


def test_admin_token_value(chart: helm.Chart) -> None:
    manifests = render(chart, {"adminToken": {"value": "fixed-token"}})
    admin = only(manifests, "Secret")
    assert base64.b64decode(admin["data"]["token"]) == b"fixed-token"
    # Offline, lookup finds nothing: a fresh random token per render.
    a, b = (only(render(chart), "Secret")["data"]["token"] for _ in range(2))
    assert a != b


def test_admin_token_required_for_non_loopback_listener(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="admin_token_file"):
        render(chart, {"adminToken": {"enabled": False}})
    # With a file of one's own, the chart does not mount its own.
    manifests = render(
        chart,
        {
            "adminToken": {"enabled": False},
            "config": {"server": {"admin_token_file": "/run/admin/token"}},
        },
    )
    assert daemon_config(manifests)["server"]["admin_token_file"] == "/run/admin/token"
    assert "/etc/refresher/admin" not in mounts(container(manifests))


def test_loopback_listener_is_refused_in_standalone_mode(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="loopback"):
        render(chart, {"config": {"server": {"listen": "127.0.0.1:9464"}}})


def test_listen_port_drives_the_container_port(chart: helm.Chart) -> None:
    manifests = render(chart, {"config": {"server": {"listen": "[::]:9100"}}})
    validate(manifests)
    assert container(manifests)["ports"][0]["containerPort"] == 9100


# ----------------------------------------------------------------------------- monitoring


def test_service_monitor(chart: helm.Chart) -> None:
    manifests = render(chart, {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})
    validate(manifests)
    monitor = only(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service = only(manifests, "Service")
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = spec["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    assert set(endpoint) <= {
        "port",
        "path",
        "interval",
        "scrapeTimeout",
        "honorLabels",
        "relabelings",
        "metricRelabelings",
    }


def test_prometheus_rule_renders_alerts_file(chart: helm.Chart, chart_dir: Path) -> None:
    manifests = render(chart, {"prometheusRule": {"enabled": True}})
    validate(manifests)
    rule = only(manifests, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    shipped = yaml.safe_load((chart_dir / "files" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r), r
            assert isinstance(r["expr"], str) and r["expr"].strip()
    # The Prometheus templating survives Helm untouched.
    assert "{{ $labels." in json.dumps(rule["spec"])


def test_dashboard_configmap(chart: helm.Chart, chart_dir: Path) -> None:
    manifests = render(
        chart, {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "Platform"}}}
    )
    validate(manifests)
    [dashboard] = [
        m for m in of_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-dashboard")
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Platform"}
    shipped = json.loads((chart_dir / "dashboards" / "refresher.json").read_text())
    assert json.loads(dashboard["data"]["refresher.json"]) == shipped
    assert not [m for m in render(chart) if m["metadata"]["name"].endswith("-dashboard")]


def test_network_policy(chart: helm.Chart) -> None:
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    manifests = render(chart, {"networkPolicy": {"enabled": True, "ingressFrom": [peer]}})
    validate(manifests)
    policy = only(manifests, "NetworkPolicy")["spec"]
    assert (
        policy["podSelector"]["matchLabels"].items()
        <= pod_labels(only(manifests, "Deployment")).items()
    )
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [
        {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": [peer]}
    ]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 443, 6443}


# ----------------------------------------------------------------------------- examples


def test_standalone_example(chart: helm.Chart) -> None:
    manifests = render(chart, example_values("values-standalone.yaml"))
    validate(manifests)
    assert {
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
    } <= set(kinds(manifests))
    assert daemon_config(manifests)["leader_election"]["enabled"] is True
    apps_role = next(r for r in of_kind(manifests, "Role") if r["metadata"]["namespace"] == "apps")
    assert apps_role["rules"][0]["resourceNames"] == ["partner-tokens"]


def test_sidecar_values_render_no_workload(chart: helm.Chart) -> None:
    manifests = render(
        chart, example_values("values-sidecar.yaml"), name="tokens", namespace="apps"
    )
    validate(manifests)
    assert kinds(manifests) == ["ConfigMap", "Secret"]
    config = daemon_config(manifests)
    assert "leader_election" not in config
    sinks = [s for job in config["jobs"] for s in job["sinks"]]
    assert {
        "kind": "file",
        "path": "/tokens/gooclaim.token",
        "format": "raw",
        "mode": "0640",
    } in sinks
    # Even with replicas > 1 the sidecar mode renders no workload and no Lease.
    values = example_values("values-sidecar.yaml") | {"replicas": 3}
    assert kinds(render(chart, values, name="tokens", namespace="apps")) == kinds(manifests)


def test_sidecar_pod_example(chart: helm.Chart) -> None:
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "sidecar.yaml").read_text()) if d]
    [pod] = docs
    validate([pod])
    spec = pod["spec"]
    [sidecar] = spec["initContainers"]
    [app] = spec["containers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["run", "--config", "/etc/refresher/config.yaml"]
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert_pod_security_context(pod["spec"])
    assert_container_security_context(sidecar)

    # Both share the /tokens emptyDir; the consumer reads it read-only, no subPath anywhere.
    v = volumes(spec)
    side_tokens, app_tokens = mounts(sidecar)["/tokens"], mounts(app)["/tokens"]
    assert side_tokens["name"] == app_tokens["name"]
    assert "emptyDir" in v[side_tokens["name"]]
    assert app_tokens["readOnly"] is True
    for mount in [*sidecar["volumeMounts"], *app["volumeMounts"]]:
        if mount["mountPath"] != "/etc/refresher/config.yaml":
            assert "subPath" not in mount, mount
    assert {"name": "GOOCLAIM_TOKEN_FILE", "value": "/tokens/gooclaim.token"} in app["env"]
    # The consumer can read a 0640 file of group fsGroup.
    assert spec["securityContext"]["fsGroup"] == sidecar["securityContext"]["runAsGroup"]

    # Everything the Pod refers to is rendered by the chart with the sidecar values (or is
    # the credentials Secret those values name).
    values = example_values("values-sidecar.yaml")
    manifests = render(chart, values, name="tokens", namespace=pod["metadata"]["namespace"])
    rendered = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    for volume in v.values():
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in rendered
        if "secret" in volume:
            name = volume["secret"]["secretName"]
            assert ("Secret", name) in rendered or name == values["credentials"][
                "existingSecret"
            ], name
    config = daemon_config(manifests)
    assert config["jobs"][0]["sinks"][0]["path"] == "/tokens/gooclaim.token"
    assert config["server"]["admin_token_file"].startswith(
        mounts(sidecar)["/etc/refresher/admin"]["mountPath"]
    )
    secret_file = config["jobs"][0]["provider"]["client_secret_file"]
    assert secret_file.startswith("/etc/refresher/credentials/")
    assert "/etc/refresher/credentials" in mounts(sidecar)
    assert spec["automountServiceAccountToken"] is False


# ----------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("values", "field"),
    [
        pytest.param({"replicas": "three"}, "/replicas", id="replicas-string"),
        pytest.param({"replicas": 0}, "/replicas", id="replicas-zero"),
        pytest.param({"replicas": 1.5}, "/replicas", id="replicas-float"),
        pytest.param({"mode": "daemonset"}, "/mode", id="unknown-mode"),
        pytest.param({"replica": 3}, "replica", id="unknown-top-level-key"),
        pytest.param({"image": {"tag": 1.0}}, "/image/tag", id="numeric-tag"),
        pytest.param({"config": "server: {}"}, "/config", id="config-not-object"),
        pytest.param(
            {"config": {"server": {"listen": "9464"}}},
            "/config/server/listen",
            id="listen-without-host",
        ),
        pytest.param(
            {"config": {"refresh": {"min_remaining": "soon"}}},
            "/config/refresh/min_remaining",
            id="bad-duration",
        ),
        pytest.param(
            {
                "config": {
                    "jobs": [
                        {
                            "name": "x",
                            "provider": {"kind": "oauth2"},
                            "sinks": [{"kind": "kubernetes"}],
                        }
                    ]
                }
            },
            "secret",
            id="kubernetes-sink-without-secret",
        ),
        pytest.param(
            {
                "config": {
                    "jobs": [
                        {
                            "name": "x",
                            "provider": {"kind": "oauth2"},
                            "sinks": [{"kind": "kubernetes", "secret": "x-{tenant}"}],
                        }
                    ]
                }
            },
            "/config/jobs/0/sinks/0/secret",
            id="secret-name-with-placeholder",
        ),
        pytest.param(
            {"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled", id="bool-as-string"
        ),
    ],
)
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any], field: str) -> None:
    with pytest.raises(helm.HelmValuesError) as schema_error:
        chart.validate_schema(chart.merge_values(values))
    assert field in str(schema_error.value)
    # Rendering (install/upgrade/template) refuses them the same way.
    with pytest.raises(helm.HelmValuesError, match=re.escape(field)):
        render(chart, values)


def test_schema_accepts_documented_values(chart: helm.Chart) -> None:
    for values in (
        {},
        {"replicas": 3},
        example_values("values-sidecar.yaml"),
        example_values("values-standalone.yaml"),
        {**KUBE_SINK_VALUES, "rbac": {"allowSecretCreate": True}},
    ):
        chart.validate_schema(chart.merge_values(values))


def test_every_default_value_is_documented() -> None:
    """values.yaml: every leaf key has a comment just above it or above an ancestor key."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while documented and documented[-1][0] >= indent:
            documented.pop()
        here = number > 0 and lines[number - 1].strip().startswith("#")
        inherited = any(flag for _, flag in documented)
        is_leaf = match.group(3).strip() != ""
        if is_leaf and not (here or inherited):
            undocumented.append(line.strip())
        documented.append((indent, here))
    assert undocumented == []


# ----------------------------------------------------------------------------- daemon contract


@pytest.mark.parametrize(
    ("values", "leader"),
    [
        pytest.param({}, False, id="defaults"),
        pytest.param({"replicas": 3}, True, id="replicas-3"),
        pytest.param({**KUBE_SINK_VALUES, "replicas": 2}, True, id="kubernetes-sinks"),
        pytest.param(example_values("values-standalone.yaml"), True, id="standalone-example"),
        pytest.param(example_values("values-sidecar.yaml"), False, id="sidecar-example"),
    ],
)
def test_rendered_config_loads_in_the_daemon(
    chart: helm.Chart, tmp_path: Path, values: dict[str, Any], leader: bool
) -> None:
    """The ConfigMap's config.yaml passes the daemon's own validation (refresher.config).

    The files the pod would mount under /etc/refresher/ are stood in under tmp_path.
    """
    from refresher.config import load_settings

    text = json.dumps(daemon_config(render(chart, values)))
    for path in sorted(set(re.findall(r'"(/etc/refresher/[^"]+)"', text))):
        stand_in = tmp_path / path.lstrip("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("stand-in\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        yaml.safe_dump(json.loads(text.replace('"/etc/refresher/', f'"{tmp_path}/etc/refresher/')))
    )

    settings = load_settings(config_file)
    assert settings.server.listen == "0.0.0.0:9464"
    assert settings.server.admin_token_file == tmp_path / "etc/refresher/admin/token"
    assert settings.leader_election.enabled is leader
    if leader:
        assert settings.leader_election.lease_name == RELEASE
        assert settings.leader_election.namespace == NAMESPACE


# ----------------------------------------------------------------------------- image


def test_dockerfile_matches_chart(chart: helm.Chart) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r"pip install --no-cache-dir \.$", dockerfile, re.M)
    assert re.search(r"^USER 10001(:10001)?$", dockerfile, re.M)
    assert re.search(r"^EXPOSE 9464$", dockerfile, re.M)
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))
    assert entrypoint == ["refresher"]
    assert cmd == ["run", "--config", "/etc/refresher/config.yaml"]
    c = container(render(chart))
    assert "command" not in c, "the image's ENTRYPOINT is used"
    assert c["args"] == cmd
    assert c["securityContext"]["runAsUser"] == 10001
