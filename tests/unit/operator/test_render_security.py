"""Pod security of every rendered pod, mTLS and bearer-token wiring, the router's tokenizer."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from samples import ROOT, SAMPLES, all_accepted

from stratus_operator.placement import ClusterView
from stratus_operator.planner import Plan, Source, plan
from stratus_operator.render import RenderOptions, SecretRefs, render_cleanup, render_plan
from stratus_operator.spec import LLMDeployment
from stratus_workers.router.config import RouterConfig
from stratus_workers.router.server import RouterSettings
from stratus_workers.serve.server import ServerSettings
from stratus_workers.settings import parse_config

pytestmark = pytest.mark.unit

SOURCES = ["bundled://smollm2-135m-instruct", "s3://bucket/models/smol", "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
           "pvc://models-claim/smollm2", "/opt/models/smol"]
STORAGES: list[dict[str, Any]] = [{}, {"objectStore": {"url": "s3://models/stratus", "secretName": "s3-creds"}},
                                  {"pvc": {"claimName": "shared"}}]
# The volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def load(path: Path = ROOT / "deploy" / "samples" / "smollm2.yaml", **spec: Any) -> LLMDeployment:
    m = yaml.safe_load(path.read_text())
    m["metadata"].update(uid="11111111-2222-3333-4444-555555555555", namespace="team-a")
    m["spec"].update(spec)
    return LLMDeployment.from_manifest(m)


def render(p: Plan, d: LLMDeployment, options: RenderOptions | None = None) -> list[dict[str, Any]]:
    return render_plan(p, d, options or RenderOptions())


def every_object(d: LLMDeployment, options: RenderOptions) -> list[dict[str, Any]]:
    accepted = all_accepted(d)
    objects = render(plan(d, ClusterView.local(), accepted), d, options) + render(plan(d, ClusterView.local(), {}),
                                                                                  d, options)
    return objects + render_cleanup(d, options)


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
            for o in objects if o["kind"] in ("Deployment", "Job")]


def cases() -> list[LLMDeployment]:
    out = [load(sample) for sample in SAMPLES]
    out += [load(model={"source": s}, storage=st) for s, st in itertools.product(SOURCES, STORAGES)]
    out.append(load(security={"clientTls": True, "clientTokens": {"secretName": "device-tokens"}}))
    out.append(load(security={"mtls": False}))
    return out


@pytest.mark.parametrize("options", [RenderOptions(), RenderOptions(cache_host_path="")], ids=["hostPath", "emptyDir"])
def test_every_pod_runs_non_root_read_only_without_capabilities(options: RenderOptions) -> None:
    checked = 0
    for d in cases():
        for where, pod in pod_specs(every_object(d, options)):
            ctx = pod["securityContext"]
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 65532 != 0, where
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert {"name": "tmp", "emptyDir": {}} in pod["volumes"], where
            for c in pod.get("initContainers", []) + pod["containers"]:
                sc = c["securityContext"]
                assert sc["runAsNonRoot"] is True and isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
                assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
                assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
                assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
                assert sc.get("privileged") is not True
                assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], (where, c["name"])
                checked += 1
            for v in pod["volumes"]:
                # Never a hostPath the kubelet would create root-owned.
                assert v.get("hostPath", {}).get("type") in (None, "Directory"), where
                if not options.cache_host_path:
                    assert set(v) - {"name"} <= RESTRICTED_VOLUMES, (where, v)
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod},
                                         "1.31", strict=True)
    assert checked > 150


def test_only_fetched_models_use_the_cache() -> None:
    bundled = every_object(load(), RenderOptions())
    for where, pod in pod_specs(bundled):
        if where.startswith("Deployment/"):
            assert not any(v["name"] == "cache" for v in pod["volumes"]), where
            assert not any(e["name"] == "STRATUS_CACHE_DIR" for e in pod["containers"][0]["env"]), where
    s3 = dict(pod_specs(every_object(load(model={"source": "s3://bucket/m"}), RenderOptions(cache_host_path=""))))
    cloud = s3["Deployment/smollm2-cloud"]
    assert {"name": "cache", "emptyDir": {}} in cloud["volumes"]
    assert cloud["initContainers"][0]["name"] == "fetch-model"


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_mtls_flags_and_mounts_parse_with_the_workers() -> None:
    d = load(security={"clientTls": True, "clientTokens": {"secretName": "device-tokens", "key": "list"}})
    hashes = {"smollm2-cloud": "c1", "smollm2-edge-int8": "e1", "smollm2-router": "r1"}
    objects = render_plan(plan(d, ClusterView.local(), all_accepted(d)), d, RenderOptions(),
                          SecretRefs.of(d, hashes))
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert set(deployments) == {"smollm2-cloud", "smollm2-edge-int8", "smollm2-router"}
    for name, dep in deployments.items():
        template = dep["spec"]["template"]
        pod = template["spec"]
        command = pod["containers"][0]["command"]
        assert (flag(command, "--tls-cert"), flag(command, "--tls-key"), flag(command, "--tls-ca")) == (
            "/etc/stratus-tls/tls.crt", "/etc/stratus-tls/tls.key", "/etc/stratus-tls/ca.crt")
        tls = next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]
        # Each pod mounts its own certificate; none mounts the CA's Secret (smollm2-ca).
        assert tls["secretName"] == f"{name}-tls"
        assert [i["key"] for i in tls["items"]] == ["tls.crt", "tls.key", "ca.crt"]
        assert not any(v.get("secret", {}).get("secretName") == "smollm2-ca" for v in pod["volumes"])
        mounts = pod["containers"][0]["volumeMounts"]
        assert {"name": "tls", "mountPath": "/etc/stratus-tls", "readOnly": True} in mounts
        assert template["metadata"]["annotations"]["stratus.dev/tls-hash"] == hashes[name]
        if name == "smollm2-router":
            settings = parse_config(RouterSettings, command[3:])
            assert settings.client_tls and settings.tokens_file == "/etc/stratus-tokens/tokens"
            assert settings.tls_ca == "/etc/stratus-tls/ca.crt"
            tokens = next(v for v in pod["volumes"] if v["name"] == "tokens")["secret"]
            assert tokens == {"secretName": "device-tokens", "defaultMode": 0o440,
                              "items": [{"key": "list", "path": "tokens"}]}
            mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "tokens")
            assert "subPath" not in mount  # a subPath mount would never see a rotated Secret
        else:
            config = parse_config(ServerSettings, command[3:])
            assert config.tls_cert == "/etc/stratus-tls/tls.crt" and config.tls_ca == "/etc/stratus-tls/ca.crt"


def test_mtls_off_and_default_secret_name() -> None:
    off = load(security={"mtls": False})
    for _, pod in pod_specs(render(plan(off, ClusterView.local(), {}), off)):
        assert "--tls-cert" not in pod["containers"][0]["command"]
        assert not any(v["name"] == "tls" for v in pod["volumes"])
    on = load()
    for _, pod in pod_specs(render(plan(on, ClusterView.local(), {}), on)):
        if pod["containers"][0]["name"] in ("server", "router"):
            assert "--client-tls" not in pod["containers"][0]["command"]
            secret = next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]["secretName"]
            assert secret in ("smollm2-cloud-tls", "smollm2-edge-int8-tls", "smollm2-router-tls")
    mine = load(security={"tlsSecretName": "corp-certs"})
    router = next(o for o in render(plan(mine, ClusterView.local(), {}), mine) if o["kind"] == "Deployment"
                  and o["metadata"]["name"] == "smollm2-router")
    volumes = router["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("secret", {}).get("secretName") == "corp-certs" for v in volumes)


@pytest.mark.parametrize(("source", "tokenizer", "init"), [
    ("bundled://smollm2-135m-instruct", "bundled://smollm2-135m-instruct", None),
    ("pvc://models-claim/smollm2", "/models/models-claim/smollm2", None),
    ("/opt/models/smol", "/opt/models/smol", None),
    ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", "/cache/tokenizer", "allow_patterns=['tokenizer*'"),
    ("s3://bucket/models/smol", "/cache/tokenizer", "--include 'tokenizer*' --include"),
])
def test_router_gets_the_models_tokenizer(source: str, tokenizer: str, init: str | None) -> None:
    d = load(model={"source": source}, routing={"policy": "speculative"})
    p = plan(d, ClusterView.local(), all_accepted(d))
    assert p.router is not None and p.router.tokenizer == Source(source)  # the planner names the model
    objects = render(p, d)
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "smollm2-router")
    assert RouterConfig.model_validate_json(cm["data"]["router.json"]).tokenizer == tokenizer
    pod = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "smollm2-router")[
        "spec"]["template"]["spec"]
    if init is None:
        assert "initContainers" not in pod
    else:
        assert init in pod["initContainers"][0]["command"][-1]
        assert {"name": "cache", "mountPath": "/cache", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    if source.startswith("pvc://"):
        assert {"name": "model-source", "mountPath": "/models/models-claim", "readOnly": True} in pod["containers"][0][
            "volumeMounts"]
