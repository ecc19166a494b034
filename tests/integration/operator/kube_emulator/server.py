"""The emulated API server: kmock's HTTP server and discovery, with a store that behaves as a real API server's.

kmock 0.8 alone assigns no uid/creationTimestamp/resourceVersion, replays stale objects on watches, ignores
generateName, selectors and the /status split, lists without kind/apiVersion, validates nothing, merges every
patch the same way, does no garbage collection and registers nothing for a posted CRD. This server keeps
kmock's HTTP plumbing and discovery and serves objects from its own store:

- every write of a built-in kind is defaulted, pruned (or refused, under strict field validation) and
  validated as the API server would (validation.py: schema plus semantic rules, immutable fields); a custom
  resource by its CRD's schema and CEL rules (custom.py). A refused write answers 422 with a Status body.
- PATCH takes merge, JSON and strategic merge patches and server-side apply (patch.py, apply.py), and the
  result of every patch is validated; managedFields record who owns what.
- a group, version or resource it does not serve (no CRD) is a plain-text 404, as Go's http.NotFound answers
  it, for every verb (a watch too); a request for such a resource is authorized first, as for a served one (a
  user not granted it gets 403); lists and watches in a namespace nobody made are served (empty).
- namespaces exist or not (404), and refuse new content while terminating (403); RBAC holds registered
  users to their roles (rbac.py); Pod Security and the default StorageClass admit pods and claims
  (admission.py); owners' deletion collects their dependents.

It runs no controllers: tests act as them, through the helpers (`create_obj`, `patch_obj`, `patch_status`,
`delete_obj`) or the stand-ins in controllers.py, which never block the loop.
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import copy
import datetime
import json
import re
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import kmock
import yaml
from kmock._internal import parsing

from . import admission, defaults, validation
from .apply import apply as server_side_apply
from .apply import record_update
from .custom import CustomKind
from .errors import (
    ApiError,
    already_exists,
    bad_request,
    conflict,
    forbidden_object,
    invalid,
    invalid_object,
    not_found_object,
    qualified_resource,
    required,
)
from .keys import CRDS, NAMESPACES, PODS, PVCS, STORAGECLASSES, Key, ObjKey, api_version
from .patch import APPLY, JSON, MERGE, STRATEGIC, json_patch, merge_patch, strategic_merge
from .rbac import ADMIN, ADMIN_TOKENS, User, allowed, denial
from .schema import ANY, Node, has_builtin_schema, prune, unknown_fields

EVENT_LOG_LIMIT = 200_000
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"


def _not_served() -> aiohttp.web.Response:
    """A group, version or resource nobody serves (its CRD not installed) falls through the API server's handlers
    to Go's http.NotFound, whatever the verb: a plain-text 404 and no Status (kmock answers a Status of its own,
    and streams a watch of an unknown resource forever)."""
    return aiohttp.web.Response(status=404, text="404 page not found\n")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Request:
    """Who is writing and how: what a real API server reads from the request and its query parameters."""

    manager: str = "emulator-test"
    user: User = ADMIN
    field_validation: str = "Strict"  # helpers are strict; HTTP requests default to Warn, as on a real server
    force: bool = False
    dry_run: bool = False
    helper: bool = True  # a test's own call (may create namespaces on the fly), not an HTTP client's
    explicit_manager: bool = False  # the fieldManager query parameter was given (apply requires it)
    warnings: list[str] = field(default_factory=list)


_REQUEST: contextvars.ContextVar[Request] = contextvars.ContextVar("emulator_request")


def _request() -> Request:
    try:
        return _REQUEST.get()
    except LookupError:
        return Request()


@dataclass
class AuditRecord:
    """One HTTP request and its answer, as an audit log holds it."""

    verb: str
    key: Key | None
    namespace: str | None
    name: str | None
    subresource: str | None
    user: str
    user_agent: str
    code: int
    message: str = ""
    warnings: tuple[str, ...] = ()
    content_type: str = ""

    @property
    def resource(self) -> str:
        if self.key is None:
            return ""
        return qualified_resource(self.key) + (f"/{self.subresource}" if self.subresource else "")


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in re.split(r",(?![^(]*\))", selector))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif " notin " in term:
            k, values = term.split(" notin ", 1)
            if labels.get(k.strip()) in {x.strip() for x in values.strip("() ").split(",")}:
                return False
        elif " in " in term:
            k, values = term.split(" in ", 1)
            if labels.get(k.strip()) not in {x.strip() for x in values.strip("() ").split(",")}:
                return False
        elif "==" in term or "=" in term:
            k, v = re.split("==?", term, maxsplit=1)
            if labels.get(k.strip()) != v.strip():
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
        if (str(node if node is not None else "") == value) == neg:
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


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal apart from the bookkeeping a write always touches (resourceVersion, managedFields times)."""

    def strip(o: dict[str, Any]) -> dict[str, Any]:
        meta = {k: v for k, v in (o.get("metadata") or {}).items() if k not in ("resourceVersion", "managedFields")}
        meta["managedFields"] = [{k: v for k, v in m.items() if k != "time"}
                                 for m in (o.get("metadata") or {}).get("managedFields") or []]
        return {**o, "metadata": meta}

    return strip(a) == strip(b)


class Emulator(kmock.KubernetesEmulator):
    """An in-memory API server good enough for kopf, our client, the kubernetes client and kubectl, and strict."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store: dict[ObjKey, dict[str, Any]] = {}
        self.log: dict[Key, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        self.log_start: dict[Key, int] = defaultdict(int)
        self.revision = 0
        # Set, and replaced, at every change: watchers wait on it (no lock, so a cancelled watcher holds nothing).
        self._tick = asyncio.Event()
        self.printer_columns: dict[Key, list[dict[str, Any]]] = {}
        self.kinds: dict[Key, str] = {}
        self.custom: dict[Key, CustomKind] = {}
        # Objects created with validate=False: later writes to them skip validation too, as on a server whose
        # CRD carries no schema.
        self.unvalidated: set[ObjKey] = set()
        self.users: dict[str, User] = dict.fromkeys(ADMIN_TOKENS, ADMIN)
        self.audit: list[AuditRecord] = []
        # Admission plugins a cluster may or may not run (kind's config and GKE enable this one).
        self.extended_resource_toleration = False
        # The kubelet's view of each node's filesystem: host paths that exist (see controllers.Kubelet).
        self.host_dirs: dict[str, set[str]] = defaultdict(set)
        self._controllers: Any = None
        self.resources.load_bundled()
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.revision += 1
            self.store[(NAMESPACES, None, ns)] = {
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                             "resourceVersion": str(self.revision),
                             "labels": {"kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}

    # --- registration and what the server knows of each resource ----------------------------------------------

    def register_crd(self, crd: Mapping[str, Any]) -> Key:
        """What the API server does when a CRD is created: serve its resource, validate its objects by its schema."""
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
        self.custom[key] = CustomKind.from_crd(dict(crd))
        return key

    def add_user(self, token: str, user: User) -> None:
        """Requests bearing `token` act as `user`, held to the RBAC roles bound to it."""
        self.users[token] = user

    @property
    def controllers(self) -> Any:
        """The controller stand-ins (scheduler, kubelet, volume binder, workload and namespace controllers)."""
        if self._controllers is None:
            from .controllers import Controllers

            self._controllers = Controllers(self)
        return self._controllers

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

    def node_of(self, key: Key) -> Node:
        """The schema Node of a kind (for strategic merge, apply and pruning)."""
        if key in self.custom:
            return self.custom[key].node
        node = Node.builtin(api_version(key), self._kind(key))
        return node if node is not None else ANY

    async def _serve_version(self, request: Any) -> Any:
        # kmock repeats short names on subresources; a real server does not (kubectl warns otherwise).
        payload = await super()._serve_version(request)
        if isinstance(payload, dict):
            for entry in payload.get("resources", []):
                if "/" in entry.get("name", ""):
                    entry["shortNames"] = []
                    entry["categories"] = []
        return payload

    # --- the store, with events -----------------------------------------------------------------------------

    async def _emit(self, key: Key, kind: str, obj: dict[str, Any]) -> None:
        # Append before the first await: the log must stay in resourceVersion order (watchers resume by
        # bisecting it), and callers bump the version right before calling this.
        self.log[key].append((int(obj["metadata"]["resourceVersion"]), {"type": kind, "object": copy.deepcopy(obj)}))
        if len(self.log[key]) > EVENT_LOG_LIMIT:
            drop = len(self.log[key]) // 2
            self.log_start[key] = self.log[key][drop - 1][0]
            del self.log[key][:drop]
        self._tick.set()
        self._tick = asyncio.Event()

    def _bump(self, obj: dict[str, Any]) -> None:
        self.revision += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.revision)

    def _okey(self, key: Key, namespace: str | None, name: str) -> ObjKey:
        return (key, (namespace or "default") if self._namespaced(key) else None, name)

    def read(self, key: Key, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self.store.get((key, namespace if self._namespaced(key) else None, name))
        return copy.deepcopy(obj) if obj is not None else None

    def read_all(self, key: Key, namespace: str | None = None, labels: str = "") -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (k, ns, _), o in sorted(self.store.items(), key=lambda kv: (kv[0][1] or "",
                                                                                                kv[0][2]))
                if k == key and (namespace is None or ns == namespace)
                and (not labels or selector_matches(labels, (o.get("metadata") or {}).get("labels") or {}))]

    # --- admission: defaults, pruning, validation ---------------------------------------------------------------

    def _prune(self, key: Key, obj: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        """Unknown fields: refused under Strict, dropped with a warning under Warn, dropped under Ignore."""
        if key in self.custom:
            node = self.custom[key].node
        elif has_builtin_schema(api_version(key), self._kind(key)):
            node = self.node_of(key)
        else:
            return obj
        if subresource == "status":
            # A status write changes status alone: only status is pruned.
            status_node = node.field("status") or ANY
            unknown = [f"status.{u}" for u in unknown_fields(obj.get("status"), status_node)]
            if unknown and _request().field_validation == "Warn":
                _request().warnings.extend(f'unknown field "{u}"' for u in unknown)
            if "status" in obj:
                obj = {**obj, "status": prune(obj["status"], status_node)}
            return obj
        unknown = list(unknown_fields(obj, node))
        if not unknown:
            return obj
        ctx = _request()
        if ctx.field_validation == "Strict":
            kind = self._kind(key)
            raise bad_request(f'{kind} in version "{key[1]}" cannot be handled as a {kind}: strict decoding error: '
                              + ", ".join(f'unknown field "{u}"' for u in unknown))
        if ctx.field_validation == "Warn":
            ctx.warnings += [f'unknown field "{u}"' for u in unknown]
        return prune(obj, node)  # type: ignore[no-any-return]

    def _admit(self, key: Key, obj: dict[str, Any], old: dict[str, Any] | None, *,
               subresource: str | None) -> dict[str, Any]:
        """Defaulting, mutating admission and validation of the object about to be stored; raises when refused."""
        kind = self._kind(key)
        name = (obj.get("metadata") or {}).get("name", "")
        obj = self._prune(key, obj, subresource)
        if key in self.custom:
            custom = self.custom[key]
            obj = custom.default(obj)
            errors = list(validation.metadata(key, obj.get("metadata"), (old or {}).get("metadata")))
            errors += custom.errors(obj, old, status_only=subresource == "status")
            if errors:
                raise invalid_object(kind, key, name, errors)
            return obj
        if subresource is None:
            defaults.apply(key, obj, old)
            if key == PVCS and old is None:
                self._default_storage_class(obj)
            if key == PODS and old is None and self.extended_resource_toleration:
                admission.extended_resource_tolerations(obj.get("spec") or {})
        if key == ("", "v1", "secrets"):
            problem = validation.decode_secret_data(obj)
            if problem:
                raise bad_request(f'Secret in version "v1" cannot be handled as a Secret: {problem}')
        try:
            errors = validation.validate(key, obj, old, subresource=subresource)
        except validation.DecodeError as exc:
            raise bad_request(f'{kind} in version "{key[1]}" cannot be handled as a {kind}: {exc}') from exc
        if errors:
            raise invalid_object(kind, key, name, errors)
        if subresource is None:
            self._pod_security(key, obj, old)
        return obj

    def _default_storage_class(self, pvc: dict[str, Any]) -> None:
        spec = pvc.setdefault("spec", {})
        if "storageClassName" in spec:
            return  # "" asks for no class at all; a name asks for that class
        for sc in self.read_all(STORAGECLASSES):
            if (sc["metadata"].get("annotations") or {}).get(DEFAULT_CLASS_ANNOTATION) == "true":
                spec["storageClassName"] = sc["metadata"]["name"]
                return

    def _pod_security(self, key: Key, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        ns = (obj.get("metadata") or {}).get("namespace")
        spec = admission.pod_template(obj)
        if ns is None or spec is None:
            return
        namespace = self.store.get((NAMESPACES, None, ns))
        ctx = _request()
        enforce = admission.level_of(namespace, "enforce")
        found = admission.violations(spec, enforce)
        if found and key == PODS and old is None:
            name = (obj.get("metadata") or {}).get("name", "")
            raise forbidden_object(key, name, f'violates PodSecurity "{enforce}:latest": ' + "; ".join(found))
        if found:
            ctx.warnings.append(f'would violate PodSecurity "{enforce}:latest": ' + "; ".join(found))
        warn = admission.level_of(namespace, "warn")
        if warn != enforce:
            found = admission.violations(spec, warn)
            if found:
                ctx.warnings.append(f'would violate PodSecurity "{warn}:latest": ' + "; ".join(found))

    def _scope(self, key: Key, subresource: str | None) -> str:
        if subresource == "status":
            return "status"
        return "main" if self._has_status(key) else "all"

    # --- writes ---------------------------------------------------------------------------------------------

    async def _namespace_for_create(self, key: Key, ns: str) -> None:
        namespace = self.store.get((NAMESPACES, None, ns))
        ctx = _request()
        if namespace is None:
            if ctx.helper:
                # A test's own call may create into a namespace nobody made (a real server would say 404).
                await self.create_obj(NAMESPACES, None, {"metadata": {"name": ns}})
                return
            raise not_found_object(NAMESPACES, ns)
        if namespace["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", f"unable to create new content in namespace {ns} because it is being "
                                             f"terminated", {"name": "", "group": key[0], "kind": key[2],
                                                             "causes": [{"reason": "NamespaceTerminating",
                                                                         "message": f"namespace {ns} is being "
                                                                                    f"terminated",
                                                                         "field": "metadata.namespace"}]})

    async def create_obj(self, key: Key, namespace: str | None, body: Mapping[str, Any], *,
                         validate: bool = True) -> dict[str, Any]:
        """POST: create, as the API server does (validate=False: as a server without the kind's schema)."""
        if not isinstance(body, Mapping):
            raise bad_request("the body of the request was in an unknown format")
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        expected = api_version(key)
        if obj.get("apiVersion") not in (None, expected):
            raise bad_request(f"the API version in the data ({obj['apiVersion']}) does not match the expected API "
                              f"version ({expected})")
        if obj.get("kind") not in (None, self._kind(key)):
            raise bad_request(f"the kind in the data ({obj['kind']}) does not match the expected kind "
                              f"({self._kind(key)})")
        ns = None
        if self._namespaced(key):
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the "
                                  "request")
            ns = namespace or meta.get("namespace") or "default"
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise invalid_object(self._kind(key), key, "", [required(
                    "metadata.name", "name or generateName is required")])
            # Like the API server's 5 random characters, but never a taken name (it would answer 409).
            while True:
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                if (key, ns, meta["name"]) not in self.store:
                    break
        if ns is not None:
            await self._namespace_for_create(key, ns)
        okey: ObjKey = (key, ns, meta["name"])
        if okey in self.store:
            raise already_exists(key, meta["name"])
        obj["apiVersion"] = expected
        obj["kind"] = self._kind(key)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        for server_field in ("deletionTimestamp", "managedFields", "resourceVersion"):
            meta.pop(server_field, None)
        if self._has_status(key) and key not in (("", "v1", "nodes"),):
            obj.pop("status", None)  # status is written only through /status
        if key == PODS:
            obj["status"] = {"phase": "Pending", "qosClass": admission.qos_class(obj.get("spec") or {})}
        if key == NAMESPACES:
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["status"] = {"phase": "Active"}
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        if validate:
            obj = self._admit(key, obj, None, subresource=None)
        ctx = _request()
        record_update(None, obj, self.node_of(key), ctx.manager, expected, scope=self._scope(key, None))
        if ctx.dry_run:
            return copy.deepcopy(obj)
        self._bump(obj)
        self.store[okey] = obj
        if not validate:
            self.unvalidated.add(okey)
        if key == CRDS:
            self.register_crd(obj)
        await self._emit(key, "ADDED", obj)
        return copy.deepcopy(obj)

    async def patch_obj(self, key: Key, namespace: str | None, name: str, patch: Any, *,
                        subresource: str | None = None, json_patch: bool = False, patch_type: str | None = None,
                        validate: bool = True) -> dict[str, Any]:
        """PATCH (merge by default; json_patch or patch_type pick another kind), the result validated."""
        okey = self._okey(key, namespace, name)
        old = self.store.get(okey)
        kind_of_patch = JSON if json_patch else (patch_type or MERGE)
        if kind_of_patch == APPLY:
            return await self.apply_obj(key, namespace, name, patch, subresource=subresource)
        if old is None:
            raise not_found_object(key, name)
        if kind_of_patch == JSON:
            new = json_patch_apply(old, patch)
        elif kind_of_patch == STRATEGIC:
            if key in self.custom:
                raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                                                            "accepted media types include: application/json-patch"
                                                            "+json, application/merge-patch+json, application/"
                                                            "apply-patch+yaml")
            new = strategic_merge(old, patch, self.node_of(key))
        elif kind_of_patch == MERGE:
            if not isinstance(patch, dict):
                raise bad_request("json: cannot unmarshal into a merge patch: not an object")
            new = merge_patch(old, patch)
        else:
            accepted = ", ".join((JSON, MERGE, APPLY))
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                        f"accepted media types include: {accepted}")
        return await self._update(key, okey, old, new, subresource=subresource, validate=validate)

    async def update_obj(self, key: Key, namespace: str | None, name: str, body: Mapping[str, Any], *,
                         subresource: str | None = None) -> dict[str, Any]:
        """PUT: replace the object (status and server-set metadata kept as the subresource split says)."""
        okey = self._okey(key, namespace, name)
        old = self.store.get(okey)
        if old is None:
            raise not_found_object(key, name)
        new = copy.deepcopy(dict(body))
        if (new.get("metadata") or {}).get("name") not in (None, name):
            raise bad_request("the name of the object does not match the name on the URL")
        return await self._update(key, okey, old, new, subresource=subresource, replace=True)

    async def apply_obj(self, key: Key, namespace: str | None, name: str, config: Any, *,
                        subresource: str | None = None) -> dict[str, Any]:
        """Server-side apply of `config` by the request's field manager (creates the object when missing)."""
        ctx = _request()
        if not isinstance(config, dict):
            raise bad_request("error decoding YAML: the apply configuration must be an object")
        if not ctx.helper and not ctx.explicit_manager:
            raise invalid_object("PatchOptions", ("meta.k8s.io", "v1", "patchoptions"), "", [required(
                "fieldManager", "is required for apply patch")])
        for required_field in ("apiVersion", "kind"):
            if not config.get(required_field):
                raise bad_request(f"{required_field} must be set in an apply configuration")
        meta = config.get("metadata") or {}
        if meta.get("name") not in (None, name):
            raise bad_request("the name of the object does not match the name on the URL")
        okey = self._okey(key, namespace, name)
        old = self.store.get(okey)
        node = self.node_of(key)
        scope = self._scope(key, subresource)
        if old is None:
            if subresource:
                raise not_found_object(key, name)
            created = server_side_apply(None, config, node, ctx.manager, api_version(key), force=ctx.force,
                                        scope=scope)
            created.setdefault("metadata", {})["name"] = name
            entries = created["metadata"].pop("managedFields", None)
            obj = await self._create_applied(key, namespace, created, entries)
            return obj
        new = server_side_apply(old, config, node, ctx.manager, api_version(key), force=ctx.force, scope=scope,
                                subresource=subresource or "")
        return await self._update(key, okey, old, new, subresource=subresource, applied=True)

    async def _create_applied(self, key: Key, namespace: str | None, obj: dict[str, Any],
                              entries: list[dict[str, Any]] | None) -> dict[str, Any]:
        ctx = _request()
        saved = ctx.manager
        created = await self.create_obj(key, namespace, obj)
        # The creation counts as the applier's Apply, not an Update.
        stored = self.store[self._okey(key, namespace or created["metadata"].get("namespace"),
                                       created["metadata"]["name"])]
        if entries:
            for entry in entries:
                entry["manager"] = saved
            stored["metadata"]["managedFields"] = entries
        return copy.deepcopy(stored)

    async def _update(self, key: Key, okey: ObjKey, old: dict[str, Any], new: Any, *, subresource: str | None,
                      replace: bool = False, applied: bool = False, validate: bool = True) -> dict[str, Any]:
        if not isinstance(new, dict):
            raise bad_request("the object must be a JSON object")
        new = copy.deepcopy(new)
        meta = new.get("metadata")
        if not isinstance(meta, dict):
            meta = new["metadata"] = {}
        old_meta = old["metadata"]
        sent_version = meta.get("resourceVersion")
        if sent_version and sent_version != old_meta.get("resourceVersion"):
            raise conflict(key, old_meta["name"], "the object has been modified; please apply your changes to the "
                                                  "latest version and try again")
        for k in ("uid", "creationTimestamp", "namespace", "name", "generation", "resourceVersion"):
            if k in old_meta:
                meta[k] = old_meta[k]
        if old_meta.get("deletionTimestamp"):
            meta["deletionTimestamp"] = old_meta["deletionTimestamp"]
        else:
            meta.pop("deletionTimestamp", None)
        if not applied and "managedFields" in old_meta:
            meta["managedFields"] = old_meta["managedFields"]
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if self._has_status(key):
            # The /status split: the main endpoint ignores status, /status changes nothing else.
            if subresource == "status":
                new = {**copy.deepcopy(old), "status": new.get("status")}
                if new["status"] is None:
                    new.pop("status")
                if applied:
                    new["metadata"]["managedFields"] = meta.get("managedFields", [])
            else:
                new["status"] = copy.deepcopy(old.get("status"))
                if new["status"] is None:
                    new.pop("status")
        elif subresource == "status":
            raise not_found_object(key, old_meta["name"])
        if key == NAMESPACES and subresource is None:
            new["spec"] = copy.deepcopy(old.get("spec"))
        if validate and (okey not in self.unvalidated or subresource == "status"):
            new = self._admit(key, new, old, subresource=subresource)
        if subresource != "status" and new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = int(old_meta.get("generation", 1)) + 1
        if _same(new, old):
            return copy.deepcopy(old)
        ctx = _request()
        if not applied:
            record_update(old, new, self.node_of(key), ctx.manager, api_version(key), subresource or "",
                          scope=self._scope(key, subresource))
        if ctx.dry_run:
            return copy.deepcopy(new)
        self._bump(new)
        self.store[okey] = new
        released = new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers")
        if released and (key != NAMESPACES or not (new.get("spec") or {}).get("finalizers")):
            await self._remove(okey)
            return copy.deepcopy(new)
        await self._emit(key, "MODIFIED", new)
        return copy.deepcopy(new)

    async def patch_status(self, key: Key, namespace: str | None, name: str,
                           status: Mapping[str, Any]) -> dict[str, Any]:
        return await self.patch_obj(key, namespace, name, {"status": status}, subresource="status")

    async def delete_obj(self, key: Key, namespace: str | None, name: str, *,
                         propagation: str = "Background") -> dict[str, Any]:
        okey = self._okey(key, namespace, name)
        obj = self.store.get(okey)
        if obj is None:
            raise not_found_object(key, name)
        meta = obj["metadata"]
        if key == NAMESPACES:
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = _now()
                obj.setdefault("status", {})["phase"] = "Terminating"
                self._bump(obj)
                await self._emit(key, "MODIFIED", obj)
            return copy.deepcopy(obj)
        if propagation == "Orphan":
            for dep_key, dep in list(self.store.items()):
                refs = (dep.get("metadata") or {}).get("ownerReferences") or []
                kept = [r for r in refs if r.get("uid") != meta.get("uid")]
                if len(kept) != len(refs):
                    dep["metadata"]["ownerReferences"] = kept
                    self._bump(dep)
                    await self._emit(dep_key[0], "MODIFIED", dep)
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = _now()
                self._bump(obj)
                await self._emit(key, "MODIFIED", obj)
            return copy.deepcopy(obj)
        await self._remove(okey)
        return copy.deepcopy(obj)

    async def _remove(self, okey: ObjKey) -> None:
        obj = self.store.pop(okey, None)
        self.unvalidated.discard(okey)
        if obj is None:
            return
        self._bump(obj)
        await self._emit(okey[0], "DELETED", obj)
        # Garbage collection (background propagation): dependents go once their owner is gone.
        uid = obj["metadata"].get("uid")
        dependents = [k for k, o in self.store.items()
                      if any(ref.get("uid") == uid for ref in (o.get("metadata") or {}).get("ownerReferences") or [])]
        for dep in dependents:
            if dep in self.store and not self.store[dep]["metadata"].get("deletionTimestamp"):
                await self.delete_obj(dep[0], dep[1], dep[2])

    @contextmanager
    def acting_as(self, manager: str, **options: Any) -> Iterator[Request]:
        """Helper calls inside act with this field manager (and options: force, field_validation, user)."""
        ctx = Request(manager=manager, **options)
        token = _REQUEST.set(ctx)
        try:
            yield ctx
        finally:
            _REQUEST.reset(token)

    # --- HTTP -----------------------------------------------------------------------------------------------

    def _route(self, path: str) -> tuple[Key, str | None, str | None, str | None] | None:
        """(resource, namespace, name, subresource) of a resource URL, served or not; None for discovery and the
        rest."""
        match = re.fullmatch(r"/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?", path)
        if match:
            return NAMESPACES, None, match.group(1), match.group(2)
        parsed = parsing.parse_path(path)
        if parsed.group is None or parsed.version is None or parsed.plural is None:
            return None
        key: Key = (parsed.group or "", parsed.version, parsed.plural)
        return key, parsed.namespace, parsed.name, parsed.subresource

    def _serves(self, path: str) -> bool:
        """Whether a path that is no resource URL is the server's: its own (/api, /apis, /version...) or the
        discovery of a group or group version it serves."""
        parsed = parsing.parse_path(path)
        if parsed.group is None:
            return True
        return any(res.group == parsed.group and parsed.version in (None, res.version) for res in self.resources)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # Authentication comes first, discovery included: a bearer token nobody issued is 401 with this body.
        auth = raw_request.headers.get("Authorization", "")
        if auth and auth.removeprefix("Bearer ").strip() not in self.users:
            return aiohttp.web.json_response({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "Unauthorized",
                "reason": "Unauthorized", "code": 401}, status=401)
        route = self._route(raw_request.path)
        if route is None:
            # Discovery and the server's own paths, authorized for everyone (system:discovery is bound to
            # system:authenticated); the discovery of a group or version nobody serves is the plain-text 404.
            if not self._serves(raw_request.path):
                return _not_served()
            return await super().__call__(raw_request)
        key, namespace, name, subresource = route
        params = dict(raw_request.query)
        method = raw_request.method.upper()
        if method == "GET":
            verb = "watch" if params.get("watch") in ("true", "1") else "get" if name else "list"
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                    "DELETE": "delete" if name else "deletecollection"}.get(method, method.lower())
        user = self.users.get(auth.removeprefix("Bearer ").strip(), ADMIN)  # (no header: the harness's own calls)
        agent = raw_request.headers.get("User-Agent", "")
        content_type = raw_request.headers.get("Content-Type", "").split(";")[0].strip()
        manager = params.get("fieldManager") or (agent.split("/")[0] if agent else "unknown")
        ctx = Request(manager=manager, user=user, field_validation=params.get("fieldValidation", "Warn"),
                      force=params.get("force") in ("true", "1"), dry_run=bool(params.get("dryRun")), helper=False,
                      explicit_manager="fieldManager" in params)
        token = _REQUEST.set(ctx)
        record = AuditRecord(verb, key, namespace, name, subresource, user.name, agent, 200,
                             content_type=content_type)
        self.audit.append(record)
        response: aiohttp.web.StreamResponse
        try:
            # Authorization comes before anything resolves the resource (WithAuthorization wraps the API
            # handlers), so a user not granted a resource is refused whether it is served or not.
            if not allowed(self.read_all, user, verb, key, subresource, namespace if self._namespaced(key) else None,
                           name or ""):
                raise forbidden_object(key, name or "", denial(user, verb, key, subresource,
                                                              namespace if self._namespaced(key) else None))
            if self._info(key) is None:
                response = _not_served()
            else:
                response = await self._dispatch(raw_request, verb, key, namespace, name, subresource, params,
                                                content_type)
        except ApiError as exc:
            record.code, record.message = exc.code, exc.message
            response = aiohttp.web.json_response(exc.status(), status=exc.code)
        finally:
            _REQUEST.reset(token)
        record.warnings = tuple(ctx.warnings)
        if ctx.warnings and not response.prepared:
            response.headers.extend(("Warning", f'299 - {json.dumps(w)}') for w in ctx.warnings)
        if record.code == 200:
            record.code = response.status
        return response

    async def _body(self, raw_request: aiohttp.web.BaseRequest, content_type: str) -> Any:
        text = (await raw_request.read()).decode() if raw_request.can_read_body else ""
        if not text:
            return None
        try:
            return yaml.safe_load(text) if content_type == APPLY else json.loads(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"the body of the request was in an unknown format: {exc}") from exc

    async def _dispatch(self, raw_request: aiohttp.web.BaseRequest, verb: str, key: Key, namespace: str | None,
                        name: str | None, subresource: str | None, params: dict[str, str],
                        content_type: str) -> aiohttp.web.StreamResponse:
        if verb == "watch":
            return await self._watch(raw_request, key, namespace, name, params)
        if verb == "list":
            return self._respond(raw_request, key, self._list_body(key, namespace, params))
        if subresource == "scale":
            return await self._scale(raw_request, verb, key, namespace, name or "", content_type)
        if verb == "get":
            obj = self.read(key, namespace, name or "")
            if obj is None:
                raise not_found_object(key, name or "")
            return self._respond(raw_request, key, obj, single=True)
        body = await self._body(raw_request, content_type)
        if verb == "create":
            return aiohttp.web.json_response(await self.create_obj(key, namespace, body or {}), status=201)
        if verb == "update":
            return aiohttp.web.json_response(await self.update_obj(key, namespace, name or "", body or {},
                                                                   subresource=subresource))
        if verb == "patch":
            if content_type not in (MERGE, JSON, STRATEGIC, APPLY):
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                                            f"accepted media types include: {JSON}, {MERGE}, "
                                                            f"{APPLY}, {STRATEGIC}")
            existed = self.read(key, namespace, name or "") is not None
            result = await self.patch_obj(key, namespace, name or "", body, subresource=subresource,
                                          patch_type=content_type)
            return aiohttp.web.json_response(result, status=201 if not existed else 200)
        if verb == "delete":
            propagation = (body or {}).get("propagationPolicy") or params.get("propagationPolicy") or "Background"
            return aiohttp.web.json_response(await self.delete_obj(key, namespace, name or "",
                                                                   propagation=propagation))
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource "
                                                f"({verb} {qualified_resource(key)})")

    async def _scale(self, raw_request: aiohttp.web.BaseRequest, verb: str, key: Key, namespace: str | None,
                     name: str, content_type: str) -> aiohttp.web.StreamResponse:
        """The scale subresource (kubectl scale): spec.replicas through an autoscaling/v1 Scale."""
        obj = self.read(key, namespace, name)
        if obj is None:
            raise not_found_object(key, name)

        def scale_of(o: dict[str, Any]) -> dict[str, Any]:
            return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                    "metadata": {k: o["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion",
                                                                 "creationTimestamp") if k in o["metadata"]},
                    "spec": {"replicas": (o.get("spec") or {}).get("replicas", 0)},
                    "status": {"replicas": (o.get("status") or {}).get("replicas", 0)}}

        if verb == "get":
            return aiohttp.web.json_response(scale_of(obj))
        body = await self._body(raw_request, content_type)
        current = scale_of(obj)
        if verb == "patch":
            if content_type == JSON:
                wanted = json_patch_apply(current, body)
            else:
                wanted = merge_patch(current, body)
        else:
            wanted = body or {}
        replicas = (wanted.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise invalid_object("Scale", ("autoscaling", "v1", "scales"), name, [invalid(
                "spec.replicas", replicas, "must be greater than or equal to 0")])
        updated = await self.patch_obj(key, namespace, name, {"spec": {"replicas": replicas}})
        return aiohttp.web.json_response(scale_of(updated))

    def _list_body(self, key: Key, namespace: str | None, params: dict[str, str]) -> dict[str, Any]:
        items = self.read_all(key, namespace, params.get("labelSelector", ""))
        fields = params.get("fieldSelector", "")
        if fields:
            items = [i for i in items if _field_matches(fields, i)]
        return {"apiVersion": api_version(key), "kind": f"{self._kind(key)}List",
                "metadata": {"resourceVersion": str(self.revision)}, "items": items}

    def _respond(self, raw_request: aiohttp.web.BaseRequest, key: Key, body: dict[str, Any], *,
                 single: bool = False) -> aiohttp.web.StreamResponse:
        accept = raw_request.headers.get("Accept", "")
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

    async def _watch(self, raw: aiohttp.web.BaseRequest, key: Key, namespace: str | None, name: str | None,
                     params: dict[str, str]) -> aiohttp.web.StreamResponse:
        since = params.get("resourceVersion") or ""
        labels = params.get("labelSelector", "")
        fields = params.get("fieldSelector", "")
        timeout = float(params.get("timeoutSeconds") or 3600)
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})

        def wanted(event: dict[str, Any]) -> bool:
            meta = event["object"].get("metadata") or {}
            if namespace is not None and meta.get("namespace") != namespace:
                return False
            if name is not None and meta.get("name") != name:
                return False
            if fields and not _field_matches(fields, event["object"]):
                return False
            return not labels or selector_matches(labels, meta.get("labels") or {})

        # The snapshot and the position to follow from are taken with no await between them: nothing slips in.
        if since and since not in ("0",):
            start = int(since)
            if start < self.log_start[key]:
                await response.prepare(raw)
                gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                     "code": 410, "reason": "Expired",
                                                     "message": "too old resource version"}}
                await response.write(json.dumps(gone).encode() + b"\n")
                return response
            entries = [(rv, e) for rv, e in self.log[key] if rv > start]
            backlog = [e for _, e in entries]
            # Follow on from the last one sent, or the backlog goes out twice (kopf then handles an object twice).
            start = entries[-1][0] if entries else start
        else:
            start = self.revision
            backlog = [{"type": "ADDED", "object": o} for o in self.read_all(key, namespace)]
        await response.prepare(raw)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            for event in backlog:
                if wanted(event):
                    await response.write(json.dumps(event).encode() + b"\n")
            while (remaining := deadline - loop.time()) > 0:
                log = self.log[key]
                if not log or log[-1][0] <= start:
                    tick = self._tick
                    try:
                        # Wake up now and then: aiohttp does not cancel a handler whose client left.
                        await asyncio.wait_for(tick.wait(), timeout=min(remaining, 1.0))
                    except TimeoutError:
                        if raw.transport is None or raw.transport.is_closing():
                            break
                    continue
                # The log is ordered by revision: take everything after the last one sent.
                for rv, event in log[bisect.bisect_right(log, start, key=lambda item: item[0]):]:
                    start = rv
                    if wanted(event):
                        await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response


def json_patch_apply(base: Any, operations: Any) -> Any:
    return json_patch(base, operations)
