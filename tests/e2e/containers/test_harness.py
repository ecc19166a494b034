"""The container suite's own parts, checked without Docker: the skip line and pod-to-`docker run` translation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from docker_pods import DockerCluster, PodError, engine_missing
from plan_adapter import Manifest, Rendered, load_deployment, operator_config, reconcile, tls_secret
from sample_stack import NAMESPACE, TOKENS_SECRET, router_config, sample_manifest, tokens_secret

pytestmark = pytest.mark.unit

IMAGE = "example.test/stratus-workers-edge:test"


def test_no_docker_is_one_skip_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert engine_missing() == "container suite skipped: docker is not installed"


def test_unreachable_engine_is_one_skip_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2\n"
                    "exit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = engine_missing()
    assert reason == ("container suite skipped: no Docker engine reachable "
                      "(Cannot connect to the Docker daemon at unix:///var/run/docker.sock.)")
    assert reason is not None and "\n" not in reason


@pytest.fixture(scope="module")
def rendered() -> Rendered:
    deployment = load_deployment(sample_manifest(), namespace=NAMESPACE)
    config = operator_config(IMAGE)
    return reconcile(deployment, config, {}, tls_secret(deployment, config))


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
