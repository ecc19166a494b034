"""One scenario code path, two backends: the strict emulator by default, a real cluster when one is given.

A scenario talks to `Cluster.api` over HTTP, as the operator does, and waits with `Cluster.eventually`, which
first lets the cluster's controllers act: on the emulator that is `emu.controllers.settle()` (the scheduler,
kubelet, volume binder and workload controllers are stand-ins the test drives), on a real cluster they run
by themselves. The operator is the real `stratus operator` process in both, run as the chart installs it
(deploy/operator/deployment.yaml's environment) and, on the emulator, held to the chart's RBAC.

What only the emulator can do (define nodes, their host directories and storage classes, end a compression
pod with a chosen summary, read the audit log) is a capability; a scenario that needs one on a real cluster
skips, saying which. A real cluster is used when STRATUS_SCENARIO_KUBECONFIG names a kubeconfig whose context
is the kind test cluster (tests/e2e/kind_cluster.py's guard), or another context named explicitly in
STRATUS_SCENARIO_CONTEXT; `make e2e` runs them on kind.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
import yaml
from kube_emulator import (
    CLUSTERROLEBINDINGS,
    CLUSTERROLES,
    CRDS,
    EVENTS,
    JOBS,
    NAMESPACES,
    PODS,
    Emulator,
    service_account,
)
from kube_emulator.keys import KINDS, Key, api_version
from operator_harness import CRD, ROOT, OperatorProcess

sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from kind_cluster import CLUSTER_NAME, KIND_CONFIG, NotATestClusterError, check_test_cluster

MERGE = "application/merge-patch+json"
APPLY = "application/apply-patch+yaml"
OPERATOR_TOKEN = "stratus-operator-token"
OPERATOR_SA = ("stratus-system", "stratus-operator")
# The node directory kind's nodes have (deploy/kind/cluster.yaml) for the opt-in per-node cache (modelCache.hostPath).
CACHE_DIR = "/var/cache/stratus"
INSTANCE = "app.kubernetes.io/instance"


class ApiFailure(Exception):
    """A request the API server refused; `status` is its Status body."""

    def __init__(self, code: int, status: dict[str, Any]) -> None:
        super().__init__(f"HTTP {code}: {status.get('message', status)}")
        self.code = code
        self.status = status

    @property
    def message(self) -> str:
        return str(self.status.get("message", ""))


def _url(key: Key, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    base = f"/apis/{key[0]}/{key[1]}" if key[0] else f"/api/{key[1]}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{key[2]}"
    if name:
        base += f"/{name}"
    if subresource:
        base += f"/{subresource}"
    return base


class ApiClient:
    """A small HTTP client for the scenario's own calls (never the operator's code)."""

    def __init__(self, server: str, *, headers: dict[str, str], ssl_context: ssl.SSLContext | bool = False) -> None:
        self.server = server.rstrip("/")
        self.headers = headers
        self.ssl_context = ssl_context
        self.session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, path: Path, context: str | None = None) -> ApiClient:
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(path), context=context, client_configuration=configuration)
        headers = {"User-Agent": "stratus-scenario"}
        token = configuration.api_key.get("authorization") or configuration.api_key.get("BearerToken")
        if token:
            headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
        context_ssl: ssl.SSLContext | bool = False
        if configuration.host.startswith("https"):
            context_ssl = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            if not configuration.verify_ssl:
                context_ssl.check_hostname = False
                context_ssl.verify_mode = ssl.CERT_NONE
            if configuration.cert_file:
                context_ssl.load_cert_chain(configuration.cert_file, configuration.key_file)
        return cls(configuration.host, headers=headers, ssl_context=context_ssl)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                      params: dict[str, str] | None = None) -> Any:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl_context))
        data = None if body is None else body if isinstance(body, str) else json.dumps(body)
        async with self.session.request(method, self.server + path, data=data, params=params,
                                        headers={**self.headers, "Content-Type": content_type}) as response:
            text = await response.text()
            payload = json.loads(text) if text else None
            if response.status >= 400:
                raise ApiFailure(response.status, payload if isinstance(payload, dict) else {"message": text})
            return payload

    async def create(self, key: Key, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        body = {"apiVersion": api_version(key), "kind": KINDS[key], **body}
        return await self.request("POST", _url(key, namespace), body)  # type: ignore[no-any-return]

    async def get(self, key: Key, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return await self.request("GET", _url(key, namespace, name))  # type: ignore[no-any-return]
        except ApiFailure as exc:
            if exc.code == 404:
                return None
            raise

    async def list(self, key: Key, namespace: str | None = None, labels: str = "") -> list[dict[str, Any]]:
        result = await self.request("GET", _url(key, namespace), params={"labelSelector": labels} if labels else None)
        return list(result.get("items") or [])

    async def patch(self, key: Key, name: str, patch: Any, namespace: str | None = None, *,
                    content_type: str = MERGE, subresource: str | None = None,
                    params: dict[str, str] | None = None) -> dict[str, Any]:
        return await self.request("PATCH", _url(key, namespace, name, subresource), patch,  # type: ignore[no-any-return]
                                  content_type=content_type, params=params)

    async def apply(self, key: Key, body: dict[str, Any], namespace: str | None = None, *,
                    manager: str = "stratus-scenario") -> dict[str, Any]:
        return await self.patch(key, body["metadata"]["name"], yaml.safe_dump(body), namespace, content_type=APPLY,
                                params={"fieldManager": manager, "force": "true"})

    async def delete(self, key: Key, name: str, namespace: str | None = None) -> None:
        try:
            await self.request("DELETE", _url(key, namespace, name), {"kind": "DeleteOptions", "apiVersion": "v1",
                                                                       "propagationPolicy": "Background"})
        except ApiFailure as exc:
            if exc.code != 404:
                raise


def installed_operator_env() -> dict[str, str]:
    """The operator's environment as `kubectl apply -k deploy/` (and the chart's defaults) installs it."""
    docs = yaml.safe_load_all((ROOT / "deploy" / "operator" / "deployment.yaml").read_text())
    deployment = next(d for d in docs if d and d.get("kind") == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: str(e.get("value", "")) for e in container.get("env") or [] if "value" in e}


def rbac_objects() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy" / "operator" / "rbac.yaml").read_text()) if d]


def kind_nodes() -> list[dict[str, Any]]:
    """The e2e kind cluster's nodes (deploy/kind/cluster.yaml) as name, labels and taints."""
    config = yaml.safe_load(KIND_CONFIG.read_text())
    out = []
    workers = 0
    for node in config["nodes"]:
        if node["role"] == "control-plane":
            name = f"{CLUSTER_NAME}-control-plane"
        else:
            workers += 1
            name = f"{CLUSTER_NAME}-worker{workers if workers > 1 else ''}"
        taints: list[dict[str, str]] = []
        for patch in node.get("kubeadmConfigPatches") or []:
            parsed = yaml.safe_load(patch)
            registration = (parsed or {}).get("nodeRegistration") or {}
            taints += registration.get("taints") or []
        out.append({"name": name, "labels": dict(node.get("labels") or {}), "taints": taints})
    return out


class Cluster:
    """A cluster a scenario runs on: its API, a namespace of its own, the operator, and what the backend can do."""

    backend = ""
    capabilities: frozenset[str] = frozenset()
    # The operator answers a change within a second or two on the emulator; a scenario that fails waits this
    # long before it says so.
    timeout = 10.0

    def __init__(self, api: ApiClient, namespace: str, workdir: Path) -> None:
        self.api = api
        self.namespace = namespace
        self.workdir = workdir
        self.operator: OperatorProcess | None = None

    def require(self, capability: str, why: str) -> None:
        """Skip on a backend that cannot do what this scenario needs."""
        if capability not in self.capabilities:
            pytest.skip(f"{self.backend}: needs {why} (only the emulator can set that up)")

    async def settle(self) -> None:
        """Let the cluster's controllers act (a real cluster's do so by themselves)."""

    async def eventually(self, check: Callable[[], Any], *, what: str, timeout: float | None = None,
                         explain: Callable[[], Awaitable[str]] | None = None) -> Any:
        """Poll `check` (sync or async), letting controllers act between polls; fail saying what was last seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.timeout)
        last: Any = None
        while True:
            await self.settle()
            value = check()
            if isinstance(value, Awaitable):
                value = await value
            if value:
                return value
            last = value
            if loop.time() > deadline:
                detail = await explain() if explain is not None else ""
                raise AssertionError(f"timed out waiting for {what}; last: {last!r}\n{detail}")
            await asyncio.sleep(0.2)

    async def events(self, name: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return [e for e in await self.api.list(EVENTS, namespace or self.namespace)
                if (e.get("involvedObject") or {}).get("name") == name]

    async def describe(self, instance: str) -> str:
        """What a person would look at: the deployment's status, its children, pods and warnings."""
        parts = []
        llmd = await self.api.get(LLMD_KEY, instance, self.namespace)
        status = (llmd or {}).get("status") or {}
        parts.append(f"{instance}: phase {status.get('phase')}, observedGeneration "
                     f"{status.get('observedGeneration')} of {(llmd or {}).get('metadata', {}).get('generation')}")
        parts += [f"  {c.get('type')}={c.get('status')} {c.get('reason')}: {c.get('message')}"
                  for c in status.get("conditions") or []]
        for pod in await self.api.list(PODS, self.namespace):
            status = pod.get("status") or {}
            waiting = [((c.get("state") or {}).get("waiting") or {}).get("reason")
                       for c in status.get("containerStatuses") or []]
            parts.append(f"pod {pod['metadata']['name']}: {status.get('phase')} node="
                         f"{(pod.get('spec') or {}).get('nodeName')} waiting={waiting}")
        warnings = [f"{e['involvedObject'].get('kind')}/{e['involvedObject'].get('name')} {e['reason']}: "
                    f"{e['message']}" for e in await self.api.list(EVENTS, self.namespace)
                    if e.get("type") == "Warning"]
        parts += warnings[-15:]
        if self.operator is not None:
            parts.append("operator log tail:\n" + self.operator.logs()[-2500:])
        return "\n".join(parts)

    async def start_operator(self, kubeconfig: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
        self.operator = OperatorProcess(kubeconfig, self.workdir / "operator.log", env=env, args=args)
        await self.operator.start()

    async def close(self) -> None:
        if self.operator is not None:
            await self.operator.kill()  # nothing of a scenario outlives it: no need for a graceful stop
        await self.api.close()

    # --- emulator-only setup (capabilities) ----------------------------------------------------------------

    @property
    def emulator(self) -> Emulator:
        raise NotImplementedError

    async def finish_compression(self, job: str, summary: dict[str, Any]) -> None:
        """The compression Job ends with this summary in its termination message (as the worker writes it)."""
        raise NotImplementedError


LLMD_KEY: Key = ("stratus.dev", "v1alpha1", "llmdeployments")


class EmulatorCluster(Cluster):
    backend = "emulator"
    capabilities = frozenset({"nodes", "host-dirs", "storage-classes", "finish-jobs", "audit", "hpa-metrics",
                              "admission-plugins", "rbac", "image-registry"})

    def __init__(self, emu: Emulator, api: ApiClient, namespace: str, workdir: Path) -> None:
        super().__init__(api, namespace, workdir)
        self._emu = emu

    @property
    def emulator(self) -> Emulator:
        return self._emu

    def refusals(self) -> list[str]:
        """The operator's requests the API server refused, once each (from its audit log)."""
        refused: dict[str, None] = {}
        for record in self._emu.audit:
            # Not-found and conflicts are ordinary; so is kopf's optimistic JSON patch losing a race (its `test`).
            if record.code >= 400 and record.user.endswith(":stratus-operator") and record.code not in (404, 409) \
                    and "testing value failed" not in record.message:
                refused.setdefault(f"{record.code} {record.verb} {record.resource}: {record.message[:300]}")
        return list(refused)

    async def describe(self, instance: str) -> str:
        refused = self.refusals()
        text = "\n  ".join(["operator requests refused:", *refused[-6:]]) if refused else ""
        return f"{await super().describe(instance)}\n{text}"

    async def settle(self) -> None:
        await self._emu.controllers.settle()

    async def finish_compression(self, job: str, summary: dict[str, Any]) -> None:
        async def running_pod() -> dict[str, Any] | None:
            pods = [p for p in self._emu.read_all(PODS, self.namespace)
                    if (p["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name") == job
                    and (p.get("status") or {}).get("phase") == "Running"]
            return pods[0] if pods else None

        pod = await self.eventually(running_pod, what=f"a running pod of Job {job}",
                                    explain=lambda: self.describe(job.split("-compress-")[0]))
        await self._emu.controllers.kubelet.terminate(pod, message=json.dumps(summary))
        await self.eventually(lambda: any(c.get("type") == "Complete" for c in (
            (self._emu.read(JOBS, self.namespace, job) or {}).get("status") or {}).get("conditions") or []),
            what=f"Job {job} complete")

    async def add_kind_nodes(self, *, cpu: str = "8", memory: str = "16Gi", edge_memory: str = "4Gi",
                             edge_extended: dict[str, str] | None = None, host_dirs: set[str] | None = None) -> None:
        """The e2e kind cluster's nodes (labels, taints, a fake GPU on the GPU node), each with its host dirs."""
        for node in kind_nodes():
            gpu = node["labels"].get("nvidia.com/gpu.present") == "true"
            edge = node["labels"].get("stratus.dev/edge") == "true"
            extended = {"nvidia.com/gpu": "1"} if gpu else dict(edge_extended or {}) if edge else None
            await self._emu.controllers.add_node(
                node["name"], cpu=cpu, memory=edge_memory if edge else memory, labels=node["labels"],
                taints=node["taints"], extended=extended, host_dirs=set(host_dirs or ()))


class RealCluster(Cluster):
    backend = "cluster"
    capabilities = frozenset()
    timeout = 300.0

    async def finish_compression(self, job: str, summary: dict[str, Any]) -> None:
        # The Job really runs: wait for it (compressing the bundled model on CPU takes minutes).
        async def complete() -> bool:
            found = await self.api.get(JOBS, job, self.namespace)
            return any(c.get("type") == "Complete" and c.get("status") == "True"
                       for c in ((found or {}).get("status") or {}).get("conditions") or [])

        await self.eventually(complete, what=f"Job {job} complete", timeout=1500)


def real_cluster_config() -> tuple[Path, str | None] | str:
    """(kubeconfig, context) of the real cluster to use, or why there is none (the skip reason)."""
    path = os.environ.get("STRATUS_SCENARIO_KUBECONFIG", "")
    if not path:
        return ("real-cluster scenarios skipped: set STRATUS_SCENARIO_KUBECONFIG to a test cluster's kubeconfig "
                "(make e2e does, on kind)")
    kubeconfig = yaml.safe_load(Path(path).read_text())
    allowed = os.environ.get("STRATUS_SCENARIO_CONTEXT", "")
    if allowed and kubeconfig.get("current-context") == allowed:
        return Path(path), allowed
    try:
        check_test_cluster(kubeconfig)
    except NotATestClusterError as exc:
        return f"{exc} (name it in STRATUS_SCENARIO_CONTEXT to use it anyway)"
    return Path(path), None


async def start_emulator_cluster(workdir: Path, *, env: dict[str, str] | None = None,
                                 extended_resource_toleration: bool = True, namespace: str | None = None,
                                 namespace_labels: dict[str, str] | None = None) -> tuple[EmulatorCluster, Any]:
    """The strict emulator with the CRD, the chart's RBAC and a namespace; the operator held to that RBAC."""
    emu = Emulator()
    server = kmock.Server(emu)
    await emu.__aenter__()
    await server.__aenter__()
    emu.extended_resource_toleration = extended_resource_toleration
    await emu.create_obj(CRDS, None, yaml.safe_load(CRD.read_text()))
    for obj in rbac_objects():
        await emu.create_obj(CLUSTERROLES if obj["kind"] == "ClusterRole" else CLUSTERROLEBINDINGS, None, obj)
    emu.add_user(OPERATOR_TOKEN, service_account(*OPERATOR_SA))
    namespace = namespace or f"s-{uuid.uuid4().hex[:6]}"
    await emu.create_obj(NAMESPACES, None, {"metadata": {"name": namespace, "labels": namespace_labels or {}}})
    url = str(emu.url).rstrip("/")
    cluster = EmulatorCluster(emu, ApiClient(url, headers={"User-Agent": "stratus-scenario"}), namespace, workdir)
    kubeconfig = workdir / "operator-kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "operator", "user": {"token": OPERATOR_TOKEN}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "operator"}}]}))
    await cluster.start_operator(kubeconfig, ("--all-namespaces",), {**operator_env(), **(env or {})})

    async def stop() -> None:
        await cluster.close()
        await server.__aexit__(None, None, None)
        await emu.__aexit__(None, None, None)

    return cluster, stop


async def start_real_cluster(workdir: Path, kubeconfig: Path, context: str | None, *,
                             env: dict[str, str] | None = None, namespace: str | None = None,
                             namespace_labels: dict[str, str] | None = None) -> tuple[RealCluster, Any]:
    """A namespace of its own on the real cluster, the CRD applied, and the operator watching that namespace."""
    api = ApiClient.from_kubeconfig(kubeconfig, context)
    await api.apply(CRDS, yaml.safe_load(CRD.read_text()))
    operators = [d for d in await api.list(("apps", "v1", "deployments"), None,
                                            "app.kubernetes.io/component=operator,app.kubernetes.io/name=stratus")]
    if operators:
        await api.close()
        pytest.skip(f"cluster: an installed operator ({operators[0]['metadata']['namespace']}/"
                    f"{operators[0]['metadata']['name']}) would reconcile the scenario too; uninstall it first")
    namespace = namespace or f"s-{uuid.uuid4().hex[:6]}"
    await api.create(NAMESPACES, {"metadata": {"name": namespace, "labels": namespace_labels or {}}})
    cluster = RealCluster(api, namespace, workdir)
    await cluster.start_operator(kubeconfig, ("--namespace", namespace), {**operator_env(), **(env or {})})

    async def stop() -> None:
        await api.delete(NAMESPACES, namespace)
        await cluster.close()

    return cluster, stop


def operator_env() -> dict[str, str]:
    env = installed_operator_env()
    # Ports are the harness's (several operators may run at once); a short resync so drift shows quickly.
    for name in ("STRATUS_HEALTH_PORT", "STRATUS_METRICS_PORT", "STRATUS_NAMESPACES"):
        env.pop(name, None)
    env["STRATUS_RESYNC_SECONDS"] = "2"
    return env


def sample(name: str = "smollm2", **spec: Any) -> dict[str, Any]:
    """deploy/samples/smollm2.yaml under another name, with top-level spec sections replaced."""
    manifest: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    manifest["metadata"] = {"name": name}
    manifest["spec"].update(spec)
    return manifest


# The `start_cluster` fixture (scenarios/conftest.py): `cluster = await start_cluster(**options)`.
Start = Callable[..., Awaitable["Cluster"]]

SUMMARY = {"name": "int8", "status": "accepted", "reasons": [], "recipe": "quantize:int8-weight",
           "artifact": "/artifacts/int8", "bytes": 180_000_000, "sizeRatio": 0.27, "perplexity": 13.2,
           "fullPerplexity": 12.9, "perplexityIncrease": 0.0233, "tokensPerSecond": 41.5, "agreement": 0.94}


async def holds(cluster: Cluster, check: Callable[[], Awaitable[Any]], *, seconds: float, what: str,
                explain: Callable[[], Awaitable[str]] | None = None) -> None:
    """`check` stays true for `seconds` while the controllers and the operator's resyncs run."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        await cluster.settle()
        if not await check():
            detail = await explain() if explain is not None else ""
            raise AssertionError(f"{what} stopped holding\n{detail}")
        await asyncio.sleep(0.3)


async def job_of(cluster: Cluster, instance: str = "smollm2") -> dict[str, Any]:
    """The deployment's compression Job, once the operator has created it."""
    async def found() -> dict[str, Any] | None:
        jobs = [j for j in await cluster.api.list(JOBS, cluster.namespace, f"{INSTANCE}={instance}")
                if "-compress-" in j["metadata"]["name"]]
        return jobs[0] if jobs else None

    return await cluster.eventually(found, what="the compression Job")  # type: ignore[no-any-return]


async def conditions(cluster: Cluster, instance: str = "smollm2") -> dict[str, dict[str, Any]]:
    llmd = await cluster.api.get(LLMD_KEY, instance, cluster.namespace) or {}
    return {c["type"]: c for c in (llmd.get("status") or {}).get("conditions") or []}


async def pods_of(cluster: Cluster, component: str, instance: str = "smollm2") -> list[dict[str, Any]]:
    return [p for p in await cluster.api.list(PODS, cluster.namespace, f"{INSTANCE}={instance}")
            if (p["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == component
            and not p["metadata"].get("deletionTimestamp")]
