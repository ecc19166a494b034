"""Each validation rule of the emulator refuses a broken object with the API server's words, and accepts it fixed.

The cases are the valid objects of harness_objects.py with one field broken; the same object without the break
must be accepted, so a rule that refuses everything fails here as surely as one that refuses nothing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
from harness_objects import deployment, pod
from kube_emulator import CONFIGMAPS, DEPLOYMENTS, HPAS, JOBS, LLMD, PODS, PVCS, SECRETS, SERVICES, ApiError, Emulator
from kube_emulator.keys import Key
from operator_harness import ROOT

pytestmark = pytest.mark.unit

Break = Callable[[dict[str, Any]], None]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"] if "template" in obj["spec"] else obj["spec"]  # type: ignore[no-any-return]


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    return _pod_spec(obj)["containers"][0]  # type: ignore[no-any-return]


def job() -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "compress"},
            "spec": {"backoffLimit": 2, "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "compress", "image": "workers:1"}]}}}}


def service() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc"}]}}


def claim() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}


def hpa() -> dict[str, Any]:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "web"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                     "minReplicas": 1, "maxReplicas": 3,
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                         "type": "Utilization", "averageUtilization": 70}}}]}}


def configmap() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"router.json": "{}"}}


def _set(path: str, value: Any) -> Break:
    def apply(obj: dict[str, Any]) -> None:
        node: Any = obj
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[parts[-1]] = value
    return apply


def _mount(name: str) -> Break:
    def apply(obj: dict[str, Any]) -> None:
        _container(obj)["volumeMounts"] = [{"name": name, "mountPath": "/cache"}]
    return apply


def _init_mount(obj: dict[str, Any]) -> None:
    _pod_spec(obj)["initContainers"] = [{"name": "fetch", "image": "aws:1",
                                         "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}]


def _resources(requests: dict[str, str], limits: dict[str, str]) -> Break:
    def apply(obj: dict[str, Any]) -> None:
        _container(obj)["resources"] = {"requests": requests, "limits": limits}
    return apply


def _tolerations(*items: dict[str, Any]) -> Break:
    def apply(obj: dict[str, Any]) -> None:
        _pod_spec(obj)["tolerations"] = list(items)
    return apply


def _match_fields(*nodes: str) -> Break:
    def apply(obj: dict[str, Any]) -> None:
        _pod_spec(obj)["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In",
                                                    "values": list(nodes)}]}]}}}
    return apply


def _strategy(strategy: dict[str, Any]) -> Break:
    def apply(obj: dict[str, Any]) -> None:
        obj["spec"]["strategy"] = strategy
    return apply


LONG = "a" * 64
# (what, resource, valid object, break it, fix it back or None for "the valid object", words of the refusal)
CASES: list[tuple[str, Key, Callable[[], dict[str, Any]], Break, Break | None, str]] = [
    ("volumeMount names no volume", DEPLOYMENTS, deployment, _mount("cache"),
     lambda o: (_mount("cache")(o), _set("spec.template.spec.volumes", [{"name": "cache", "emptyDir": {}}])(o)),
     'spec.template.spec.containers[0].volumeMounts[0].name: Not found: "cache"'),
    ("an init container's mount names no volume", DEPLOYMENTS, deployment, _init_mount,
     lambda o: (_init_mount(o), _set("spec.template.spec.volumes", [{"name": "cache", "emptyDir": {}}])(o)),
     'spec.template.spec.initContainers[0].volumeMounts[0].name: Not found: "cache"'),
    ("GPU request differs from its limit", DEPLOYMENTS, deployment,
     _resources({"nvidia.com/gpu": "2"}, {"nvidia.com/gpu": "1"}),
     _resources({"nvidia.com/gpu": "1"}, {"nvidia.com/gpu": "1"}), "must be equal to nvidia.com/gpu limit of 1"),
    ("GPU requested without a limit", DEPLOYMENTS, deployment, _resources({"nvidia.com/gpu": "1"}, {}),
     _resources({"nvidia.com/gpu": "1"}, {"nvidia.com/gpu": "1"}),
     "resources.limits: Required value: Limit must be set for non overcommitable resources"),
    ("fractional GPU", DEPLOYMENTS, deployment, _resources({"nvidia.com/gpu": "500m"}, {"nvidia.com/gpu": "500m"}),
     None, "must be an integer"),
    ("cpu request above its limit", DEPLOYMENTS, deployment, _resources({"cpu": "2"}, {"cpu": "1"}),
     _resources({"cpu": "1"}, {"cpu": "2"}), "must be less than or equal to cpu limit of 1"),
    ("name with a dot for a Service", SERVICES, service, _set("metadata.name", "smollm2.v2-router"), None,
     "a DNS-1035 label must consist of lower case alphanumeric characters"),
    ("Service name with a leading digit", SERVICES, service, _set("metadata.name", "135m-router"), None,
     "a DNS-1035 label"),
    ("Deployment name with upper case", DEPLOYMENTS, deployment, _set("metadata.name", "Web"), None,
     "a lowercase RFC 1123 subdomain"),
    ("label value over 63 characters", CONFIGMAPS, configmap, _set("metadata.labels", {"app": LONG}),
     _set("metadata.labels", {"app": LONG[:63]}), "must be no more than 63 characters"),
    ("label value with a space", CONFIGMAPS, configmap, _set("metadata.labels", {"app": "a b"}),
     _set("metadata.labels", {"app": "a_b"}), "a valid label must be an empty string or consist of"),
    ("label key with two slashes", CONFIGMAPS, configmap, _set("metadata.labels", {"a/b/c": "x"}),
     _set("metadata.labels", {"a.io/c": "x"}), "metadata.labels: Invalid value: \"a/b/c\""),
    ("Job name over 63 characters (its pods' job-name label)", JOBS, job, _set("metadata.name", LONG),
     _set("metadata.name", LONG[:63]), "must be no more than 63 characters"),
    ("toleration Exists with a value", DEPLOYMENTS, deployment,
     _tolerations({"key": "gpu", "operator": "Exists", "value": "yes", "effect": "NoSchedule"}),
     _tolerations({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}),
     "value must be empty when `operator` is 'Exists'"),
    ("node field selector with two nodes", DEPLOYMENTS, deployment, _match_fields("edge-1", "edge-2"),
     _match_fields("edge-1"), "must be only one value when `operator` is 'In' or 'NotIn' for node field selector"),
    ("maxSurge and maxUnavailable both 0", DEPLOYMENTS, deployment,
     _strategy({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}),
     _strategy({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
     "may not be 0 when `maxSurge` is 0"),
    ("Recreate with rollingUpdate left in", DEPLOYMENTS, deployment,
     _strategy({"type": "Recreate", "rollingUpdate": {"maxSurge": 1}}), _strategy({"type": "Recreate"}),
     "may not be specified when strategy `type` is 'Recreate'"),
    ("selector that does not match the template", DEPLOYMENTS, deployment,
     _set("spec.selector", {"matchLabels": {"app": "other"}}), None, "`selector` does not match template `labels`"),
    ("Deployment pods that do not restart", DEPLOYMENTS, deployment, _set("spec.template.spec.restartPolicy", "Never"),
     _set("spec.template.spec.restartPolicy", "Always"), 'Unsupported value: "Never"'),
    ("Job without a restart policy", JOBS, job, lambda o: o["spec"]["template"]["spec"].pop("restartPolicy"), None,
     "spec.template.spec.restartPolicy: Required value"),
    ("Job restarting Always", JOBS, job, _set("spec.template.spec.restartPolicy", "Always"), None,
     'Unsupported value: "Always"'),
    ("pod failure policy naming no container", JOBS, job,
     _set("spec.podFailurePolicy", {"rules": [{"action": "FailJob", "onExitCodes": {
         "containerName": "missing", "operator": "In", "values": [3]}}]}),
     lambda o: (_set("spec.podFailurePolicy", {"rules": [{"action": "FailJob", "onExitCodes": {
         "containerName": "fetch", "operator": "In", "values": [3]}}]})(o),
                _set("spec.template.spec.initContainers", [{"name": "fetch", "image": "aws:1"}])(o)),
     "must be one of the container or initContainer names in the pod template"),
    ("container without an image", PODS, pod, lambda o: o["spec"]["containers"][0].pop("image"), None,
     "spec.containers[0].image: Required value"),
    ("two volumes of one name", PODS, pod, _set("spec.volumes", [{"name": "v", "emptyDir": {}},
                                                                  {"name": "v", "emptyDir": {}}]),
     _set("spec.volumes", [{"name": "v", "emptyDir": {}}, {"name": "w", "emptyDir": {}}]),
     'spec.volumes[1].name: Duplicate value: "v"'),
    ("hostPath type unknown", PODS, pod, _set("spec.volumes", [{"name": "v", "hostPath": {"path": "/x",
                                                                                         "type": "Dir"}}]),
     _set("spec.volumes", [{"name": "v", "hostPath": {"path": "/x", "type": "Directory"}}]),
     'spec.volumes[0].hostPath.type: Unsupported value: "Dir"'),
    ("secret defaultMode beyond 0777", PODS, pod,
     _set("spec.volumes", [{"name": "v", "secret": {"secretName": "s", "defaultMode": 4096}}]),
     _set("spec.volumes", [{"name": "v", "secret": {"secretName": "s", "defaultMode": 0o440}}]),
     "must be a number between 0 and 0777"),
    ("Service with two unnamed ports", SERVICES, service,
     _set("spec.ports", [{"port": 1}, {"port": 2}]), _set("spec.ports", [{"name": "a", "port": 1},
                                                                         {"name": "b", "port": 2}]),
     "spec.ports[1].name: Required value"),
    ("claim without access modes", PVCS, claim, _set("spec.accessModes", []), None,
     "spec.accessModes: Required value"),
    ("claim with an unknown access mode", PVCS, claim, _set("spec.accessModes", ["ReadWriteSometimes"]), None,
     'Unsupported value: "ReadWriteSometimes"'),
    ("claim without a size", PVCS, claim, lambda o: o["spec"].pop("resources"), None,
     "spec.resources[storage]: Required value"),
    ("HPA min above max", HPAS, hpa, _set("spec.minReplicas", 5), None,
     "spec.maxReplicas: Invalid value: 3: must be greater than or equal to `minReplicas`"),
    ("ConfigMap key with a slash", CONFIGMAPS, configmap, _set("data", {"a/b": "x"}), None,
     "a valid config key must consist of alphanumeric characters"),
    ("Secret data not base64", SECRETS, lambda: {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                                                 "data": {"k": "eA=="}},
     _set("data", {"k": "not base64!"}), None, "illegal base64 data"),
]


@pytest.mark.parametrize(("what", "key", "make", "breaks", "fix", "words"), CASES, ids=[c[0] for c in CASES])
async def test_rule_refuses_the_broken_object_and_accepts_the_fixed_one(
        emu: Emulator, what: str, key: Key, make: Callable[[], dict[str, Any]], breaks: Break, fix: Break | None,
        words: str) -> None:
    bad = make()
    breaks(bad)
    with pytest.raises(ApiError) as refused:
        await emu.create_obj(key, "default", bad)
    assert refused.value.code in (400, 422), refused.value.message
    assert words in refused.value.message, refused.value.message
    good = make()
    if fix is not None:
        fix(good)
    await emu.create_obj(key, "default", good)


async def test_refusal_is_a_status_with_causes_naming_the_field(emu: Emulator) -> None:
    bad = deployment()
    _mount("cache")(bad)
    with pytest.raises(ApiError) as refused:
        await emu.create_obj(DEPLOYMENTS, "default", bad)
    status = refused.value.status()
    assert status == {
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "reason": "Invalid", "code": 422,
        "message": 'Deployment.apps "web" is invalid: spec.template.spec.containers[0].volumeMounts[0].name: '
                   'Not found: "cache"',
        "details": {"name": "web", "group": "apps", "kind": "Deployment", "causes": [
            {"reason": "FieldValueNotFound", "message": 'Not found: "cache"',
             "field": "spec.template.spec.containers[0].volumeMounts[0].name"}]}}


async def test_several_errors_are_listed_together(emu: Emulator) -> None:
    bad = deployment()
    _mount("cache")(bad)
    _resources({"nvidia.com/gpu": "1"}, {})(bad)
    with pytest.raises(ApiError) as refused:
        await emu.create_obj(DEPLOYMENTS, "default", bad)
    message = refused.value.message
    assert message.startswith('Deployment.apps "web" is invalid: [') and message.endswith("]")
    assert 'Not found: "cache"' in message and "Limit must be set" in message


IMMUTABLE: list[tuple[str, Key, Callable[[], dict[str, Any]], dict[str, Any], str]] = [
    ("Deployment selector", DEPLOYMENTS, deployment,
     {"spec": {"selector": {"matchLabels": {"app": "web", "tier": "x"}},
               "template": {"metadata": {"labels": {"app": "web", "tier": "x"}}}}},
     "spec.selector: Invalid value: v1.LabelSelector{...}: field is immutable"),
    ("Job template", JOBS, job, {"spec": {"template": {"spec": {"containers": [
        {"name": "compress", "image": "workers:2"}]}}}}, "spec.template: Invalid value: core.PodTemplateSpec{...}: "
                                                          "field is immutable"),
    ("PVC access modes", PVCS, claim, {"spec": {"accessModes": ["ReadWriteMany"]}},
     "spec: Forbidden: spec is immutable after creation except resources.requests"),
    ("PVC storage class", PVCS, claim, {"spec": {"storageClassName": "fast"}},
     "spec: Forbidden: spec is immutable after creation"),
    ("Service clusterIP", SERVICES, service, {"spec": {"clusterIP": "10.0.0.99"}}, "may not change once set"),
    ("immutable ConfigMap data", CONFIGMAPS, lambda: {**configmap(), "immutable": True},
     {"data": {"router.json": "{\"a\": 1}"}}, "data: Forbidden: field is immutable when `immutable` is set"),
    ("immutable Secret flag", SECRETS, lambda: {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                                                "immutable": True, "data": {"k": "eA=="}},
     {"immutable": False}, "immutable: Forbidden: field is immutable when `immutable` is set"),
]


@pytest.mark.parametrize(("what", "key", "make", "patch", "words"), IMMUTABLE, ids=[c[0] for c in IMMUTABLE])
async def test_immutable_field_refused_on_change(emu: Emulator, what: str, key: Key,
                                                 make: Callable[[], dict[str, Any]], patch: dict[str, Any],
                                                 words: str) -> None:
    created = await emu.create_obj(key, "default", make())
    name = created["metadata"]["name"]
    with pytest.raises(ApiError) as refused:
        await emu.patch_obj(key, "default", name, patch)
    assert refused.value.code == 422 and words in refused.value.message, refused.value.message
    # The same field patched to what it already is, and a mutable field beside it, go through.
    await emu.patch_obj(key, "default", name, {"metadata": {"labels": {"touched": "yes"}}})
    assert (emu.read(key, "default", name) or {})["metadata"]["labels"]["touched"] == "yes"


async def test_pvc_may_grow_once_bound_but_never_shrink(emu: Emulator) -> None:
    await emu.create_obj(PVCS, "default", claim())
    with pytest.raises(ApiError, match="for bound claims"):
        await emu.patch_obj(PVCS, "default", "data", {"spec": {"resources": {"requests": {"storage": "2Gi"}}}})
    await emu.patch_status(PVCS, "default", "data", {"phase": "Bound"})
    await emu.patch_obj(PVCS, "default", "data", {"spec": {"resources": {"requests": {"storage": "2Gi"}}}})
    with pytest.raises(ApiError, match="can not be less than"):
        await emu.patch_obj(PVCS, "default", "data", {"spec": {"resources": {"requests": {"storage": "1Gi"}}}})


async def test_job_gets_its_generated_selector_and_pod_labels(emu: Emulator) -> None:
    created = await emu.create_obj(JOBS, "default", job())
    uid = created["metadata"]["uid"]
    assert created["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    assert created["spec"]["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "compress"


async def test_service_gets_a_cluster_ip_that_a_later_write_without_it_keeps(emu: Emulator) -> None:
    created = await emu.create_obj(SERVICES, "default", service())
    ip = created["spec"]["clusterIP"]
    assert ip and created["spec"]["ports"][0]["protocol"] == "TCP"
    replaced = await emu.update_obj(SERVICES, "default", "web", {**service(), "metadata": {"name": "web"}})
    assert replaced["spec"]["clusterIP"] == ip


def _sample() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())  # type: ignore[no-any-return]


async def test_custom_resource_schema_and_cel_rules(emu: Emulator) -> None:
    bad = _sample()
    bad["spec"]["cloud"]["tensorParallel"] = 4
    with pytest.raises(ApiError) as refused:
        await emu.create_obj(LLMD, "default", bad)
    assert refused.value.message == ('LLMDeployment.stratus.dev "smollm2" is invalid: spec.cloud: Invalid value: '
                                     '"object": tensorParallel cannot exceed gpusPerPod')
    # Stages of tensor-parallel groups: one GPU a rank, all in the pod.
    crowded = _sample()
    crowded["spec"]["cloud"].update(gpusPerPod=2, tensorParallel=2, pipelineParallel=2)
    with pytest.raises(ApiError, match="tensorParallel times pipelineParallel cannot exceed gpusPerPod"):
        await emu.create_obj(LLMD, "default", crowded)
    wrong_type = _sample()
    wrong_type["spec"]["cloud"]["replicas"] = "two"
    with pytest.raises(ApiError, match=re.escape('spec.cloud.replicas in body must be of type integer: "string"')):
        await emu.create_obj(LLMD, "default", wrong_type)
    unknown_enum = _sample()
    unknown_enum["spec"]["routing"]["policy"] = "random"
    with pytest.raises(ApiError, match=re.escape('spec.routing.policy: Unsupported value: "random"')):
        await emu.create_obj(LLMD, "default", unknown_enum)
    fits = _sample()
    fits["metadata"]["name"] = "smollm2-pp"
    fits["spec"]["cloud"].update(gpusPerPod=4, tensorParallel=2, pipelineParallel=2)
    await emu.create_obj(LLMD, "default", fits)
    created = await emu.create_obj(LLMD, "default", _sample())
    # Structural defaults are filled in, as the API server stores them.
    assert created["spec"]["cloud"]["serving"]["maxPromptTokens"] == 2048


async def test_custom_resource_unknown_fields_refused_when_strict_and_dropped_otherwise(emu: Emulator) -> None:
    extra = _sample()
    extra["spec"]["cloud"]["replicaz"] = 2
    with pytest.raises(ApiError) as refused:
        await emu.create_obj(LLMD, "default", extra)
    assert refused.value.code == 400 and 'unknown field "spec.cloud.replicaz"' in refused.value.message
    with emu.acting_as("kubectl", field_validation="Warn") as request:
        created = await emu.create_obj(LLMD, "default", copy.deepcopy(extra))
    assert "replicaz" not in created["spec"]["cloud"]
    assert request.warnings == ['unknown field "spec.cloud.replicaz"']


async def test_custom_resource_status_is_validated_on_the_status_subresource(emu: Emulator) -> None:
    await emu.create_obj(LLMD, "default", _sample())
    with pytest.raises(ApiError, match=re.escape('status.phase: Unsupported value: "Sleeping"')):
        await emu.patch_status(LLMD, "default", "smollm2", {"phase": "Sleeping"})
    # Non-nullable fields sent as null are dropped (a merge patch's nulls inside lists), not refused.
    await emu.patch_status(LLMD, "default", "smollm2", {"phase": "Pending", "variants": [
        {"name": "int8", "state": "Pending", "sizeBytes": None}]})


async def test_ratcheting_lets_unchanged_invalid_parts_through(emu: Emulator) -> None:
    bad = _sample()
    bad["spec"]["cloud"]["tensorParallel"] = 4
    await emu.create_obj(LLMD, "default", bad, validate=False)
    emu.unvalidated.clear()  # from here on, the object is held to the schema like any other
    await emu.patch_obj(LLMD, "default", "smollm2", {"metadata": {"finalizers": ["stratus.dev/cleanup"]}})
    with pytest.raises(ApiError, match="tensorParallel cannot exceed gpusPerPod"):
        await emu.patch_obj(LLMD, "default", "smollm2", {"spec": {"cloud": {"tensorParallel": 3}}})
