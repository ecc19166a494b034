"""The Helm chart through Helm's own engine: lint, renders, Kubernetes schemas, security contexts, bad values."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
from chart_support import CHART_DIR, NAMESPACE, Manifest, Render, assert_locked_down, key, pod_templates

pytestmark = pytest.mark.unit

# The chart's floor (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate bundles.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
# Kinds whose schemas are not Kubernetes' own; checked by the tests that enable them instead.
NOT_IN_KUBERNETES = {"ServiceMonitor"}

NON_DEFAULT: dict[str, Any] = {
    "fullnameOverride": "llm",
    "images": {
        "operator": {"repository": "registry.example.com:5000/platform/stratus-operator", "tag": "1.2.3",
                     "pullPolicy": "Always"},
        "workers": {"repository": "registry.example.com:5000/platform/stratus-workers", "tag": "1.2.3-cuda",
                    "pullPolicy": "Always"},
        "s3": {"repository": "registry.example.com:5000/mirror/aws-cli", "tag": "2.18.0"},
    },
    "modelCache": {"hostPath": "/mnt/nvme/stratus"},
    "compression": {"jobDeadlineSeconds": 3600},
    "resyncSeconds": 30,
    "workerLimit": 8,
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"create": True, "name": "llm-controller",
                       "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/stratus"}},
    "watchNamespaces": ["team-a", "team-b"],
    "logLevel": "debug",
    "logFormat": "text",
    # Helm merges maps with the defaults: null removes the default label.
    "edge": {"nodeSelector": {"node-role.kubernetes.io/edge": "", "stratus.dev/edge": None},
             "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}]},
    "cloud": {"gpuResourceName": "amd.com/gpu"},
    "metrics": {"port": 9100, "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}},
    "healthPort": 8082,
    "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]},
    "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": 1, "memory": "2Gi"}},
    "podAnnotations": {"example.com/team": "ml-platform"},
    "podLabels": {"team": "ml-platform"},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [
            {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"}]}}]}},
}
# Everything optional switched off, with an existing ServiceAccount.
MINIMAL: dict[str, Any] = {
    "serviceAccount": {"create": False, "name": "existing-sa"},
    "rbac": {"create": False},
    "metrics": {"enabled": False},
    "networkPolicy": {"enabled": False},
}
VARIANTS = {"default": None, "non-default": NON_DEFAULT, "minimal": MINIMAL}


def _by_key(objects: list[Manifest]) -> dict[tuple[str, str, str], Manifest]:
    found = {key(o): o for o in objects}
    assert len(found) == len(objects), "two rendered objects share a kind, namespace and name"
    return found


def _env(objects: list[Manifest]) -> dict[str, Any]:
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_lint_is_clean(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings (2) and errors (3) fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_default_render_is_the_cluster_wide_operator(default_objects: list[Manifest]) -> None:
    assert set(_by_key(default_objects)) == {
        ("ServiceAccount", NAMESPACE, "stratus-operator"),
        ("ClusterRole", "", "stratus-operator"),
        ("ClusterRoleBinding", "", "stratus-operator"),
        ("Deployment", NAMESPACE, "stratus-operator"),
        ("Service", NAMESPACE, "stratus-operator-metrics"),
        ("NetworkPolicy", NAMESPACE, "stratus-operator"),
        ("NetworkPolicy", NAMESPACE, "stratus-model-servers"),
    }
    deployment = _by_key(default_objects)[("Deployment", NAMESPACE, "stratus-operator")]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["stratus", "--log-level", "info", "--log-format", "json", "operator"]
    assert container["image"] == "ghcr.io/stratus-llm/stratus-operator:0.1.0"
    assert pod["serviceAccountName"] == "stratus-operator"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    env = _env(default_objects)
    assert env["STRATUS_NAMESPACES"] == ""
    assert env["STRATUS_IMAGE"] == "ghcr.io/stratus-llm/stratus-workers:0.1.0"
    assert env["STRATUS_HEALTH_PORT"] == "8081" and env["STRATUS_METRICS_PORT"] == "9090"
    assert json.loads(env["STRATUS_EDGE_NODE_SELECTOR"]) == {"stratus.dev/edge": "true"}
    assert json.loads(env["STRATUS_EDGE_TOLERATIONS"]) == [
        {"key": "stratus.dev/edge", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
    assert env["STRATUS_GPU_RESOURCE_NAME"] == "nvidia.com/gpu"


def test_non_default_values_reach_every_object(render: Render) -> None:
    objects = _by_key(render(NON_DEFAULT))
    kinds = {(k, ns) for k, ns, _ in objects}
    # Exact names: a Role and RoleBinding per watched namespace, no cluster-wide namespaced rules.
    for ns in ("team-a", "team-b"):
        role = objects[("Role", ns, "llm-operator")]
        binding = objects[("RoleBinding", ns, "llm-operator")]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llm-controller", "namespace": NAMESPACE}]
        assert all(r["resources"] != ["nodes"] for r in role["rules"])
        assert ("NetworkPolicy", ns) in kinds
    # Exact names: the operator runs without kopf's discovery, so the ClusterRole lists no namespaces or CRDs.
    cluster_role = objects[("ClusterRole", "", "llm-operator-cluster")]
    assert {res for rule in cluster_role["rules"] for res in rule["resources"]} == {"nodes"}
    assert ("ClusterRole", "", "llm-operator") not in objects

    deployment = objects[("Deployment", NAMESPACE, "llm-operator")]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example.com:5000/platform/stratus-operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8082, "metrics": 9100}
    assert container["resources"]["limits"] == {"cpu": 1, "memory": "2Gi"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == NON_DEFAULT["tolerations"]
    assert pod["affinity"] == NON_DEFAULT["affinity"]
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "ml-platform"
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "ml-platform"}

    env = _env(list(objects.values()))
    assert env["STRATUS_NAMESPACES"] == "team-a,team-b"
    assert container["command"] == ["stratus", "--log-level", "debug", "--log-format", "text", "operator"]
    assert env["STRATUS_IMAGE"] == "registry.example.com:5000/platform/stratus-workers:1.2.3-cuda"
    assert env["STRATUS_IMAGE_PULL_POLICY"] == "Always"
    assert env["STRATUS_S3_IMAGE"] == "registry.example.com:5000/mirror/aws-cli:2.18.0"
    assert env["STRATUS_CACHE_HOST_PATH"] == "/mnt/nvme/stratus"
    assert env["STRATUS_JOB_DEADLINE_SECONDS"] == "3600"
    assert env["STRATUS_RESYNC_SECONDS"] == "30"
    assert env["STRATUS_WORKER_LIMIT"] == "8"
    assert json.loads(env["STRATUS_EDGE_NODE_SELECTOR"]) == {"node-role.kubernetes.io/edge": ""}
    assert json.loads(env["STRATUS_EDGE_TOLERATIONS"]) == NON_DEFAULT["edge"]["tolerations"]
    assert env["STRATUS_GPU_RESOURCE_NAME"] == "amd.com/gpu"
    assert env["STRATUS_METRICS_PORT"] == "9100"

    monitor = objects[("ServiceMonitor", NAMESPACE, "llm-operator")]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
    sa = objects[("ServiceAccount", NAMESPACE, "llm-controller")]
    assert sa["metadata"]["annotations"] == NON_DEFAULT["serviceAccount"]["annotations"]
    operator_policy = objects[("NetworkPolicy", NAMESPACE, "llm-operator")]
    assert operator_policy["spec"]["ingress"][1]["from"] == NON_DEFAULT["networkPolicy"]["metricsFrom"]


@pytest.mark.parametrize(
    ("tag", "image"),
    [
        ("", "ghcr.io/stratus-llm/stratus-workers:0.1.0"),
        ("0.2.0-cuda", "ghcr.io/stratus-llm/stratus-workers:0.2.0-cuda"),
        ("0.2.0@sha256:" + "a" * 64, "ghcr.io/stratus-llm/stratus-workers:0.2.0@sha256:" + "a" * 64),
        ("@sha256:" + "b" * 64, "ghcr.io/stratus-llm/stratus-workers@sha256:" + "b" * 64),
    ],
)
def test_image_references(render: Render, tag: str, image: str) -> None:
    assert _env(render({"images": {"workers": {"tag": tag}}}))["STRATUS_IMAGE"] == image


def test_minimal_render_has_only_the_operator(render: Render) -> None:
    objects = render(MINIMAL)
    assert {key(o) for o in objects} == {("Deployment", NAMESPACE, "stratus-operator")}
    env = _env(objects)
    assert env["STRATUS_METRICS_PORT"] == "0"
    pod = objects[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing-sa"
    assert [p["name"] for p in pod["containers"][0]["ports"]] == ["health"]


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_is_valid_kubernetes(render: Render, values: dict[str, Any] | None, version: str) -> None:
    checked = 0
    for obj in render(values):
        if obj["kind"] in NOT_IN_KUBERNETES:
            continue
        # strict: unknown fields are errors too, as the API server's strict field validation makes them.
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("values", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_pod_is_locked_down(render: Render, values: dict[str, Any] | None) -> None:
    pods = pod_templates(render(values))
    assert pods
    for name, pod in pods:
        assert_locked_down(name, pod)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"logLevel": "verbose"}, "at '/logLevel': value must be one of"),
        ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
        ({"images": {"operator": {"pullPolicy": "Sometimes"}}}, "at '/images/operator/pullPolicy'"),
        ({"images": {"workers": {"repository": "has space"}}}, "at '/images/workers/repository'"),
        ({"images": {"operator": {"tag": 5}}}, "at '/images/operator/tag'"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"watchNamespaces": "team-a"}, "at '/watchNamespaces'"),
        ({"metrics": {"port": 70000}}, "at '/metrics/port'"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "at '/metrics/serviceMonitor/interval'"),
        ({"edge": {"tolerations": [{"key": "x", "effect": "Sometimes"}]}}, "at '/edge/tolerations/0/effect'"),
        ({"edge": {"nodeSelector": {"stratus.dev/edge": True}}}, "at '/edge/nodeSelector/stratus.dev~1edge'"),
        ({"cloud": {"gpuResourceName": "gpu"}}, "at '/cloud/gpuResourceName'"),
        ({"resources": {"limits": {"memory": "lots"}}}, "at '/resources/limits/memory'"),
        ({"securityContext": {"readOnlyRootFilesystem": "yes"}}, "at '/securityContext/readOnlyRootFilesystem'"),
        ({"podSecurityContext": {"runAsUser": -1}}, "at '/podSecurityContext/runAsUser'"),
        ({"networkPolicy": {"enabled": "true"}}, "at '/networkPolicy/enabled'"),
        ({"crds": {"install": False}}, "additional properties 'crds' not allowed"),
        ({"modelCache": {"hostPath": "relative/dir"}}, "at '/modelCache/hostPath'"),
        ({"compression": {"jobDeadlineSeconds": 0}}, "at '/compression/jobDeadlineSeconds'"),
        ({"workerLimit": -1}, "at '/workerLimit'"),
    ],
)
def test_bad_values_fail_install_with_the_path(render: Render, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert message in str(caught.value)


def test_inconsistent_values_fail_with_a_reason(render: Render) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"metrics\.port and healthPort must differ"):
        render({"metrics": {"port": 8080}, "healthPort": 8080})
    with pytest.raises(helm.HelmRenderError, match=r"serviceAccount\.name is required"):
        render({"serviceAccount": {"create": False, "name": ""}})


def test_schema_rejects_unknown_keys_at_every_level(chart: Any) -> None:
    """Every object in values.schema.json with known properties forbids others, so typos fail."""
    free_form = {"/global", "/affinity", "/networkPolicy/metricsFrom/items"}
    open_objects = []

    def walk(node: dict[str, Any], path: str) -> None:
        if "properties" in node and node.get("additionalProperties") is not False and path not in free_form:
            open_objects.append(path)
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}/{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}/items")

    walk(chart.schema, "")
    assert open_objects == []
    chart.validate_schema(chart.values)


def test_notes_tell_the_user_what_to_do_next(chart: Any) -> None:
    notes = chart.render(None, name="stratus", namespace=NAMESPACE)["stratus/templates/NOTES.txt"]
    assert "kubectl -n stratus-system rollout status deployment/stratus-operator" in notes
    assert "deploy/samples/smollm2.yaml" in notes
    assert "the whole cluster" in notes
    namespaced = chart.render({"watchNamespaces": ["team-a"]}, name="stratus", namespace=NAMESPACE)
    assert "the namespaces team-a" in namespaced["stratus/templates/NOTES.txt"]


def test_every_value_is_documented(chart: Any) -> None:
    """docs/install.md's table names every leaf of values.yaml (maps the user fills in count as leaves)."""
    docs = (CHART_DIR.parents[1] / "docs" / "install.md").read_text()

    def leaves(node: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for name, value in node.items():
            path = f"{prefix}{name}"
            if isinstance(value, dict) and value and name not in ("resources", "podSecurityContext",
                                                                   "securityContext", "nodeSelector"):
                out.extend(leaves(value, f"{path}."))
            else:
                out.append(path)
        return out

    missing = [leaf for leaf in leaves(chart.values, "") if f"`{leaf}`" not in docs]
    assert missing == []


def test_the_prometheus_adapter_rule_serves_the_metric_the_servers_export(render: Render) -> None:
    from prometheus_client import CollectorRegistry

    from stratus_operator.spec import Autoscaling
    from stratus_workers.serve.server import ServerMetrics

    assert not [o for o in render(None) if o["metadata"]["name"].endswith("prometheus-adapter")]
    (cm,) = [o for o in render({"autoscaling": {"prometheusAdapter": {"enabled": True}}})
             if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("prometheus-adapter")]
    import yaml

    (rule,) = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    default = Autoscaling.model_fields["queue_depth_metric"].default
    assert rule["name"]["as"] == default == "stratus_server_waiting_requests"
    assert rule["seriesQuery"].startswith(default + "{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # ... and it is a gauge every model server exports.
    registry: CollectorRegistry = ServerMetrics().registry
    exported = {(m.name, m.type) for m in registry.collect()}
    assert (default, "gauge") in exported
