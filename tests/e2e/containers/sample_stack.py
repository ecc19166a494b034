"""The sample deployed as containers: which images, the two reconcile passes, and how tests reach the router."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from docker_pods import DockerCluster, JobRun
from plan_adapter import (
    REPO,
    Manifest,
    Rendered,
    TLSSecrets,
    compression_result,
    load_deployment,
    operator_config,
    reconcile,
    tls_secrets,
)

from stratus_workers.client import Client

# The images `make images` builds (the Makefile passes its variables through).
OPERATOR_IMAGE = "ghcr.io/stratus-llm/stratus-operator:0.1.0"
EDGE_IMAGE = "ghcr.io/stratus-llm/stratus-workers-edge:0.1.0"
CLOUD_IMAGE = "ghcr.io/stratus-llm/stratus-workers-cloud:0.1.0"
SAMPLE = REPO / "deploy" / "samples" / "smollm2.yaml"
# The sample's edge variant is int8 (torch). The GGUF stack serves the same deployment with the compression
# sample's GGUF variant in its place, so the edge image's llama.cpp runs in a pod as rendered too.
COMPRESSION_SAMPLE = REPO / "deploy" / "samples" / "smollm2-compression.yaml"
GGUF_VARIANT = "gguf-q8"
NAMESPACE = "stratus-e2e"
TOKENS_SECRET = "smollm2-client-tokens"
# Compression of the sample's int8 variant on a shared 2-core machine takes minutes; model loads take seconds.
JOB_TIMEOUT_S = 1800
READY_TIMEOUT_S = 600
BACKENDS_TIMEOUT_S = 120
TIMINGS_DIR = REPO / "build" / "images"


def image_present(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode == 0


@dataclass(frozen=True)
class Images:
    operator: str
    edge: str
    cloud: str | None  # None: not built here (CUDA torch); cloud pods run in the edge image on the CPU

    @classmethod
    def from_env(cls) -> Images:
        cloud = os.environ.get("CLOUD_IMAGE") or CLOUD_IMAGE
        return cls(os.environ.get("OPERATOR_IMAGE") or OPERATOR_IMAGE, os.environ.get("EDGE_IMAGE") or EDGE_IMAGE,
                   cloud if image_present(cloud) else None)

    def missing(self) -> list[str]:
        return [i for i in (self.operator, self.edge) if not image_present(i)]

    def image_for(self, labels: Mapping[str, str], image: str) -> str:
        # The operator renders one workers image today; the cloud tier takes the CUDA flavour when it is built.
        if labels.get("app.kubernetes.io/component") == "cloud-server" and self.cloud is not None:
            return self.cloud
        return image


@dataclass
class Stack:
    """What was rendered, the running cluster, and how to reach the router."""

    cluster: DockerCluster
    first: Rendered
    final: Rendered
    job: JobRun
    job_exit: int
    job_message: str
    tls: TLSSecrets
    token: str
    images: Images
    timings: dict[str, float] = field(default_factory=dict)

    def owner(self, component: str) -> str:
        """The Deployment name of a component (cloud-server, edge-server, router) in the final plan."""
        found = [d["metadata"]["name"] for d in self.final.of_kind("Deployment")
                 if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        assert len(found) == 1, (component, found)
        return found[0]

    def ip(self, component: str) -> str:
        return self.cluster.pods[self.owner(component)][0].ip

    @property
    def router_grpc(self) -> str:
        return f"{self.ip('router')}:50051"

    @property
    def router_http(self) -> str:
        return f"http://{self.ip('router')}:8080"

    def tls_bytes(self, key: str) -> bytes:
        # The router's certificate: the one issued for client use too.
        router = self.final.plan.router
        assert router is not None
        return base64.b64decode(self.tls.of(router.name)["data"][key])


def server_channel(stack: Stack, component: str, *, client_cert: bool) -> grpc.Channel:
    """A gRPC channel straight to a model server, past the router, with the CA the operator issued (and its
    client certificate when `client_cert`), checking the server's name as its Service."""
    key = stack.tls_bytes("tls.key") if client_cert else None
    cert = stack.tls_bytes("tls.crt") if client_cert else None
    credentials = grpc.ssl_channel_credentials(stack.tls_bytes("ca.crt"), key, cert)
    host = f"{stack.owner(component)}.{NAMESPACE}.svc"
    return grpc.secure_channel(f"{stack.ip(component)}:50051", credentials,
                               options=[("grpc.ssl_target_name_override", host)])


def sample_manifest() -> Manifest:
    """The sample as it is, plus a client-token Secret for the router (docs/cooperation.md)."""
    manifest: Manifest = yaml.safe_load(SAMPLE.read_text())
    manifest["spec"].setdefault("security", {})["clientTokens"] = {"secretName": TOKENS_SECRET}
    return manifest


def gguf_manifest() -> Manifest:
    """The sample with its edge variant served by llama.cpp: the compression sample's GGUF recipe and gate in
    place of int8; the sample's evaluation sizes, serving limits and placement stay."""
    manifest = sample_manifest()
    variants = yaml.safe_load(COMPRESSION_SAMPLE.read_text())["spec"]["edge"]["variants"]
    gguf = next(v for v in variants if v["name"] == GGUF_VARIANT)
    [variant] = manifest["spec"]["edge"]["variants"]
    variant.update(name=gguf["name"], compression=gguf["compression"], gate=gguf["gate"])
    return manifest


def edge_artifact(rendered: Rendered, claims: Path) -> Path:
    """Where the edge server reads its artifact (its rendered --model), found on the claim's host folder."""
    edge = next(d["spec"]["template"]["spec"] for d in rendered.of_kind("Deployment")
                if d["metadata"]["labels"]["app.kubernetes.io/component"] == "edge-server")
    container = edge["containers"][0]
    command = [*container["command"], *container.get("args", [])]
    model = Path(command[command.index("--model") + 1])
    mount = next(m for m in container["volumeMounts"] if model.is_relative_to(m["mountPath"]))
    volume = next(v for v in edge["volumes"] if v["name"] == mount["name"])
    claim = claims / volume["persistentVolumeClaim"]["claimName"]
    return claim / mount.get("subPath", "") / model.relative_to(mount["mountPath"])


def tokens_secret(token: str = "e2e-token") -> Manifest:
    """The Secret a user creates for the router's callers: one token per line."""
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": TOKENS_SECRET, "namespace": NAMESPACE},
            "data": {"tokens": base64.b64encode(f"{token}\n".encode()).decode()}}


def router_config(rendered: Rendered) -> dict[str, Any]:
    config = next(c for c in rendered.of_kind("ConfigMap") if "router.json" in c["data"])
    parsed: dict[str, Any] = json.loads(config["data"]["router.json"])
    return parsed


def wait_backends_healthy(cluster: DockerCluster, rendered: Rendered, token: str,
                          timeout: float = BACKENDS_TIMEOUT_S) -> None:
    """Until the router's own health checks see every backend up (over mTLS, by their Service names), as a
    client would wait for the deployment's Ready condition; the router's pods are ready before that."""
    router = next(d["metadata"]["name"] for d in rendered.of_kind("Deployment")
                  if d["metadata"]["labels"]["app.kubernetes.io/component"] == "router")
    pod = cluster.pods[router][0]
    deadline = time.monotonic() + timeout
    seen: dict[str, bool] = {}
    with Client(f"{pod.ip}:50051", token=token, timeout=10) as client:
        while time.monotonic() < deadline:
            seen = {b.name: b.healthy for b in client.model_info().backends}
            if seen and all(seen.values()):
                return
            time.sleep(1)
    raise AssertionError(f"the router never saw every backend up: {seen}\n{cluster.logs(pod.container, 40)}")


@contextmanager
def deployed(images: Images, workdir: Path, manifest: Manifest, name: str) -> Iterator[Stack]:
    """Two reconcile passes, as the operator makes them: first the compression Job with the cloud server and
    a cloud-only router; then, with the Job's result, the edge server and the router rolled to cascade.
    Everything is torn down on the way out, whatever happened; the timings go to build/images/<name>.json."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    token = "e2e-" + uuid.uuid4().hex
    deployment = load_deployment(manifest, namespace=NAMESPACE)
    config = operator_config(images.edge)
    cluster = DockerCluster(uuid.uuid4().hex[:8], workdir, NAMESPACE, images.image_for)
    try:
        cluster.create_network()
        tls = tls_secrets(deployment, config)
        assert tls is not None, "the sample keeps mTLS on (the default)"
        cluster.apply([*tls.objects, tokens_secret(token)])

        first = reconcile(deployment, config, {}, tls)
        jobs = cluster.apply(first.objects)
        assert len(jobs) == 1, [j.pod.owner for j in jobs]
        for deployment_obj in first.of_kind("Deployment"):
            cluster.wait_ready(deployment_obj["metadata"]["name"], READY_TIMEOUT_S)
        timings["cloud server and router ready (cloud-only)"] = time.monotonic() - started

        job_started = time.monotonic()
        exit_code, message = jobs[0].wait(JOB_TIMEOUT_S)
        timings["compression job (after the servers were up)"] = time.monotonic() - job_started
        result = compression_result(first, jobs[0].pod.owner, exit_code=exit_code, message=message)
        assert result is not None and result.accepted, (exit_code, message, cluster.logs(jobs[0].pod.container))

        rolled = time.monotonic()
        final = reconcile(deployment, config, {result.name: result}, tls)
        cluster.apply(final.objects)
        for deployment_obj in final.of_kind("Deployment"):
            cluster.wait_ready(deployment_obj["metadata"]["name"], READY_TIMEOUT_S)
        wait_backends_healthy(cluster, final, token)
        timings["edge server up, router rolled to cascade"] = time.monotonic() - rolled
        timings["stack up in all"] = time.monotonic() - started
        TIMINGS_DIR.mkdir(parents=True, exist_ok=True)
        rounded = {k: round(v, 1) for k, v in timings.items()}
        (TIMINGS_DIR / f"{name}.json").write_text(json.dumps(rounded, indent=2) + "\n")
        yield Stack(cluster, first, final, jobs[0], exit_code, message, tls, token, images, timings)
    except BaseException:
        # pytest shows this with the failure: what ran, and every `docker run` it was started with.
        print(cluster.state(), cluster.describe(), *cluster.notes, sep="\n")
        raise
    finally:
        problems = cluster.teardown()
        assert not problems, problems
