"""A small async Kubernetes REST client (aiohttp) for the handlers, limited to the resources in RESOURCES."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kopf

from stratus_operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resource:
    """One API resource the operator touches, with the verbs it uses on it (RBAC is derived from these)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    verbs: tuple[str, ...] = ("get", "list", "watch", "create", "patch", "delete")
    subresource: str | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_path(self) -> str:
        """The path of the resource's group version: its resources' URLs start here, and a GET of it is the
        API server's discovery document of that group version."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    def url(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = self.group_path
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name)}"
        if subresource:
            base += f"/{subresource}"
        return base


READ = ("get", "list", "watch")
WATCH = ("list", "watch")
# The field manager of every server-side apply: the fields it owns are the operator's desired state.
FIELD_MANAGER = "stratus-operator"
# What a server-side-applied child needs: the index's list and watch, apply (patch; create when it is new),
# delete when the plan drops it. Nothing GETs a child: the index has it.
APPLIED = (*WATCH, "create", "patch", "delete")
LLMDEPLOYMENTS = Resource(GROUP, VERSION, PLURAL, "LLMDeployment", verbs=(*READ, "patch"))
LLMDEPLOYMENTS_STATUS = Resource(GROUP, VERSION, PLURAL, "LLMDeployment", verbs=("patch",), subresource="status")
# Created once (a new spec is a new name), deleted to run again or when the plan drops them.
JOBS = Resource("batch", "v1", "jobs", "Job", verbs=(*WATCH, "create", "delete"))
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment", verbs=APPLIED)
SERVICES = Resource("", "v1", "services", "Service", verbs=APPLIED)
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap", verbs=APPLIED)
# Created once; `get` reads a claim the user names (storage.pvc.claimName) to report whether it is bound.
PVCS = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", verbs=(*READ, "create", "delete"))
HPAS = Resource("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", verbs=APPLIED)
PDBS = Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", verbs=APPLIED)
NETWORK_POLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", verbs=APPLIED)
PODS = Resource("", "v1", "pods", "Pod", verbs=WATCH)
NODES = Resource("", "v1", "nodes", "Node", namespaced=False, verbs=WATCH)
# kopf posts Events with create only.
EVENTS = Resource("", "v1", "events", "Event", verbs=("create",))
# The mTLS Secrets the operator issues per deployment (get, create, patch when one must be renewed); never
# list or watch: the operator has no business reading every Secret in the cluster.
SECRETS = Resource("", "v1", "secrets", "Secret", verbs=("get", "create", "patch"))
# With blockOwnerDeletion on children, the OwnerReferencesPermissionEnforcement admission plugin checks
# that the operator may update its owners' finalizers; no call of ours uses it directly.
LLMDEPLOYMENTS_FINALIZERS = Resource(GROUP, VERSION, PLURAL, "LLMDeployment", verbs=("update",),
                                     subresource="finalizers")
# kopf's discovery watches CRDs, to notice LLMDeployment's being (re)installed while it runs; without it, it
# logs a 403 at every start.
CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                namespaced=False, verbs=WATCH)
# kopf's discovery lists and watches namespaces only when it serves namespace patterns.
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False, verbs=WATCH)

RESOURCES: tuple[Resource, ...] = (
    LLMDEPLOYMENTS, LLMDEPLOYMENTS_STATUS, LLMDEPLOYMENTS_FINALIZERS,
    JOBS, DEPLOYMENTS, SERVICES, CONFIGMAPS, PVCS, HPAS, PDBS, NETWORK_POLICIES, PODS, NODES, EVENTS, SECRETS,
    CRDS, NAMESPACES,
)
# Granted only when the operator watches namespace patterns (kopf observes namespaces then, not cluster-wide).
NAMESPACE_PATTERNS_ONLY: tuple[Resource, ...] = (NAMESPACES,)
# What only kopf's discovery calls. Scoped to exact names the operator turns discovery off
# (handle_startup_operator) and calls neither: kopf watches each named namespace directly, reads the API
# groups from the discovery documents (which every authenticated user may GET), and the liveness probe
# GETs the LLMDeployment group's discovery document instead of watching CRDs.
DISCOVERY_ONLY: tuple[Resource, ...] = (CRDS, NAMESPACES)
# The kinds of children the operator creates (and indexes, and prunes).
CHILDREN: tuple[Resource, ...] = (JOBS, DEPLOYMENTS, SERVICES, CONFIGMAPS, PVCS, HPAS, PDBS, NETWORK_POLICIES)
# The same, by the (apiVersion, kind) an object names.
CHILD_RESOURCES: dict[tuple[str, str], Resource] = {(r.api_version, r.kind): r for r in CHILDREN}


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status (0 when the server was unreachable)."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


def _check(resource: Resource, verb: str) -> None:
    # Keep the code honest: every call must be one RBAC grants (rbac.REQUIRED_RULES derives from RESOURCES).
    if resource not in RESOURCES or verb not in resource.verbs:
        raise RuntimeError(f"{verb} on {resource.plural} is not declared in kube.RESOURCES (RBAC)")


class Kube:
    """Async calls against the API server named by a kopf ConnectionInfo."""

    def __init__(self, credentials: Callable[[], kopf.ConnectionInfo], *, timeout: float = 30.0) -> None:
        self._credentials = credentials
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._lock = asyncio.Lock()

    async def _open(self, refresh: bool = False) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is not None and not refresh:
                return self._session
            if self._session is not None:
                await self._session.close()
            info = self._credentials()
            self._server = info.server.rstrip("/")
            self._session = aiohttp.ClientSession(
                # At most 64 requests in flight: a burst of reconciles queues here, not at the API server.
                connector=aiohttp.TCPConnector(limit=64, ssl=info.as_ssl_context()),
                headers={**info.as_http_headers(), "User-Agent": "stratus-operator"},
                # No total timeout: it would count the wait for one of the pooled connections, which
                # under a burst of reconciles is queueing, not a dead server. Socket timeouts catch those.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self._timeout),
            )
            return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, str] | None = None,
                      content_type: str = "application/json") -> Any:
        for attempt in (0, 1):
            session = await self._open(refresh=attempt > 0)
            url = self._server + path + (f"?{urlencode(params)}" if params else "")
            data = json.dumps(body) if body is not None else None
            try:
                async with session.request(method, url, data=data,
                                           headers={"Content-Type": content_type} if data else None) as response:
                    text = await response.text()
                    if response.status == 401 and attempt == 0:
                        continue  # the token may have expired: log in again once
                    if response.status >= 400:
                        raise _error(response.status, text)
                    return json.loads(text) if text else None
            except aiohttp.ClientError as exc:
                raise KubeError(0, f"{method} {path}: {exc}") from exc
        raise KubeError(401, f"{method} {path}: unauthorized")

    async def get(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any]:
        _check(resource, "get")
        result: dict[str, Any] = await self.request("GET", resource.url(namespace, name))
        return result

    async def list(self, resource: Resource, namespace: str | None = None,
                   labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """List objects; the label selector is also applied here (not every server honours it)."""
        _check(resource, "list")
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        result = await self.request("GET", resource.url(namespace), params=params)
        items: list[dict[str, Any]] = list((result or {}).get("items") or [])
        if labels:
            items = [i for i in items
                     if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in labels.items())]
        return items

    async def create(self, resource: Resource, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        _check(resource, "create")
        result: dict[str, Any] = await self.request("POST", resource.url(namespace), body=body)
        return result

    async def patch(self, resource: Resource, namespace: str | None, name: str, patch: dict[str, Any],
                    *, subresource: str | None = None) -> dict[str, Any]:
        """A JSON merge patch (lists are replaced whole, which is what a desired state wants)."""
        _check(resource, "patch")
        result: dict[str, Any] = await self.request(
            "PATCH", resource.url(namespace, name, subresource or resource.subresource), body=patch,
            content_type="application/merge-patch+json")
        return result

    async def json_patch(self, resource: Resource, namespace: str | None, name: str,
                         operations: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A JSON patch (RFC 6902): exact operations, with `test` ops as preconditions."""
        _check(resource, "patch")
        result: dict[str, Any] = await self.request(
            "PATCH", resource.url(namespace, name), body=operations, content_type="application/json-patch+json")
        return result

    async def apply(self, resource: Resource, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of `body` (the whole desired object) as FIELD_MANAGER, taking over conflicts.

        The API server removes what this manager set before and `body` no longer holds, puts back what others
        changed in fields it holds, and creates the object when it is missing.
        """
        _check(resource, "patch")
        name = body["metadata"]["name"]
        result: dict[str, Any] = await self.request(
            "PATCH", resource.url(namespace, name), body=body, params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml")  # JSON is YAML
        return result

    async def delete(self, resource: Resource, namespace: str | None, name: str) -> None:
        _check(resource, "delete")
        with contextlib.suppress(NotFound):
            await self.request("DELETE", resource.url(namespace, name),
                               body={"kind": "DeleteOptions", "apiVersion": "v1",
                                     "propagationPolicy": "Background"})


def _error(status: int, text: str) -> KubeError:
    try:
        payload = json.loads(text)
        message, reason = str(payload.get("message", text)), str(payload.get("reason", ""))
    except (json.JSONDecodeError, AttributeError):
        message, reason = text[:500], ""
    if status == 404:
        return NotFound(status, message, reason)
    if status == 409:
        return Conflict(status, message, reason)
    return KubeError(status, message, reason)
