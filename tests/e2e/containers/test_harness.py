"""The container suite's own parts, checked without a Docker engine (they run under `make test`): the skip line,
the deployments it plans with the operator's own code, where it looks for the edge artifact, and the
pod-to-`docker run` translation."""

from __future__ import annotations

import copy
import shutil
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from docker_pods import DockerCluster, PodError, engine_missing
from plan_adapter import Manifest, Rendered, load_deployment, operator_config, reconcile, tls_secrets
from sample_stack import (
    COMPRESSION_SAMPLE,
    GGUF_VARIANT,
    NAMESPACE,
    TOKENS_SECRET,
    edge_artifact,
    gguf_manifest,
    router_config,
    sample_manifest,
    tokens_secret,
)

from stratus_operator.planner import CompressionResult
from stratus_workers.compress.spec import CompressionSummary
from stratus_workers.runtimes import RUNTIME_LLAMACPP, RUNTIME_TORCH

pytestmark = pytest.mark.unit

IMAGE = "example.test/stratus-workers-edge:test"


def test_no_docker_is_one_skip_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert engine_missing() == "container suite skipped: docker is not installed"


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker CLI (not an engine)")
def test_unreachable_engine_is_one_skip_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real docker CLI, pointed at a socket with nothing behind it: what a stopped daemon looks like.
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))  # bound, never listening: connect() is refused
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    reason = engine_missing()
    assert reason is not None and reason.startswith("container suite skipped: no Docker engine reachable (")
    assert str(path) in reason and "\n" not in reason


@pytest.fixture(scope="module")
def rendered() -> Rendered:
    deployment = load_deployment(sample_manifest(), namespace=NAMESPACE)
    config = operator_config(IMAGE)
    return reconcile(deployment, config, {}, tls_secrets(deployment, config))


def _accepted(name: str) -> CompressionResult:
    return CompressionResult(CompressionSummary(name=name, status="accepted", size_bytes=150_000_000,
                                                perplexity=13.2, perplexity_increase=0.004))


def _components(rendered: Rendered) -> list[str]:
    return sorted(o["metadata"]["labels"]["app.kubernetes.io/component"] for o in rendered.of_kind("Deployment"))


def test_the_gguf_deployment_is_the_sample_with_the_compression_samples_gguf_recipe() -> None:
    sample, gguf = sample_manifest(), gguf_manifest()
    [ours] = gguf["spec"]["edge"]["variants"]
    recipe = next(v for v in yaml.safe_load(COMPRESSION_SAMPLE.read_text())["spec"]["edge"]["variants"]
                  if v["name"] == GGUF_VARIANT)
    assert (ours["name"], ours["compression"], ours["gate"]) == (GGUF_VARIANT, recipe["compression"], recipe["gate"])
    # Everything else is the sample's: its evaluation sizes (minutes, not the compression sample's), serving,
    # placement, routing, and the client tokens the suite adds.
    [theirs] = sample["spec"]["edge"]["variants"]
    unchanged = copy.deepcopy(gguf)
    unchanged["spec"]["edge"]["variants"] = [{**ours, **{k: theirs[k] for k in ("name", "compression", "gate")}}]
    assert unchanged == sample
    assert ours["compression"]["quantization"]["method"] == "gguf"


@pytest.mark.parametrize(("manifest", "variant", "runtime"), [
    (sample_manifest, "int8", RUNTIME_TORCH), (gguf_manifest, GGUF_VARIANT, RUNTIME_LLAMACPP)])
def test_both_deployments_plan_a_job_then_an_edge_server_on_their_runtime(
        manifest: Callable[[], Manifest], variant: str, runtime: str) -> None:
    deployment = load_deployment(manifest(), namespace=NAMESPACE)
    config = operator_config(IMAGE)
    tls = tls_secrets(deployment, config)
    first = reconcile(deployment, config, {}, tls)
    assert [j.variant for j in first.plan.compression_jobs] == [variant]
    assert _components(first) == ["cloud-server", "router"], "while the Job runs"
    final = reconcile(deployment, config, {variant: _accepted(variant)}, tls)
    [planned] = final.plan.variants
    assert (planned.name, planned.state, planned.runtime) == (variant, "Accepted", runtime)
    assert _components(final) == ["cloud-server", "edge-server", "router"]


def test_the_edge_artifact_is_found_where_the_rendered_edge_server_reads_it(tmp_path: Path) -> None:
    deployment = load_deployment(gguf_manifest(), namespace=NAMESPACE)
    config = operator_config(IMAGE)
    final = reconcile(deployment, config, {GGUF_VARIANT: _accepted(GGUF_VARIANT)}, tls_secrets(deployment, config))
    found = edge_artifact(final, tmp_path / "claims")
    # The rendered edge server's --model, under the mount of the claim the Job wrote to.
    edge = next(d["spec"]["template"]["spec"] for d in final.of_kind("Deployment")
                if d["metadata"]["labels"]["app.kubernetes.io/component"] == "edge-server")
    container = edge["containers"][0]
    words = [*container["command"], *container.get("args", [])]
    model = words[words.index("--model") + 1]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in edge["volumes"] if "persistentVolumeClaim" in v]
    assert found.is_relative_to(tmp_path / "claims" / claims[0]) and len(claims) == 1
    assert found.name == Path(model).name and GGUF_VARIANT in found.parts


def _cluster(tmp_path: Path, rendered: Rendered) -> DockerCluster:
    cluster = DockerCluster("unit", tmp_path, NAMESPACE)
    for obj in rendered.objects:
        if obj["kind"] in ("ConfigMap", "Service"):
            cluster.objects[(obj["kind"], obj["metadata"]["name"])] = obj
    cluster.objects[("Secret", TOKENS_SECRET)] = tokens_secret()
    return cluster


def _template(rendered: Rendered, component: str) -> Manifest:
    return next(o["spec"]["template"] for o in rendered.objects if o["kind"] in ("Deployment", "Job")
                and o["metadata"]["labels"]["app.kubernetes.io/component"] == component)


def _argv(cluster: DockerCluster, template: Manifest) -> list[str]:
    spec = template["spec"]
    volumes = {v["name"]: ("bind", f"/host/{v['name']}", False) for v in spec["volumes"]}
    return cluster._run_argv("pod", "pod", spec, spec["containers"][0], template["metadata"]["labels"], volumes,
                             ["--network", "net"])


def _flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


@pytest.mark.parametrize("component", ["router", "cloud-server", "compress"])
def test_a_rendered_container_becomes_its_docker_run(component: str, rendered: Rendered, tmp_path: Path) -> None:
    template = _template(rendered, component)
    container = template["spec"]["containers"][0]
    argv = _argv(_cluster(tmp_path, rendered), template)
    command = [*container["command"], *container.get("args", [])]
    entry = argv.index("--entrypoint")
    assert argv[entry + 1:] == [command[0], IMAGE, *command[1:]], "the rendered command, word for word"
    assert _flag_values(argv, "--user") == ["65532:65532"] and _flag_values(argv, "--group-add") == ["65532"]
    assert "--read-only" in argv and _flag_values(argv, "--cap-drop") == ["ALL"]
    assert _flag_values(argv, "--security-opt") == ["no-new-privileges"] and "never" in _flag_values(argv, "--pull")
    destinations = {m.split("destination=")[1].split(",")[0] for m in _flag_values(argv, "--mount")}
    assert {m["mountPath"] for m in container["volumeMounts"]} <= destinations
    for env in container.get("env", []):
        assert f"{env['name']}={env['value']}" in _flag_values(argv, "--env")
    memory = container.get("resources", {}).get("limits", {}).get("memory")
    assert _flag_values(argv, "--memory") == ([str(8 * 2**30)] if memory == "8Gi" else [])


def test_read_only_mounts_stay_read_only(rendered: Rendered, tmp_path: Path) -> None:
    argv = _argv(_cluster(tmp_path, rendered), _template(rendered, "router"))
    mounts = {m.split("destination=")[1].split(",")[0]: m for m in _flag_values(argv, "--mount")}
    assert mounts["/etc/stratus"].endswith(",readonly") and mounts["/etc/stratus-tls"].endswith(",readonly")
    assert not mounts["/tmp"].endswith(",readonly")


def test_services_become_the_aliases_the_router_dials(rendered: Rendered, tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, rendered)
    labels = _template(rendered, "cloud-server")["metadata"]["labels"]
    aliases = cluster._aliases(labels)
    backends = [b["address"].rsplit(":", 1)[0] for b in router_config(rendered)["backends"]]
    assert backends and set(backends) <= set(aliases)
    assert cluster._aliases({"app.kubernetes.io/component": "nothing"}) == []


def test_an_unmapped_volume_source_is_refused_by_name(rendered: Rendered, tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, rendered)
    spec = {"volumes": [{"name": "odd", "csi": {"driver": "x"}}]}
    with pytest.raises(PodError, match="volume odd has a source this harness does not map: \\['csi', 'name'\\]"):
        cluster._volumes("pod", spec)


def test_config_and_secret_files_keep_their_modes(rendered: Rendered, tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, rendered)
    router = _template(rendered, "router")["spec"]
    tokens = next(v for v in router["volumes"] if v["name"] == "tokens")
    kind, source, read_only = cluster._volumes("pod", {"volumes": [tokens], "securityContext": {"fsGroup": 65532}})[
        "tokens"]
    assert (kind, read_only) == ("bind", True)
    written = Path(source) / "tokens"
    assert written.read_text() == "e2e-token\n"
    expected = tokens["secret"]["defaultMode"] if written.stat().st_uid == 0 and written.stat().st_gid == 65532 \
        else 0o444
    assert stat.S_IMODE(written.stat().st_mode) == expected
