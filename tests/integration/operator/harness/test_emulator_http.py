"""What clients see over HTTP: Status bodies, warnings, apply's parameters, RBAC, namespaces, the scale subresource."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kmock
import pytest
import yaml
from harness_objects import deployment
from kube_emulator import (
    CLUSTERROLEBINDINGS,
    CLUSTERROLES,
    DEPLOYMENTS,
    NAMESPACES,
    ROLEBINDINGS,
    ROLES,
    Emulator,
    service_account,
)
from operator_harness import ROOT

pytestmark = pytest.mark.integration

DEPLOYMENTS_URL = "/apis/apps/v1/namespaces/default/deployments"
NOT_FOUND = "404 page not found\n"  # Go's http.NotFound: what the API server answers for a path nobody serves


@pytest.fixture()
async def http(served: Emulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=str(served.url).rstrip("/")) as session:
        yield session


async def _send(http: aiohttp.ClientSession, method: str, path: str, body: Any = None,
                content_type: str = "application/json", token: str = "admin",
                **params: str) -> tuple[int, Any, aiohttp.ClientResponse]:
    data = body if isinstance(body, str) else json.dumps(body) if body is not None else None
    async with http.request(method, path, data=data, params=params or None,
                            headers={"Content-Type": content_type, "Authorization": f"Bearer {token}",
                                     "User-Agent": "stratus-operator"}) as response:
        return response.status, await response.json(), response


async def test_refusal_over_http_is_422_with_a_status_body(http: aiohttp.ClientSession) -> None:
    bad = deployment()
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "cache", "mountPath": "/c"}]
    code, body, _ = await _send(http, "POST", DEPLOYMENTS_URL, bad)
    assert code == 422
    assert body["kind"] == "Status" and body["reason"] == "Invalid"
    assert body["details"]["causes"][0]["field"] == "spec.template.spec.containers[0].volumeMounts[0].name"


async def test_unknown_field_is_a_warning_by_default_and_a_400_when_strict(http: aiohttp.ClientSession) -> None:
    body = deployment()
    body["spec"]["replicaz"] = 3
    code, created, response = await _send(http, "POST", DEPLOYMENTS_URL, body)
    assert code == 201 and "replicaz" not in created["spec"]
    assert response.headers.getall("Warning") == ['299 - "unknown field \\"spec.replicaz\\""']
    body["metadata"]["name"] = "strict"
    code, status, _ = await _send(http, "POST", DEPLOYMENTS_URL, body, fieldValidation="Strict")
    assert code == 400 and 'strict decoding error: unknown field "spec.replicaz"' in status["message"]


async def test_apply_needs_a_field_manager_and_takes_yaml(http: aiohttp.ClientSession, served: Emulator) -> None:
    text = yaml.safe_dump(deployment())
    code, status, _ = await _send(http, "PATCH", f"{DEPLOYMENTS_URL}/web", text, "application/apply-patch+yaml")
    assert code == 422 and "fieldManager: Required value: is required for apply patch" in status["message"]
    code, created, _ = await _send(http, "PATCH", f"{DEPLOYMENTS_URL}/web", text, "application/apply-patch+yaml",
                                   fieldManager="stratus-operator", force="true")
    assert code == 201 and created["metadata"]["managedFields"][0]["manager"] == "stratus-operator"


async def test_scale_subresource_writes_replicas_as_kubectl_scale_does(http: aiohttp.ClientSession,
                                                                       served: Emulator) -> None:
    await served.create_obj(DEPLOYMENTS, "default", deployment())
    code, scale, _ = await _send(http, "PATCH", f"{DEPLOYMENTS_URL}/web/scale", {"spec": {"replicas": 4}},
                                 "application/merge-patch+json")
    assert code == 200 and scale["kind"] == "Scale" and scale["spec"]["replicas"] == 4
    stored = served.read(DEPLOYMENTS, "default", "web") or {}
    assert stored["spec"]["replicas"] == 4
    assert any(m["manager"] == "stratus-operator" and m["operation"] == "Update"
               for m in stored["metadata"]["managedFields"])


async def test_missing_namespace_is_404_and_terminating_namespace_refuses_new_content(
        http: aiohttp.ClientSession, served: Emulator) -> None:
    code, status, _ = await _send(http, "POST", "/apis/apps/v1/namespaces/nowhere/deployments", deployment())
    assert code == 404 and status["message"] == 'namespaces "nowhere" not found'
    await served.create_obj(NAMESPACES, None, {"metadata": {"name": "doomed"}})
    await served.delete_obj(NAMESPACES, None, "doomed")
    assert (served.read(NAMESPACES, None, "doomed") or {})["status"]["phase"] == "Terminating"
    code, status, _ = await _send(http, "POST", "/apis/apps/v1/namespaces/doomed/deployments", deployment())
    assert code == 403
    assert status["message"] == "unable to create new content in namespace doomed because it is being terminated"


async def _read(http: aiohttp.ClientSession, path: str, token: str = "admin", *,
                watch: bool = False) -> tuple[int, str]:
    """A GET of `path` as `token` and its body as text; a watch the server ends after a second, and one that is
    still open after 10 s fails the test."""
    async def call() -> tuple[int, str]:
        async with http.get(path, params={"watch": "true", "timeoutSeconds": "1"} if watch else None,
                            headers={"Authorization": f"Bearer {token}"}) as response:
            return response.status, await response.text()

    return await asyncio.wait_for(call(), timeout=10)


async def _watch(http: aiohttp.ClientSession, path: str) -> tuple[int, str]:
    return await _read(http, path, watch=True)


async def test_reads_in_a_missing_namespace_are_served_and_an_unknown_group_is_404(
        http: aiohttp.ClientSession, served: Emulator) -> None:
    """What the operator scoped to named namespaces relies on: like an API server, a list and a watch in a
    namespace nobody made yet are served (an empty list, a stream with no events), not 404; a group nobody
    serves is Go's plain-text 404."""
    code, listed, _ = await _send(http, "GET", "/apis/stratus.dev/v1alpha1/namespaces/nowhere/llmdeployments")
    assert code == 200 and listed["items"] == [] and served.read(NAMESPACES, None, "nowhere") is None
    assert await _watch(http, "/apis/stratus.dev/v1alpha1/namespaces/nowhere/llmdeployments") == (200, "")
    code, group, _ = await _send(http, "GET", "/apis/stratus.dev/v1alpha1")
    assert code == 200 and "llmdeployments" in {r["name"] for r in group["resources"]}
    async with http.get("/apis/nothing.example.com/v1") as response:
        assert response.status == 404 and await response.text() == NOT_FOUND


@pytest.fixture()
async def without_crd() -> AsyncIterator[Emulator]:
    """An emulator on loopback before the LLMDeployment CRD is installed."""
    emulator = Emulator()
    async with emulator, kmock.Server(emulator):
        yield emulator


@pytest.fixture()
async def http_without_crd(without_crd: Emulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=str(without_crd.url).rstrip("/")) as session:
        yield session


async def test_without_the_crd_its_group_and_resource_are_404_for_every_verb(
        http_without_crd: aiohttp.ClientSession) -> None:
    """The probe of the operator scoped to named namespaces reads discovery of the group to learn whether the CRD
    is installed: an API server without it answers 404 there, and on the resource's URLs (a watch too, at once)."""
    http = http_without_crd
    for path in ("/apis/stratus.dev/v1alpha1", "/apis/stratus.dev",
                 "/apis/stratus.dev/v1alpha1/namespaces/team-a/llmdeployments"):
        async with http.get(path) as response:
            assert (response.status, await response.text()) == (404, NOT_FOUND), path
    assert await _watch(http, "/apis/stratus.dev/v1alpha1/namespaces/team-a/llmdeployments") == (404, NOT_FOUND)
    code, _, _ = await _send(http, "GET", "/apis/apps/v1")  # what it does serve still answers
    assert code == 200


LLMD_URL = "/apis/stratus.dev/v1alpha1/namespaces/team-a/llmdeployments"


async def test_without_the_crd_an_unauthorized_user_is_403_before_the_404(
        without_crd: Emulator, http_without_crd: aiohttp.ClientSession) -> None:
    """The API server authorizes a request (WithAuthorization) before any handler resolves its resource: a user
    not granted llmdeployments in stratus.dev gets 403 for it whether the CRD is installed or not, and only a
    user granted it learns the resource is not served (404)."""
    emu, http = without_crd, http_without_crd
    grants = {"reader": ("stratus.dev", "llmdeployments"), "other": ("", "pods")}
    for account, (group, resource) in grants.items():
        await emu.create_obj(ROLES, "team-a", {"metadata": {"name": account}, "rules": [
            {"apiGroups": [group], "resources": [resource], "verbs": ["get", "list", "watch"]}]})
        await emu.create_obj(ROLEBINDINGS, "team-a", {
            "metadata": {"name": account},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": "team-a"}]})
        emu.add_user(account, service_account("team-a", account))
    other = "system:serviceaccount:team-a:other"
    for verb, path, what in (("list", LLMD_URL, "llmdeployments.stratus.dev"),
                             ("watch", LLMD_URL, "llmdeployments.stratus.dev"),
                             ("get", f"{LLMD_URL}/smollm2", 'llmdeployments.stratus.dev "smollm2"')):
        code, text = await _read(http, path, "other", watch=verb == "watch")
        assert code == 403, (verb, text)
        status = json.loads(text)
        assert (status["kind"], status["reason"], status["code"]) == ("Status", "Forbidden", 403)
        assert status["message"] == (
            f'{what} is forbidden: User "{other}" cannot {verb} resource "llmdeployments" in API group '
            f'"stratus.dev" in the namespace "team-a"')
        assert (emu.audit[-1].verb, emu.audit[-1].code) == (verb, 403)
        assert await _read(http, path, "reader", watch=verb == "watch") == (404, NOT_FOUND), verb
        assert (emu.audit[-1].verb, emu.audit[-1].code) == (verb, 404)
    # The reader's Role is in team-a alone: listing across namespaces (the cluster-wide operator) is refused.
    code, text = await _read(http, "/apis/stratus.dev/v1alpha1/llmdeployments", "reader")
    assert code == 403 and json.loads(text)["message"] == (
        'llmdeployments.stratus.dev is forbidden: User "system:serviceaccount:team-a:reader" cannot list resource '
        '"llmdeployments" in API group "stratus.dev" at the cluster scope')


async def test_rbac_holds_a_service_account_to_its_roles(http: aiohttp.ClientSession, served: Emulator) -> None:
    role, binding = (d for d in yaml.safe_load_all((ROOT / "deploy" / "operator" / "rbac.yaml").read_text()) if d)
    await served.create_obj(CLUSTERROLES, None, role)
    await served.create_obj(CLUSTERROLEBINDINGS, None, binding)
    served.add_user("operator-token", service_account("stratus-system", "stratus-operator"))
    code, _, _ = await _send(http, "GET", DEPLOYMENTS_URL, token="operator-token")
    assert code == 200
    code, _, _ = await _send(http, "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                             token="operator-token")
    assert code == 200  # kopf lists CRDs at start
    # Secrets are get/create/patch by name only: listing them all is refused.
    code, status, _ = await _send(http, "GET", "/api/v1/secrets", token="operator-token")
    assert code == 403
    assert status["message"] == (
        'secrets is forbidden: User "system:serviceaccount:stratus-system:stratus-operator" cannot list resource '
        '"secrets" in API group "" at the cluster scope')
    assert served.audit[-1].code == 403 and served.audit[-1].verb == "list"
    # A request for a named object names it, as apierrors.NewForbidden does (pods are list/watch only).
    code, status, _ = await _send(http, "GET", "/api/v1/namespaces/default/pods/web", token="operator-token")
    assert code == 403
    assert status["message"] == (
        'pods "web" is forbidden: User "system:serviceaccount:stratus-system:stratus-operator" cannot get resource '
        '"pods" in API group "" in the namespace "default"')
    # The harness's own token is an administrator; a token nobody issued is refused before anything else, discovery
    # included, with a real API server's 401 Status.
    code, _, _ = await _send(http, "GET", "/api/v1/secrets")
    assert code == 200
    for path in ("/api/v1/secrets", "/apis"):
        code, status, _ = await _send(http, "GET", path, token="no-such-token")
        assert code == 401 and (status["reason"], status["message"], status["code"]) == (
            "Unauthorized", "Unauthorized", 401)


async def test_watch_from_a_resource_version_sends_each_later_event_once(http: aiohttp.ClientSession,
                                                                          served: Emulator) -> None:
    first = await served.create_obj(DEPLOYMENTS, "default", deployment())
    since = first["metadata"]["resourceVersion"]
    second = deployment()
    second["metadata"]["name"] = "api"
    await served.create_obj(DEPLOYMENTS, "default", second)
    await served.delete_obj(DEPLOYMENTS, "default", "web")
    async with http.get(DEPLOYMENTS_URL, params={"watch": "true", "resourceVersion": since, "timeoutSeconds": "1"},
                        headers={"Authorization": "Bearer admin"}) as response:
        events = [json.loads(line) for line in (await response.text()).splitlines() if line]
    # A client resuming a watch (kopf after each reconnect) would otherwise handle the same change twice.
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "api"), ("DELETED", "web")]
