"""Names the operator gives things: child names and hashes, label and annotation keys, in-pod paths, ports.

Imported by the planner (child names), render (labels, paths, ports), the TLS code (Service names) and
the handlers (labels they select on); it imports nothing of the operator's own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

# -- child names ------------------------------------------------------------------------------------------

# A label value, a Service name, a Job name: each at most 63 characters.
DNS_LABEL_MAX = 63
# An edge variant's name is part of child names, hence short.
VARIANT_NAME_MAX = 24
# The hash that shortens a child name that would be too long (`child_name`).
SHORTENING_HASH_LENGTH = 8
# An LLMDeployment's name is a DNS-1035 label: it starts Service names, which must start with a letter.
DEPLOYMENT_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def stable_hash(value: Any, length: int = 10) -> str:
    """A short hash of JSON-able data, stable across processes (sorted keys)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def child_name(deployment: str, *parts: str) -> str:
    """`<deployment>-<parts>` as a DNS label (<= 63 chars), shortened with a hash when too long."""
    name = "-".join((deployment, *parts))
    if len(name) <= 63:
        return name
    digest = stable_hash(name, SHORTENING_HASH_LENGTH)
    return f"{name[:DNS_LABEL_MAX - SHORTENING_HASH_LENGTH - 1].rstrip('-')}-{digest}"


def router_name(deployment: str) -> str:
    return child_name(deployment, "router")


def cloud_name(deployment: str) -> str:
    return child_name(deployment, "cloud")


def edge_name(deployment: str, variant: str) -> str:
    return child_name(deployment, "edge", variant)


def job_name(deployment: str, variant: str, spec_hash: str) -> str:
    """A compression Job's name: a new recipe (spec hash) is a new Job, since a Job's spec is immutable."""
    return child_name(deployment, "compress", variant, spec_hash)


def tls_name(deployment: str) -> str:
    """The mTLS Secret an earlier operator issued (one certificate for every tier, with the CA's key)."""
    return child_name(deployment, "tls")


def ca_name(deployment: str) -> str:
    """The Secret holding the deployment's CA certificate and key: no pod mounts it."""
    return child_name(deployment, "ca")


def server_tls_name(server: str) -> str:
    """The mTLS Secret of one server or the router (`server` is its child name): its own certificate only."""
    return child_name(server, "tls")


def artifacts_name(deployment: str) -> str:
    """The artifacts PVC the operator creates when no claim or object store is given."""
    return child_name(deployment, "artifacts")


def cleanup_name(deployment: str) -> str:
    """The finalizer's artifact-cleanup Job."""
    return child_name(deployment, "cleanup")


# The Services clients and the router dial keep their exact names (no shortening hash), so their DNS names
# are what the docs say; the longest is an edge server's with the longest variant name.
_LONGEST_SERVICE_SUFFIX = max(len(router_name("")), len(cloud_name("")), len(edge_name("", "v" * VARIANT_NAME_MAX)))
# The longest LLMDeployment name: every child name and label value (the instance label is the name itself)
# then stays a valid DNS label, and Service names are never shortened. The CRD refuses longer names (CEL).
MAX_DEPLOYMENT_NAME_LENGTH = DNS_LABEL_MAX - _LONGEST_SERVICE_SUFFIX


# -- labels and annotations ------------------------------------------------------------------------------

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
PART_OF_LABEL = "app.kubernetes.io/part-of"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
VERSION_LABEL = "app.kubernetes.io/version"
VARIANT_LABEL = "stratus.dev/variant"
SERVER_LABEL = "stratus.dev/server"
MANAGED_BY = "stratus-operator"
# What every child carries: the watches and indexes select on it.
OURS: Mapping[str, str] = {MANAGED_BY_LABEL: MANAGED_BY}
# The Job controller's label on a Job's pods (the older key first seen on clusters before 1.27).
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")

# The hash of a rendered object: an executor patches only when the desired state changed.
SPEC_HASH_ANNOTATION = "stratus.dev/spec-hash"
# The router's config hash on its pod template: a new config rolls the pods.
CONFIG_HASH_ANNOTATION = "stratus.dev/config-hash"
# The mTLS Secret's content hash on pod templates: a new certificate restarts the pods.
TLS_HASH_ANNOTATION = "stratus.dev/tls-hash"
# The LLMDeployment generation a compression Job was created at: a Job that failed at an older generation
# is run again after a spec change (outside the spec hash, which must not change with the generation).
GENERATION_ANNOTATION = "stratus.dev/generation"

# -- containers and paths inside the pods ------------------------------------------------------------------

# The compression Job's worker container: its exit code and termination message are the Job's verdict.
COMPRESS_CONTAINER = "compress"
ARTIFACTS_DIR = "/artifacts"
CONFIG_DIR = "/etc/stratus"
SPEC_FILE = f"{CONFIG_DIR}/spec.json"
ROUTER_CONFIG_FILE = f"{CONFIG_DIR}/router.json"
TERMINATION_LOG = "/dev/termination-log"
CACHE_DIR = "/cache"
MODELS_DIR = "/models"
# Beside CONFIG_DIR, not inside it: no mount points within another (read-only) volume.
TLS_DIR = "/etc/stratus-tls"
TOKENS_DIR = "/etc/stratus-tokens"
TOKENS_FILE = "tokens"
# The workers image's converted bundled models (read-only).
IMAGE_CACHE_DIR = "/opt/stratus/cache"

# -- ports, by role ----------------------------------------------------------------------------------------

PortRole = Literal["grpc", "http"]
GRPC_PORT = 50051
HTTP_PORT = 8080
# What each role listens on inside a pod; the local executor picks free loopback ports instead.
PORTS: Mapping[PortRole, int] = {"grpc": GRPC_PORT, "http": HTTP_PORT}
