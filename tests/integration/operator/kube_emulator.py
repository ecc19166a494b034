"""kmock's KubernetesEmulator with the API-server behaviours kopf and kubectl rely on (the issue's traps).

kmock 0.8 alone assigns no uid/creationTimestamp/resourceVersion, replays stale objects on watches,
ignores generateName, selectors and the /status split, returns 500 for a failed JSON-patch `test`,
lists without kind/apiVersion, does no garbage collection and registers nothing for a posted CRD.
This subclass keeps kmock's server, discovery and request parsing and serves Kubernetes objects
from its own store with those behaviours. It runs no controllers: tests act as them through the
async helpers (`create`, `patch`, `patch_status`, `delete`), which never block the loop.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import datetime
import json
import re
import uuid
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
from kmock._internal import enums, parsing, references, rendering

Key = tuple[str, str, str]  # group, version, plural
ObjKey = tuple[Key, str | None, str]  # resource, namespace, name
EVENT_LOG_LIMIT = 200_000


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 merge patch (strategic merge is treated the same: good enough for the operator's objects)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def _selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "==" in term or "=" in term:
            k, v = re.split("==?", term, maxsplit=1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif " in " in term:
            k, values = term.split(" in ", 1)
            if labels.get(k.strip()) not in {x.strip() for x in values.strip("() ").split(",")}:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_matches(selector: str, obj: Mapping[str, Any]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        neg = "!=" in term
        path, value = re.split("!=|==?", term, maxsplit=1)
        node: Any = obj
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if (str(node) == value) == neg:
            return False
    return True


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _jsonpath(obj: Mapping[str, Any], path: str) -> Any:
    node: Any = obj
    for part in path.strip().lstrip(".").split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class Emulator(kmock.KubernetesEmulator):
    """An in-memory API server good enough for kopf, our client, the kubernetes client and kubectl."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store: dict[ObjKey, dict[str, Any]] = {}
        self.log: dict[Key, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        self.log_start: dict[Key, int] = defaultdict(int)
        self.revision = 0
        self.changed = asyncio.Condition()
        self.printer_columns: dict[Key, list[dict[str, Any]]] = {}
        self.kinds: dict[Key, str] = {}
        self.resources.load_bundled()

    # --- registration -----------------------------------------------------------------------------

    def register_crd(self, crd: Mapping[str, Any]) -> Key:
        """What the API server does when a CRD is created: serve its resource (with printer columns)."""
        spec = crd["spec"]
        names = spec["names"]
        version = next(v for v in spec["versions"] if v.get("served", True))
        key: Key = (spec["group"], version["name"], names["plural"])
        subresources = set(version.get("subresources") or {})
        self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
            kind=names["kind"], singular=names.get("singular", names["plural"]),
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            shortnames=set(names.get("shortNames") or []), categories=set(names.get("categories") or []),
            verbs={"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"},
            subresources=subresources,
        )
        self.kinds[key] = names["kind"]
        self.printer_columns[key] = list(version.get("additionalPrinterColumns") or [])
        return key

    def _info(self, key: Key) -> kmock.ResourceInfo | None:
        for res in self.resources:
            if (res.group, res.version, res.plural) == key:
                return self.resources[res]
        return None

    def _kind(self, key: Key) -> str:
        info = self._info(key)
        return (info.kind if info and info.kind else None) or self.kinds.get(key) or key[2].capitalize()

    def _namespaced(self, key: Key) -> bool:
        info = self._info(key)
        return bool(info.namespaced) if info and info.namespaced is not None else True

    def _has_status(self, key: Key) -> bool:
        info = self._info(key)
        return bool(info and "status" in info.subresources)

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        # kmock repeats short names on subresources; a real server does not (kubectl warns otherwise).
        payload = await super()._serve_version(request)
        if isinstance(payload, dict):
            for entry in payload.get("resources", []):
                if "/" in entry.get("name", ""):
                    entry["shortNames"] = []
                    entry["categories"] = []
        return payload

    # --- the store, with events -------------------------------------------------------------------

    async def _emit(self, key: Key, kind: str, obj: dict[str, Any]) -> None:
        # Append before the first await: the log must stay in resourceVersion order (watchers resume by
        # bisecting it), and callers bump the version right before calling this.
        self.log[key].append((int(obj["metadata"]["resourceVersion"]), {"type": kind, "object": copy.deepcopy(obj)}))
        if len(self.log[key]) > EVENT_LOG_LIMIT:
            drop = len(self.log[key]) // 2
            self.log_start[key] = self.log[key][drop - 1][0]
            del self.log[key][:drop]
        async with self.changed:
            self.changed.notify_all()

    def _bump(self, obj: dict[str, Any]) -> None:
        self.revision += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.revision)

    def read(self, key: Key, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self.store.get((key, namespace if self._namespaced(key) else None, name))
        return copy.deepcopy(obj) if obj is not None else None

    def read_all(self, key: Key, namespace: str | None = None, labels: str = "") -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (k, ns, _), o in sorted(self.store.items(), key=lambda kv: (kv[0][1] or "",
                                                                                                kv[0][2]))
                if k == key and (namespace is None or ns == namespace)
                and (not labels or _selector_matches(labels, (o.get("metadata") or {}).get("labels") or {}))]

    async def create_obj(self, key: Key, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name or metadata.generateName is required")
            # Like the API server's 5 random characters, but never a taken name (it would answer 409).
            while True:
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                if (key, namespace or meta.get("namespace") or "default", meta["name"]) not in self.store:
                    break
        ns = (namespace or meta.get("namespace") or "default") if self._namespaced(key) else None
        if ns is not None:
            meta["namespace"] = ns
            # A permissive server: the namespace springs into being (a real one would say 404).
            if (NAMESPACES, None, ns) not in self.store:
                await self.create_obj(NAMESPACES, None, {"metadata": {"name": ns}})
        okey: ObjKey = (key, ns, meta["name"])
        if okey in self.store:
            raise ApiError(409, "AlreadyExists", f'{key[2]} "{meta["name"]}" already exists')
        obj.setdefault("apiVersion", f"{key[0]}/{key[1]}" if key[0] else key[1])
        obj.setdefault("kind", self._kind(key))
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)
        if self._has_status(key):
            obj.pop("status", None)  # status is written only through /status
        self._bump(obj)
        self.store[okey] = obj
        if key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self.register_crd(obj)
        await self._emit(key, "ADDED", obj)
        return copy.deepcopy(obj)

    async def patch_obj(self, key: Key, namespace: str | None, name: str, patch: Any, *,
                    subresource: str | None = None, json_patch: bool = False) -> dict[str, Any]:
        okey: ObjKey = (key, namespace if self._namespaced(key) else None, name)
        old = self.store.get(okey)
        if old is None:
            raise ApiError(404, "NotFound", f'{key[2]} "{name}" not found')
        if json_patch:
            try:
                new = jsonpatch.apply_patch(old, patch, in_place=False)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise ApiError(422, "Invalid", f"the JSON patch test failed: {exc}") from exc
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise ApiError(422, "Invalid", str(exc)) from exc
        else:
            new = _merge(old, patch)
        if self._has_status(key):
            # The /status split: the main endpoint ignores status, /status changes nothing else.
            if subresource == "status":
                new = {**copy.deepcopy(old), "status": new.get("status")}
                if new["status"] is None:
                    new.pop("status")
            else:
                new["status"] = copy.deepcopy(old.get("status"))
                if new["status"] is None:
                    new.pop("status")
        new["metadata"] = {**new.get("metadata", {}),
                           **{k: old["metadata"][k] for k in ("uid", "creationTimestamp", "namespace", "name")
                              if k in old["metadata"]}}
        if subresource != "status" and new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if new == old:
            return copy.deepcopy(old)
        self._bump(new)
        self.store[okey] = new
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            await self._remove(okey)
            return copy.deepcopy(new)
        await self._emit(key, "MODIFIED", new)
        return copy.deepcopy(new)

    async def patch_status(self, key: Key, namespace: str | None, name: str,
                           status: Mapping[str, Any]) -> dict[str, Any]:
        return await self.patch_obj(key, namespace, name, {"status": status}, subresource="status")

    async def delete_obj(self, key: Key, namespace: str | None, name: str) -> dict[str, Any]:
        okey: ObjKey = (key, namespace if self._namespaced(key) else None, name)
        obj = self.store.get(okey)
        if obj is None:
            raise ApiError(404, "NotFound", f'{key[2]} "{name}" not found')
        meta = obj["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = _now()
                self._bump(obj)
                await self._emit(key, "MODIFIED", obj)
            return copy.deepcopy(obj)
        await self._remove(okey)
        return copy.deepcopy(obj)

    async def _remove(self, okey: ObjKey) -> None:
        obj = self.store.pop(okey)
        self._bump(obj)
        await self._emit(okey[0], "DELETED", obj)
        # Garbage collection (background propagation): dependents go once their owner is gone.
        uid = obj["metadata"].get("uid")
        dependents = [k for k, o in self.store.items()
                      if any(ref.get("uid") == uid for ref in (o.get("metadata") or {}).get("ownerReferences") or [])]
        for dep in dependents:
            if dep in self.store:
                await self.delete_obj(dep[0], dep[1], dep[2])

    # --- HTTP -------------------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's path parser takes /api/v1/namespaces[/NAME] for a namespace prefix and fails;
        # kopf lists and watches namespaces in namespace-scoped mode, so parse those paths here.
        match = re.fullmatch(r"/api/v1/namespaces(?:/([^/]+))?", raw_request.path)
        if match is None:
            return await super().__call__(raw_request)
        await raw_request.read()
        try:
            data = await raw_request.json()
        except ValueError:
            data = None
        name = match.group(1)
        method = enums.method(raw_request.method)
        action = parsing.guess_k8s(parsing.ParsedPath("", "v1", "namespaces", None, name), method,
                                   dict(raw_request.query))
        request = rendering.Request(
            raw_request=raw_request, url=raw_request.url, method=raw_request.method,
            params=dict(raw_request.query), headers=dict(raw_request.headers), data=data,
            action=action, resource=references.resource(group="", version="v1", plural="namespaces"),
            namespace=None, name=name,
        )
        return await self._handle(request)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is None or request.action is None or res.plural is None or res.version is None:
            return await super()._handle(request)
        key: Key = (res.group or "", res.version, res.plural)
        if self._info(key) is None:
            return await super()._handle(request)  # unknown resource: kmock's 404s
        try:
            if request.action == enums.action.WATCH:
                return await self._watch(request, key)
            if request.action == enums.action.LIST:
                return self._respond(request, key, self._list_body(request, key))
            if request.action == enums.action.FETCH:
                obj = self.read(key, request.namespace, request.name or "")
                if obj is None:
                    raise ApiError(404, "NotFound", f'{key[2]} "{request.name}" not found')
                return self._respond(request, key, obj, single=True)
            if request.action == enums.action.CREATE:
                return aiohttp.web.json_response(await self.create_obj(key, request.namespace, request.data or {}),
                                                 status=201)
            if request.action == enums.action.UPDATE:
                content_type = request.headers.get("Content-Type", "")
                result = await self.patch_obj(key, request.namespace, request.name or "", request.data,
                                          subresource=request.subresource,
                                          json_patch="json-patch" in content_type)
                return aiohttp.web.json_response(result)
            if request.action == enums.action.DELETE:
                return aiohttp.web.json_response(await self.delete_obj(key, request.namespace, request.name or ""))
        except ApiError as exc:
            return aiohttp.web.json_response(
                {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                 "reason": exc.reason, "message": exc.message, "code": exc.code}, status=exc.code)
        return await super()._handle(request)

    def _list_body(self, request: rendering.Request, key: Key) -> dict[str, Any]:
        items = self.read_all(key, request.namespace, request.params.get("labelSelector", ""))
        fields = request.params.get("fieldSelector", "")
        if fields:
            items = [i for i in items if _field_matches(fields, i)]
        api_version = f"{key[0]}/{key[1]}" if key[0] else key[1]
        return {"apiVersion": api_version, "kind": f"{self._kind(key)}List",
                "metadata": {"resourceVersion": str(self.revision)}, "items": items}

    def _respond(self, request: rendering.Request, key: Key, body: dict[str, Any], *,
                 single: bool = False) -> aiohttp.web.StreamResponse:
        accept = request.headers.get("Accept", "")
        if "as=Table" in accept:
            # Server-side printing, as kubectl asks for it: the CRD's additionalPrinterColumns.
            objects = [body] if single else body["items"]
            columns = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
            printer = self.printer_columns.get(key) or [
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
            columns += [{"name": c["name"], "type": c.get("type", "string"), "format": "",
                         "description": c.get("description", ""), "priority": c.get("priority", 0)}
                        for c in printer]
            rows = []
            for obj in objects:
                cells: list[Any] = [obj["metadata"]["name"]]
                for c in printer:
                    value = _jsonpath(obj, c["jsonPath"])
                    cells.append(_age(value) if c.get("type") == "date" else ("" if value is None else value))
                rows.append({"cells": cells, "object": {
                    "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}})
            return aiohttp.web.json_response({
                "kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.revision)}, "columnDefinitions": columns, "rows": rows})
        return aiohttp.web.json_response(body)

    async def _watch(self, request: rendering.Request, key: Key) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        assert raw is not None
        params = request.params
        since = params.get("resourceVersion") or ""
        labels = params.get("labelSelector", "")
        namespace = request.namespace
        timeout = float(params.get("timeoutSeconds") or 3600)
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})

        def wanted(event: dict[str, Any]) -> bool:
            meta = event["object"].get("metadata") or {}
            if namespace is not None and meta.get("namespace") != namespace:
                return False
            if request.name is not None and meta.get("name") != request.name:
                return False
            return not labels or _selector_matches(labels, meta.get("labels") or {})

        async with self.changed:
            # Snapshot and subscription under one lock: nothing slips between them.
            if since and since not in ("0",):
                start = int(since)
                if start < self.log_start[key]:
                    await response.prepare(raw)
                    gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                         "code": 410, "reason": "Expired",
                                                         "message": "too old resource version"}}
                    await response.write(json.dumps(gone).encode() + b"\n")
                    return response
                backlog = [e for rv, e in self.log[key] if rv > start]
            else:
                start = self.revision
                backlog = [{"type": "ADDED", "object": o} for o in self.read_all(key, namespace)]
        await response.prepare(raw)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            for event in backlog:
                if wanted(event):
                    await response.write(json.dumps(event).encode() + b"\n")
            while True:
                async with self.changed:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    log = self.log[key]
                    if not log or log[-1][0] <= start:
                        try:
                            # Wake up now and then: aiohttp does not cancel a handler whose client left.
                            await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 1.0))
                        except TimeoutError:
                            if raw.transport is None or raw.transport.is_closing():
                                break
                            continue
                    # The log is ordered by revision: take everything after the last one sent.
                    fresh = log[bisect.bisect_right(log, start, key=lambda item: item[0]):]
                for rv, event in fresh:
                    start = rv
                    if wanted(event):
                        await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response


def resource_key(group: str, version: str, plural: str) -> Key:
    return (group, version, plural)


LLMD: Key = ("stratus.dev", "v1alpha1", "llmdeployments")
JOBS: Key = ("batch", "v1", "jobs")
DEPLOYMENTS: Key = ("apps", "v1", "deployments")
SERVICES: Key = ("", "v1", "services")
CONFIGMAPS: Key = ("", "v1", "configmaps")
PODS: Key = ("", "v1", "pods")
NODES: Key = ("", "v1", "nodes")
EVENTS: Key = ("", "v1", "events")
HPAS: Key = ("autoscaling", "v2", "horizontalpodautoscalers")
PVCS: Key = ("", "v1", "persistentvolumeclaims")
NAMESPACES: Key = ("", "v1", "namespaces")
SECRETS: Key = ("", "v1", "secrets")
