"""The API server's validation of built-in kinds: the OpenAPI schema plus the rules the schema does not hold.

Each rule below is one the API server enforces (k8s.io/kubernetes pkg/apis/*/validation) and that an operator
can break: names and labels, pod volumes and mounts, resources (extended resources: integer, request == limit,
a limit whenever requested), tolerations, node affinity, workload selectors and strategies, Service ports,
PVC access modes, ConfigMap/Secret keys, HPA bounds, and the fields that are immutable once written.
Messages are worded as the API server words them (see errors.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from . import quantity
from .errors import (
    FieldError,
    Raw,
    duplicate,
    forbidden,
    invalid,
    not_found,
    not_supported,
    required,
)
from .keys import (
    CONFIGMAPS,
    DEPLOYMENTS,
    EVENTS,
    HPAS,
    JOBS,
    NAMESPACES,
    PODS,
    PVCS,
    REPLICASETS,
    SECRETS,
    SERVICES,
    Key,
)
from .schema import builtin_errors

# --- names and labels (k8s.io/apimachinery/pkg/util/validation) ---------------------------------------------

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")

_SUBDOMAIN_WORDS = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
_LABEL_WORDS = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
                "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
                "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
_DNS1035_WORDS = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                  "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
                  "regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")
_LABEL_VALUE_WORDS = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                      "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
                      "'12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")
_QUALIFIED_WORDS = ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                    "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")


def dns1123_subdomain(value: str) -> list[str]:
    out = []
    if len(value) > 253:
        out.append("must be no more than 253 characters")
    if not DNS1123_SUBDOMAIN.match(value):
        out.append(_SUBDOMAIN_WORDS)
    return out


def dns1123_label(value: str) -> list[str]:
    out = []
    if len(value) > 63:
        out.append("must be no more than 63 characters")
    if not DNS1123_LABEL.match(value):
        out.append(_LABEL_WORDS)
    return out


def dns1035_label(value: str) -> list[str]:
    out = []
    if len(value) > 63:
        out.append("must be no more than 63 characters")
    if not DNS1035_LABEL.match(value):
        out.append(_DNS1035_WORDS)
    return out


def label_value(value: str) -> list[str]:
    out = []
    if len(value) > 63:
        out.append("must be no more than 63 characters")
    if not LABEL_VALUE.match(value):
        out.append(_LABEL_VALUE_WORDS)
    return out


def qualified_name(value: str) -> list[str]:
    """A label or annotation key: an optional DNS subdomain prefix and '/', then a name of at most 63 characters."""
    prefix, sep, name = value.rpartition("/")
    out = []
    if sep:
        if not prefix:
            out.append("prefix part must be non-empty")
        else:
            out += ["prefix part " + m for m in dns1123_subdomain(prefix)]
    if not name:
        out.append("name part must be non-empty")
    else:
        if len(name) > 63:
            out.append("name part must be no more than 63 characters")
        if not QUALIFIED_NAME.match(name):
            out.append(_QUALIFIED_WORDS)
    return out


# How each kind's names are checked (the rest: DNS-1123 subdomain).
NAME_RULES = {SERVICES: dns1035_label, NAMESPACES: dns1123_label}


def labels(values: Any, path: str) -> Iterator[FieldError]:
    if not isinstance(values, dict):
        return
    for k, v in values.items():
        for message in qualified_name(str(k)):
            yield invalid(path, k, message)
        for message in label_value("" if v is None else str(v)):
            yield invalid(f"{path}", v, message)


def metadata(key: Key, meta: Any, old_meta: Any, *, name_rule: Any = None) -> Iterator[FieldError]:
    if not isinstance(meta, dict):
        yield required("metadata")
        return
    name = meta.get("name")
    rule = name_rule or NAME_RULES.get(key, dns1123_subdomain)
    if not name:
        yield required("metadata.name", "name or generateName is required")
    else:
        for message in rule(str(name)):
            yield invalid("metadata.name", name, message)
    yield from labels(meta.get("labels"), "metadata.labels")
    annotations = meta.get("annotations") or {}
    if isinstance(annotations, dict):
        for k in annotations:
            for message in qualified_name(str(k)):
                yield invalid("metadata.annotations", k, message)
        size = sum(len(str(k)) + len(str(v)) for k, v in annotations.items())
        if size > 256 * 1024:
            yield FieldError("TooLong", "metadata.annotations", detail=f"must have at most {256 * 1024} bytes")
    refs = meta.get("ownerReferences") or []
    controllers = 0
    for i, ref in enumerate(refs if isinstance(refs, list) else []):
        where = f"metadata.ownerReferences[{i}]"
        for f in ("apiVersion", "kind", "name"):
            if not (ref or {}).get(f):
                yield invalid(f"{where}.{f}", (ref or {}).get(f, ""), f"{f} must not be empty")
        if not (ref or {}).get("uid"):
            yield invalid(f"{where}.uid", "", "uid must not be empty")
        controllers += bool((ref or {}).get("controller"))
    if controllers > 1:
        yield invalid("metadata.ownerReferences", Raw("[...]"), "Only one reference can have Controller set to true")
    finalizers = meta.get("finalizers") or []
    for i, f in enumerate(finalizers if isinstance(finalizers, list) else []):
        for message in qualified_name(str(f)):
            yield invalid(f"metadata.finalizers[{i}]", f, message)
    if isinstance(old_meta, dict) and old_meta.get("deletionTimestamp"):
        added = set(finalizers or []) - set(old_meta.get("finalizers") or [])
        if added:
            yield forbidden("metadata.finalizers", "no new finalizers can be added if the object is being deleted")


# --- pods -----------------------------------------------------------------------------------------------------

VOLUME_SOURCES = {
    "hostPath", "emptyDir", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "secret", "nfs", "iscsi",
    "glusterfs", "persistentVolumeClaim", "rbd", "flexVolume", "cinder", "cephfs", "flocker", "downwardAPI", "fc",
    "azureFile", "configMap", "vsphereVolume", "quobyte", "azureDisk", "photonPersistentDisk", "projected",
    "portworxVolume", "scaleIO", "storageos", "csi", "ephemeral", "image",
}
HOST_PATH_TYPES = ["", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"]
PULL_POLICIES = ["Always", "IfNotPresent", "Never"]
PROTOCOLS = ["SCTP", "TCP", "UDP"]
TAINT_EFFECTS = ["NoExecute", "NoSchedule", "PreferNoSchedule"]
RESTART_POLICIES = ["Always", "OnFailure", "Never"]


def _mode(value: Any, path: str) -> Iterator[FieldError]:
    if value is not None and (not isinstance(value, int) or not 0 <= value <= 0o777):
        yield invalid(path, value, "must be a number between 0 and 0777 (octal), both inclusive")


def _volumes(volumes: list[Any], path: str) -> Iterator[FieldError]:
    seen: set[str] = set()
    for i, v in enumerate(volumes):
        where = f"{path}[{i}]"
        if not isinstance(v, dict):
            continue
        name = str(v.get("name") or "")
        if not name:
            yield required(f"{where}.name")
        else:
            for message in dns1123_label(name):
                yield invalid(f"{where}.name", name, message)
            if name in seen:
                yield duplicate(f"{where}.name", name)
            seen.add(name)
        sources = [k for k in v if k in VOLUME_SOURCES]
        if not sources:
            yield required(where, "must specify a volume type")
        elif len(sources) > 1:
            yield forbidden(f"{where}.{sources[1]}", "may not specify more than 1 volume type")
        host = v.get("hostPath")
        if isinstance(host, dict):
            if not host.get("path"):
                yield required(f"{where}.hostPath.path")
            if host.get("type", "") not in HOST_PATH_TYPES:
                yield not_supported(f"{where}.hostPath.type", host.get("type"), HOST_PATH_TYPES[1:])
        secret = v.get("secret")
        if isinstance(secret, dict):
            if not secret.get("secretName"):
                yield required(f"{where}.secret.secretName")
            yield from _mode(secret.get("defaultMode"), f"{where}.secret.defaultMode")
            yield from _items(secret.get("items"), f"{where}.secret.items")
        config = v.get("configMap")
        if isinstance(config, dict):
            if not config.get("name"):
                yield required(f"{where}.configMap.name")
            yield from _mode(config.get("defaultMode"), f"{where}.configMap.defaultMode")
            yield from _items(config.get("items"), f"{where}.configMap.items")
        claim = v.get("persistentVolumeClaim")
        if isinstance(claim, dict) and not claim.get("claimName"):
            yield required(f"{where}.persistentVolumeClaim.claimName")
        empty = v.get("emptyDir")
        if isinstance(empty, dict) and empty.get("medium", "") not in ("", "Memory", "HugePages"):
            yield not_supported(f"{where}.emptyDir.medium", empty.get("medium"), ["", "Memory", "HugePages"])


def _items(items: Any, path: str) -> Iterator[FieldError]:
    for i, item in enumerate(items or []):
        if not isinstance(item, dict):
            continue
        if not item.get("key"):
            yield required(f"{path}[{i}].key")
        target = str(item.get("path") or "")
        if not target:
            yield required(f"{path}[{i}].path")
        elif target.startswith("/"):
            yield invalid(f"{path}[{i}].path", target, "must be a relative path")
        elif ".." in target.split("/"):
            yield invalid(f"{path}[{i}].path", target, "must not contain '..'")
        yield from _mode(item.get("mode"), f"{path}[{i}].mode")


def _resources(resources: Any, path: str) -> Iterator[FieldError]:
    if not isinstance(resources, dict):
        return
    requests = resources.get("requests") or {}
    limits = resources.get("limits") or {}
    parsed: dict[str, dict[str, Any]] = {"requests": {}, "limits": {}}
    for part, values in (("requests", requests), ("limits", limits)):
        if not isinstance(values, dict):
            continue
        for name, raw in values.items():
            where = f"{path}.{part}[{name}]"
            if "/" not in name and name not in quantity.NATIVE and not name.startswith("hugepages-"):
                yield invalid(where, name, "must be a standard resource type or fully qualified")
            try:
                value = quantity.parse(raw)
            except quantity.QuantityError as exc:
                yield invalid(where, raw, str(exc))
                continue
            if value < 0:
                yield invalid(where, raw, "must be greater than or equal to 0")
            if quantity.is_extended(name) and value.denominator != 1:
                yield invalid(where, raw, "must be an integer")
            parsed[part][name] = value
    for name, request in parsed["requests"].items():
        limit = parsed["limits"].get(name)
        if quantity.is_extended(name):
            if limit is None:
                yield required(f"{path}.limits", "Limit must be set for non overcommitable resources")
            elif request != limit:
                yield invalid(f"{path}.requests", requests[name],
                              f"must be equal to {name} limit of {quantity.show(limit)}")
        elif limit is not None and request > limit:
            yield invalid(f"{path}.requests", requests[name],
                          f"must be less than or equal to {name} limit of {quantity.show(limit)}")


def _port_number(value: Any, path: str) -> Iterator[FieldError]:
    if isinstance(value, bool) or (isinstance(value, int) and not 1 <= value <= 65535):
        yield invalid(path, value, "must be between 1 and 65535, inclusive")
    elif isinstance(value, str):
        if not value:
            yield required(path)
        elif len(value) > 15:
            yield invalid(path, value, "must be no more than 15 characters")
        elif not IANA_SVC_NAME.match(value) or "--" in value or not re.search("[a-z]", value):
            yield invalid(path, value, "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")


def _probe(probe: Any, path: str) -> Iterator[FieldError]:
    if not isinstance(probe, dict):
        return
    handlers = [k for k in ("exec", "httpGet", "tcpSocket", "grpc") if k in probe]
    if not handlers:
        yield required(path, "must specify a handler type")
    elif len(handlers) > 1:
        yield forbidden(f"{path}.{handlers[1]}", "may not specify more than 1 handler type")
    for handler in ("httpGet", "tcpSocket"):
        if isinstance(probe.get(handler), dict):
            yield from _port_number(probe[handler].get("port"), f"{path}.{handler}.port")
    for f in ("periodSeconds", "failureThreshold", "successThreshold", "timeoutSeconds"):
        v = probe.get(f)
        if isinstance(v, int) and v < 1:
            yield invalid(f"{path}.{f}", v, "must be greater than or equal to 1")


def _container(c: dict[str, Any], path: str, volumes: set[str], *, init: bool) -> Iterator[FieldError]:
    name = str(c.get("name") or "")
    if not name:
        yield required(f"{path}.name")
    else:
        for message in dns1123_label(name):
            yield invalid(f"{path}.name", name, message)
    if not c.get("image"):
        yield required(f"{path}.image")
    if c.get("imagePullPolicy") not in (None, *PULL_POLICIES):
        yield not_supported(f"{path}.imagePullPolicy", c["imagePullPolicy"], PULL_POLICIES)
    if c.get("terminationMessagePolicy") not in (None, "File", "FallbackToLogsOnError"):
        yield not_supported(f"{path}.terminationMessagePolicy", c["terminationMessagePolicy"],
                            ["File", "FallbackToLogsOnError"])
    port_names: set[str] = set()
    for i, port in enumerate(c.get("ports") or []):
        if not isinstance(port, dict):
            continue
        yield from _port_number(port.get("containerPort", 0) or 0, f"{path}.ports[{i}].containerPort")
        if port.get("name"):
            yield from _port_number(str(port["name"]), f"{path}.ports[{i}].name")
            if port["name"] in port_names:
                yield duplicate(f"{path}.ports[{i}].name", port["name"])
            port_names.add(port["name"])
        if port.get("protocol") not in (None, *PROTOCOLS):
            yield not_supported(f"{path}.ports[{i}].protocol", port["protocol"], PROTOCOLS)
    for i, env in enumerate(c.get("env") or []):
        if not isinstance(env, dict):
            continue
        where = f"{path}.env[{i}]"
        env_name = str(env.get("name") or "")
        if not env_name:
            yield required(f"{where}.name")
        elif not ENV_NAME.match(env_name):
            yield invalid(f"{where}.name", env_name, "a valid environment variable name must consist of alphabetic "
                                                      "characters, digits, '_', '-', or '.', and must not start "
                                                      "with a digit")
        source = env.get("valueFrom")
        if isinstance(source, dict):
            kinds = [k for k in ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef", "fileKeyRef")
                     if k in source]
            if len(kinds) != 1:
                yield invalid(f"{where}.valueFrom", Raw("..."), "may not have more than one field specified at a "
                                                                "time" if kinds else "must specify one of: "
                                                                "`fieldRef`, `resourceFieldRef`, `configMapKeyRef` "
                                                                "or `secretKeyRef`")
            if env.get("value"):
                yield invalid(f"{where}.valueFrom", "", "may not be specified when `value` is not empty")
    mount_paths: set[str] = set()
    for i, mount in enumerate(c.get("volumeMounts") or []):
        if not isinstance(mount, dict):
            continue
        where = f"{path}.volumeMounts[{i}]"
        mount_name = str(mount.get("name") or "")
        if not mount_name:
            yield required(f"{where}.name")
        elif mount_name not in volumes:
            yield not_found(f"{where}.name", mount_name)
        mount_path = str(mount.get("mountPath") or "")
        if not mount_path:
            yield required(f"{where}.mountPath")
        elif mount_path in mount_paths:
            yield invalid(f"{where}.mountPath", mount_path, "must be unique")
        mount_paths.add(mount_path)
        sub = str(mount.get("subPath") or "")
        if sub.startswith("/"):
            yield invalid(f"{where}.subPath", sub, "must be a relative path")
        elif ".." in sub.split("/"):
            yield invalid(f"{where}.subPath", sub, "must not contain '..'")
    yield from _resources(c.get("resources"), f"{path}.resources")
    sidecar = c.get("restartPolicy") == "Always"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in c:
            if init and not sidecar:
                yield forbidden(f"{path}.{probe}", "may not be set for init containers without restartPolicy=Always")
            else:
                yield from _probe(c[probe], f"{path}.{probe}")
    if init and c.get("restartPolicy") not in (None, "Always"):
        yield not_supported(f"{path}.restartPolicy", c["restartPolicy"], ["Always"])
    security = c.get("securityContext")
    if isinstance(security, dict):
        if security.get("privileged") and security.get("allowPrivilegeEscalation") is False:
            yield invalid(f"{path}.securityContext", False,
                          "cannot set `allowPrivilegeEscalation` to false and `privileged` to true")
        uid = security.get("runAsUser")
        if isinstance(uid, int) and uid < 0:
            yield invalid(f"{path}.securityContext.runAsUser", uid, "must be between 0 and 2147483647, inclusive")


def _tolerations(tolerations: Any, path: str) -> Iterator[FieldError]:
    for i, t in enumerate(tolerations or []):
        if not isinstance(t, dict):
            continue
        where = f"{path}[{i}]"
        key = t.get("key") or ""
        op = t.get("operator") or "Equal"
        if key:
            for message in qualified_name(key):
                yield invalid(f"{where}.key", key, message)
        elif op != "Exists":
            yield invalid(f"{where}.operator", op, "operator must be Exists when `key` is empty, which means "
                                                    "\"match all values and all keys\"")
        if op == "Exists" and t.get("value"):
            yield invalid(f"{where}.operator", t.get("value"), "value must be empty when `operator` is 'Exists'")
        elif op == "Equal":
            for message in label_value(str(t.get("value") or "")):
                yield invalid(f"{where}.value", t.get("value"), message)
        elif op != "Exists":
            yield not_supported(f"{where}.operator", op, ["Equal", "Exists"])
        effect = t.get("effect")
        if effect and effect not in TAINT_EFFECTS:
            yield not_supported(f"{where}.effect", effect, TAINT_EFFECTS)
        if t.get("tolerationSeconds") is not None and effect != "NoExecute":
            yield invalid(f"{where}.effect", effect or "", "effect must be 'NoExecute' when `tolerationSeconds` "
                                                            "is set")


def _node_selector_terms(terms: Any, path: str) -> Iterator[FieldError]:
    if not terms:
        yield required(path, "must have at least one node selector term")
        return
    for i, term in enumerate(terms):
        if not isinstance(term, dict):
            continue
        for j, req in enumerate(term.get("matchExpressions") or []):
            where = f"{path}[{i}].matchExpressions[{j}]"
            op, values = req.get("operator"), req.get("values") or []
            if op in ("In", "NotIn") and not values:
                yield required(f"{where}.values", "must be specified when `operator` is 'In' or 'NotIn'")
            elif op in ("Exists", "DoesNotExist") and values:
                yield forbidden(f"{where}.values", "may not be specified when `operator` is 'Exists' or "
                                                   "'DoesNotExist'")
            elif op in ("Gt", "Lt") and len(values) != 1:
                yield required(f"{where}.values", "must be specified single value when `operator` is 'Lt' or 'Gt'")
            elif op not in ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"):
                yield invalid(f"{where}.operator", op, "not a valid selector operator")
            for message in qualified_name(str(req.get("key") or "")):
                yield invalid(f"{where}.key", req.get("key"), message)
        for j, req in enumerate(term.get("matchFields") or []):
            where = f"{path}[{i}].matchFields[{j}]"
            op, values = req.get("operator"), req.get("values") or []
            if op in ("In", "NotIn"):
                if len(values) != 1:
                    yield required(f"{where}.values",
                                   "must be only one value when `operator` is 'In' or 'NotIn' for node field selector")
            else:
                yield invalid(f"{where}.operator", op, "not a valid selector operator")
            if req.get("key") != "metadata.name":
                yield invalid(f"{where}.key", req.get("key"), "not a valid field selector key")
            for k, v in enumerate(values):
                for message in dns1123_subdomain(str(v)):
                    yield invalid(f"{where}.values[{k}]", v, message)


def pod_spec(spec: Any, path: str, *, restart_policies: list[str] | None = None) -> Iterator[FieldError]:
    """Rules of a pod spec (a Pod's, or a template's in a Deployment or Job)."""
    if not isinstance(spec, dict):
        yield required(path)
        return
    volumes = spec.get("volumes") or []
    yield from _volumes(volumes, f"{path}.volumes")
    names = {str(v.get("name")) for v in volumes if isinstance(v, dict)}
    containers = spec.get("containers") or []
    if not containers:
        yield required(f"{path}.containers")
    seen: set[str] = set()
    for part, init in (("initContainers", True), ("containers", False)):
        for i, c in enumerate(spec.get(part) or []):
            if not isinstance(c, dict):
                continue
            where = f"{path}.{part}[{i}]"
            yield from _container(c, where, names, init=init)
            if c.get("name") in seen:
                yield duplicate(f"{where}.name", c.get("name"))
            seen.add(str(c.get("name")))
    restart = spec.get("restartPolicy")
    allowed = restart_policies or RESTART_POLICIES
    if restart is None and restart_policies is not None and "Always" not in restart_policies:
        yield required(f"{path}.restartPolicy", "valid values: " + ", ".join(json.dumps(p) for p in allowed))
    elif restart is not None and restart not in allowed:
        yield not_supported(f"{path}.restartPolicy", restart, allowed)
    selector = spec.get("nodeSelector")
    yield from labels(selector, f"{path}.nodeSelector")
    yield from _tolerations(spec.get("tolerations"), f"{path}.tolerations")
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {})
    required_terms = affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if isinstance(required_terms, dict):
        yield from _node_selector_terms(
            required_terms.get("nodeSelectorTerms"),
            f"{path}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms")
    for i, secret in enumerate(spec.get("imagePullSecrets") or []):
        if isinstance(secret, dict) and not secret.get("name"):
            yield required(f"{path}.imagePullSecrets[{i}].name")
    account = spec.get("serviceAccountName")
    if account:
        for message in dns1123_subdomain(str(account)):
            yield invalid(f"{path}.serviceAccountName", account, message)
    security = spec.get("securityContext")
    if isinstance(security, dict):
        policy = security.get("fsGroupChangePolicy")
        if policy is not None and policy not in ("OnRootMismatch", "Always"):
            yield not_supported(f"{path}.securityContext.fsGroupChangePolicy", policy, ["OnRootMismatch", "Always"])
        seccomp = security.get("seccompProfile")
        if isinstance(seccomp, dict) and seccomp.get("type") not in ("RuntimeDefault", "Unconfined", "Localhost"):
            yield not_supported(f"{path}.securityContext.seccompProfile.type", seccomp.get("type"),
                                ["Localhost", "RuntimeDefault", "Unconfined"])
    deadline = spec.get("activeDeadlineSeconds")
    if isinstance(deadline, int) and deadline < 1:
        yield invalid(f"{path}.activeDeadlineSeconds", deadline, "must be between 1 and 2147483647, inclusive")


def _selector_matches(selector: Any, template_labels: dict[str, str]) -> bool:
    if not isinstance(selector, dict):
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if template_labels.get(k) != v:
            return False
    for req in selector.get("matchExpressions") or []:
        key, op, values = req.get("key"), req.get("operator"), req.get("values") or []
        if op == "In" and template_labels.get(key) not in values:
            return False
        if op == "NotIn" and template_labels.get(key) in values:
            return False
        if op == "Exists" and key not in template_labels:
            return False
        if op == "DoesNotExist" and key in template_labels:
            return False
    return True


def _template(spec: dict[str, Any], restart_policies: list[str] | None) -> Iterator[FieldError]:
    template = spec.get("template")
    if not isinstance(template, dict):
        yield required("spec.template")
        return
    meta = template.get("metadata") or {}
    yield from labels(meta.get("labels"), "spec.template.metadata.labels")
    for k in meta.get("annotations") or {}:
        for message in qualified_name(str(k)):
            yield invalid("spec.template.metadata.annotations", k, message)
    yield from pod_spec(template.get("spec"), "spec.template.spec", restart_policies=restart_policies)
    selector = spec.get("selector")
    if not selector or not ((selector.get("matchLabels") or selector.get("matchExpressions"))
                            if isinstance(selector, dict) else False):
        yield required("spec.selector")
    elif not _selector_matches(selector, meta.get("labels") or {}):
        yield invalid("spec.template.metadata.labels", meta.get("labels") or {},
                      "`selector` does not match template `labels`")
    if isinstance(selector, dict):
        yield from labels(selector.get("matchLabels"), "spec.selector.matchLabels")


def _int_or_percent(value: Any) -> tuple[int, bool] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value, False
    if isinstance(value, str) and re.fullmatch(r"[0-9]+%", value):
        return int(value[:-1]), True
    return None


def _deployment(obj: dict[str, Any]) -> Iterator[FieldError]:
    spec = obj.get("spec") or {}
    replicas = spec.get("replicas")
    if isinstance(replicas, int) and replicas < 0:
        yield invalid("spec.replicas", replicas, "must be greater than or equal to 0")
    yield from _template(spec, ["Always"])
    strategy = spec.get("strategy") or {}
    kind = strategy.get("type")
    if kind not in (None, "Recreate", "RollingUpdate"):
        yield not_supported("spec.strategy.type", kind, ["Recreate", "RollingUpdate"])
    rolling = strategy.get("rollingUpdate")
    if kind == "Recreate" and rolling is not None:
        yield forbidden("spec.strategy.rollingUpdate", "may not be specified when strategy `type` is 'Recreate'")
    if kind == "RollingUpdate" and isinstance(rolling, dict):
        parsed = {}
        for f in ("maxUnavailable", "maxSurge"):
            if f not in rolling:
                continue
            value = _int_or_percent(rolling[f])
            if value is None or value[0] < 0:
                yield invalid(f"spec.strategy.rollingUpdate.{f}", rolling[f],
                              "a valid percent string must be a numeric string followed by an ending '%' "
                              "(e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')"
                              if isinstance(rolling[f], str) else "must be greater than or equal to 0")
                continue
            parsed[f] = value
        unavailable, surge = parsed.get("maxUnavailable"), parsed.get("maxSurge")
        if unavailable is not None and unavailable[1] and unavailable[0] > 100:
            yield invalid("spec.strategy.rollingUpdate.maxUnavailable", rolling["maxUnavailable"],
                          "must not be greater than 100%")
        if unavailable is not None and surge is not None and unavailable[0] == 0 and surge[0] == 0:
            yield invalid("spec.strategy.rollingUpdate.maxUnavailable", rolling["maxUnavailable"],
                          "may not be 0 when `maxSurge` is 0")


def _job(obj: dict[str, Any]) -> Iterator[FieldError]:
    spec = obj.get("spec") or {}
    failure_policy = spec.get("podFailurePolicy")
    yield from _template(spec, ["Never"] if failure_policy else ["OnFailure", "Never"])
    for f in ("backoffLimit", "parallelism", "completions", "ttlSecondsAfterFinished"):
        v = spec.get(f)
        if isinstance(v, int) and v < 0:
            yield invalid(f"spec.{f}", v, "must be greater than or equal to 0")
    deadline = spec.get("activeDeadlineSeconds")
    if isinstance(deadline, int) and deadline <= 0:
        yield invalid("spec.activeDeadlineSeconds", deadline, "must be greater than or equal to 0")
    if isinstance(failure_policy, dict):
        for i, rule in enumerate(failure_policy.get("rules") or []):
            where = f"spec.podFailurePolicy.rules[{i}]"
            if rule.get("action") not in ("FailJob", "FailIndex", "Ignore", "Count"):
                yield not_supported(f"{where}.action", rule.get("action"), ["Count", "FailIndex", "FailJob",
                                                                            "Ignore"])
            has_codes, has_conditions = "onExitCodes" in rule, "onPodConditions" in rule
            if has_codes == has_conditions:
                yield invalid(where, Raw("..."), "specifying one of OnExitCodes and OnPodConditions is required")
            codes = rule.get("onExitCodes") or {}
            if has_codes:
                pod = (spec.get("template") or {}).get("spec") or {}
                containers = {c.get("name") for part in ("containers", "initContainers") for c in pod.get(part) or []}
                if codes.get("containerName") and codes["containerName"] not in containers:
                    yield invalid(f"{where}.onExitCodes.containerName", codes["containerName"],
                                  "must be one of the container or initContainer names in the pod template")
                if codes.get("operator") not in ("In", "NotIn"):
                    yield not_supported(f"{where}.onExitCodes.operator", codes.get("operator"), ["In", "NotIn"])
                if codes.get("operator") == "In" and 0 in (codes.get("values") or []):
                    yield invalid(f"{where}.onExitCodes.values[0]", 0, "must not be 0 for the In operator")


def _service(obj: dict[str, Any]) -> Iterator[FieldError]:
    spec = obj.get("spec") or {}
    kind = spec.get("type", "ClusterIP")
    if kind not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        yield not_supported("spec.type", kind, ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"])
    ports = spec.get("ports") or []
    if not ports and kind != "ExternalName" and spec.get("clusterIP") != "None":
        yield required("spec.ports")
    names: set[str] = set()
    for i, port in enumerate(ports):
        where = f"spec.ports[{i}]"
        name = port.get("name") or ""
        if len(ports) > 1 and not name:
            yield required(f"{where}.name")
        if name:
            for message in dns1123_label(name):
                yield invalid(f"{where}.name", name, message)
            if name in names:
                yield duplicate(f"{where}.name", name)
            names.add(name)
        number = port.get("port")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            yield invalid(f"{where}.port", number, "must be between 1 and 65535, inclusive")
        if port.get("protocol") not in (None, *PROTOCOLS):
            yield not_supported(f"{where}.protocol", port.get("protocol"), PROTOCOLS)
        if "targetPort" in port:
            yield from _port_number(port["targetPort"], f"{where}.targetPort")
        if port.get("nodePort") and kind not in ("NodePort", "LoadBalancer"):
            yield forbidden(f"{where}.nodePort", "may not be used when `type` is 'ClusterIP'")
    selector = spec.get("selector")
    yield from labels(selector, "spec.selector")
    if spec.get("sessionAffinity") not in (None, "None", "ClientIP"):
        yield not_supported("spec.sessionAffinity", spec.get("sessionAffinity"), ["ClientIP", "None"])


ACCESS_MODES = ["ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"]


def _pvc(obj: dict[str, Any]) -> Iterator[FieldError]:
    spec = obj.get("spec") or {}
    modes = spec.get("accessModes") or []
    if not modes:
        yield required("spec.accessModes", "at least 1 access mode is required")
    for i, mode in enumerate(modes):
        if mode not in ACCESS_MODES:
            yield not_supported(f"spec.accessModes[{i}]", mode, ACCESS_MODES)
    if "ReadWriteOncePod" in modes and len(modes) > 1:
        yield forbidden("spec.accessModes", "may not use ReadWriteOncePod with other access modes")
    storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    if storage is None:
        yield required("spec.resources[storage]")
    else:
        try:
            if quantity.parse(storage) <= 0:
                yield invalid("spec.resources[storage]", storage, "must be greater than zero")
        except quantity.QuantityError as exc:
            yield invalid("spec.resources[storage]", storage, str(exc))
    if spec.get("volumeMode") not in (None, "Filesystem", "Block"):
        yield not_supported("spec.volumeMode", spec.get("volumeMode"), ["Block", "Filesystem"])
    klass = spec.get("storageClassName")
    if klass:
        for message in dns1123_subdomain(klass):
            yield invalid("spec.storageClassName", klass, message)


def _config_keys(obj: dict[str, Any], fields: tuple[str, ...]) -> Iterator[FieldError]:
    total = 0
    seen: set[str] = set()
    for f in fields:
        data = obj.get(f) or {}
        if not isinstance(data, dict):
            continue
        for k, v in data.items():
            if len(k) > 253 or not CONFIG_KEY.match(k):
                yield invalid(f"{f}[{k}]", k, "a valid config key must consist of alphanumeric characters, '-', "
                                               "'_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex "
                                               "used for validation is '[-._a-zA-Z0-9]+')")
            if k in seen:
                yield invalid(f"{f}[{k}]", k, "duplicate of key present in data")
            seen.add(k)
            total += len(k) + len(str(v))
    if total > 1024 * 1024:
        yield FieldError("TooLong", "", detail="must have at most 1048576 bytes")


def _secret(obj: dict[str, Any]) -> Iterator[FieldError]:
    yield from _config_keys(obj, ("data",))
    data = obj.get("data") or {}
    if obj.get("type") == "kubernetes.io/tls":
        for k in ("tls.crt", "tls.key"):
            if k not in data:
                yield required(f"data[{k}]")


def _hpa(obj: dict[str, Any]) -> Iterator[FieldError]:
    spec = obj.get("spec") or {}
    ref = spec.get("scaleTargetRef") or {}
    for f in ("kind", "name"):
        if not ref.get(f):
            yield required(f"spec.scaleTargetRef.{f}")
    low, high = spec.get("minReplicas", 1), spec.get("maxReplicas")
    if isinstance(low, int) and low < 1:
        yield invalid("spec.minReplicas", low, "must be greater than or equal to 1")
    if isinstance(high, int) and isinstance(low, int) and high < low:
        yield invalid("spec.maxReplicas", high, "must be greater than or equal to `minReplicas`")
    for i, metric in enumerate(spec.get("metrics") or []):
        where = f"spec.metrics[{i}]"
        kind = metric.get("type")
        if kind not in ("Resource", "Pods", "Object", "External", "ContainerResource"):
            yield not_supported(f"{where}.type", kind, ["ContainerResource", "External", "Object", "Pods",
                                                        "Resource"])
            continue
        body = metric.get({"Resource": "resource", "Pods": "pods", "Object": "object", "External": "external",
                           "ContainerResource": "containerResource"}[kind]) or {}
        if not body:
            yield required(f"{where}.{kind[0].lower()}{kind[1:]}", "must populate information for the given "
                                                                   "metric source")
            continue
        target = body.get("target") or {}
        if target.get("type") == "Utilization" and not target.get("averageUtilization"):
            yield required(f"{where}.{kind.lower()}.target.averageUtilization",
                           "must set either a target raw value or a target utilization")
        if kind == "Pods" and not (body.get("metric") or {}).get("name"):
            yield required(f"{where}.pods.metric.name")


def _event(obj: dict[str, Any]) -> Iterator[FieldError]:
    involved = obj.get("involvedObject") or {}
    namespace = (obj.get("metadata") or {}).get("namespace")
    if involved.get("namespace") and namespace and involved["namespace"] != namespace:
        yield invalid("involvedObject.namespace", involved["namespace"], "does not match event.namespace")


KIND_RULES: dict[Key, Callable[[dict[str, Any]], Iterator[FieldError]]] = {
    DEPLOYMENTS: _deployment, REPLICASETS: _deployment, JOBS: _job, SERVICES: _service, PVCS: _pvc,
    CONFIGMAPS: lambda o: _config_keys(o, ("data", "binaryData")), SECRETS: _secret, HPAS: _hpa, EVENTS: _event,
    PODS: lambda o: pod_spec(o.get("spec"), "spec"),
}


# --- immutability -----------------------------------------------------------------------------------------------


def _changed(new: Any, old: Any, path: str) -> Any:
    node_new, node_old = new, old
    for part in path.split("."):
        node_new = node_new.get(part) if isinstance(node_new, dict) else None
        node_old = node_old.get(part) if isinstance(node_old, dict) else None
    return node_new != node_old, node_new


def _immutable(key: Key, obj: dict[str, Any], old: dict[str, Any]) -> Iterator[FieldError]:
    def frozen(path: str, shown: Any = None) -> Iterator[FieldError]:
        changed, value = _changed(obj, old, path)
        if changed:
            yield invalid(path, shown if shown is not None else value, "field is immutable")

    if key in (DEPLOYMENTS, REPLICASETS):
        yield from frozen("spec.selector", Raw("v1.LabelSelector{...}"))
    elif key == JOBS:
        yield from frozen("spec.selector", Raw("v1.LabelSelector{...}"))
        if not (obj.get("spec") or {}).get("suspend"):
            yield from frozen("spec.template", Raw("core.PodTemplateSpec{...}"))
        yield from frozen("spec.completionMode")
        yield from frozen("spec.podFailurePolicy", Raw("batch.PodFailurePolicy{...}"))
    elif key == SERVICES:
        old_ip = (old.get("spec") or {}).get("clusterIP")
        new_ip = (obj.get("spec") or {}).get("clusterIP")
        if old_ip and new_ip != old_ip:
            yield invalid("spec.clusterIPs[0]", Raw(f'[]string{{"{new_ip or ""}"}}'), "may not change once set")
    elif key == PVCS:
        new_spec = dict(obj.get("spec") or {})
        old_spec = dict(old.get("spec") or {})
        new_storage = ((new_spec.get("resources") or {}).get("requests") or {}).get("storage")
        old_storage = ((old_spec.get("resources") or {}).get("requests") or {}).get("storage")
        for s in (new_spec, old_spec):
            s.pop("resources", None)
            s.pop("volumeAttributesClassName", None)
            if not (old.get("spec") or {}).get("volumeName"):
                s.pop("volumeName", None)  # the binder sets it once
        if new_spec != old_spec:
            yield forbidden("spec", "spec is immutable after creation except resources.requests and "
                                    "volumeAttributesClassName for bound claims")
        if new_storage != old_storage:
            bound = (old.get("status") or {}).get("phase") == "Bound"
            try:
                smaller = quantity.parse(new_storage) < quantity.parse(old_storage)
            except quantity.QuantityError:
                smaller = False
            if smaller:
                yield forbidden("spec.resources.requests.storage", "field can not be less than status.capacity")
            elif not bound:
                yield forbidden("spec", "spec is immutable after creation except resources.requests and "
                                        "volumeAttributesClassName for bound claims")
    elif key in (CONFIGMAPS, SECRETS):
        if old.get("immutable"):
            for f in ("data", "binaryData", "stringData"):
                if obj.get(f) != old.get(f):
                    yield forbidden(f, "field is immutable when `immutable` is set")
            if not obj.get("immutable"):
                yield forbidden("immutable", "field is immutable when `immutable` is set")
        if key == SECRETS and obj.get("type") != old.get("type"):
            yield invalid("type", obj.get("type"), "field is immutable")


# --- everything together ----------------------------------------------------------------------------------------


class DecodeError(Exception):
    """A body the API server cannot decode into the kind (a wrong type): 400, not 422."""


def _schema_findings(obj: dict[str, Any]) -> tuple[list[FieldError], list[str]]:
    errors: list[FieldError] = []
    decode: list[str] = []
    for e in builtin_errors(obj):
        path = ""
        for part in e.absolute_path:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        if e.validator == "required":
            if path == "status" or path.startswith("status."):
                # The OpenAPI marks every non-omitempty Go field required; in status the server takes a missing
                # one as its zero value (hand-written validation enforces what matters in spec).
                continue
            missing = str(e.message).split("'")[1] if "'" in str(e.message) else "?"
            errors.append(required(f"{path}.{missing}" if path else missing))
        elif e.validator in ("type", "oneOf", "anyOf"):
            decode.append(f"{path or '<root>'}: {e.message}")
        elif e.validator == "enum" and path in ("apiVersion", "kind"):
            continue
        else:
            errors.append(invalid(path or "<root>", e.instance if not isinstance(e.instance, dict | list)
                                  else Raw("..."), str(e.message)))
    return errors, decode


def validate(key: Key, obj: dict[str, Any], old: dict[str, Any] | None, *,
             subresource: str | None = None) -> list[FieldError]:
    """Why the API server refuses `obj` (old: the stored object, on an update); empty when it accepts it."""
    schema_errors, decode = _schema_findings(obj)
    if decode:
        raise DecodeError("; ".join(decode[:5]))
    errors = list(schema_errors)
    old_meta = (old or {}).get("metadata")
    errors += list(metadata(key, obj.get("metadata"), old_meta))
    if subresource is None:
        rule = KIND_RULES.get(key)
        if rule is not None:
            errors += list(rule(obj))
        if old is not None:
            errors += list(_immutable(key, obj, old))
    # Some rules report the same field twice (a label key that is also too long): once is enough.
    unique: dict[str, FieldError] = {}
    for e in errors:
        unique.setdefault(str(e), e)
    return list(unique.values())


def decode_secret_data(obj: dict[str, Any]) -> str | None:
    """A Secret whose data is not base64 is a decoding error (400) on a real server."""
    for k, v in (obj.get("data") or {}).items():
        try:
            base64.b64decode(str(v), validate=True)
        except (binascii.Error, ValueError):
            return f"illegal base64 data in data[{k}]"
    return None
