"""The mTLS Secrets of an LLMDeployment: a CA kept apart, one certificate per server and the router (no I/O).

The CA's key sits in `<name>-ca`, which no pod mounts, so no node's kubelet may read it. Each model server gets
a certificate for its own Service names, good for server use only; the router's is the only one good for
client use. A compromised edge node therefore holds one edge server's identity: it can neither mint
certificates nor dial another server as the router (TLS refuses a client certificate without client use).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stratus_operator.names import ca_name, cloud_name, edge_name, router_name, server_tls_name
from stratus_operator.render import RenderOptions, labels, owner_reference
from stratus_operator.spec import LLMDeployment

CERT_DAYS = 365
# Renew this long before expiry: pods pick up a new certificate only when they restart (the hash rolls them).
RENEW_BEFORE = datetime.timedelta(days=30)
TLS_KEYS = ("tls.crt", "tls.key", "ca.crt")
CA_KEYS = ("ca.crt", "ca.key")
Role = Literal["server", "router"]


def _forms(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


@dataclass(frozen=True)
class Identity:
    """One certificate the operator issues: whose (a server's or the router's child name), its Secret, its names."""

    name: str
    role: Role
    secret: str
    hosts: tuple[str, ...]


def identities(deployment: LLMDeployment) -> list[Identity]:
    """The router and every model server the deployment may run, each with its Secret and Service names."""
    name, ns = deployment.metadata.name, deployment.metadata.namespace
    out = [Identity(router_name(name), "router", server_tls_name(router_name(name)),
                    tuple(_forms(router_name(name), ns)))]
    servers = [cloud_name(name)] if deployment.spec.routing.policy != "edge-only" else []
    servers += [edge_name(name, v.name) for v in deployment.spec.edge.variants]
    out += [Identity(s, "server", server_tls_name(s), tuple(_forms(s, ns))) for s in servers]
    return out


def service_hosts(deployment: LLMDeployment) -> list[str]:
    """DNS names of every Service the deployment may have (router, cloud, each edge variant), in every form."""
    return [host for identity in identities(deployment) for host in identity.hosts]


def dialled_hosts(deployment: LLMDeployment) -> list[str]:
    """The names a user-provided certificate must cover: what the router dials (and its own, with clientTls)."""
    name, ns = deployment.metadata.name, deployment.metadata.namespace
    services = [cloud_name(name)] if deployment.spec.routing.policy != "edge-only" else []
    services += [edge_name(name, v.name) for v in deployment.spec.edge.variants]
    if deployment.spec.security.client_tls:
        services.append(router_name(name))
    return [f"{svc}.{ns}.svc" for svc in services]


def _decode(data: Mapping[str, Any], key: str) -> bytes | None:
    raw = data.get(key)
    if not isinstance(raw, str):
        return None
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return None


@dataclass(frozen=True)
class Verdict:
    """Whether a Secret serves the deployment, and if not, why (the message names the key)."""

    ok: bool
    problem: str = ""
    content_hash: str = ""


def check_secret(secret: Mapping[str, Any] | None, hosts: list[str] | tuple[str, ...] | None,
                 now: datetime.datetime, *, ca: bytes | None = None) -> Verdict:
    """A usable mTLS Secret: the three keys, a certificate signed by ca.crt, unexpired, covering `hosts`; with
    `ca`, its ca.crt must be that CA (the operator's current one)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    if secret is None:
        return Verdict(False, "not found")
    data = secret.get("data") or {}
    raw = {k: _decode(data, k) for k in TLS_KEYS}
    missing = [k for k, v in raw.items() if not v]
    if missing:
        return Verdict(False, f"lacks {', '.join(missing)} (needs tls.crt, tls.key and ca.crt)")
    if ca is not None and raw["ca.crt"] != ca:
        return Verdict(False, "ca.crt is not the deployment's CA")
    try:
        cert = x509.load_pem_x509_certificate(raw["tls.crt"] or b"")
        ca_cert = x509.load_pem_x509_certificate(raw["ca.crt"] or b"")
        key = serialization.load_pem_private_key(raw["tls.key"] or b"", password=None)
    except ValueError as exc:
        return Verdict(False, f"holds unreadable PEM: {exc}")
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
        return Verdict(False, "tls.key does not belong to tls.crt")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        return Verdict(False, f"tls.crt is not signed by ca.crt ({type(exc).__name__})")
    if cert.not_valid_after_utc - RENEW_BEFORE <= now:
        return Verdict(False, f"tls.crt expires {cert.not_valid_after_utc:%Y-%m-%d}")
    if hosts:
        try:
            names = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                        .get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            names = set()
        uncovered = [h for h in hosts if not _covered(h, names)]
        if uncovered:
            return Verdict(False, f"tls.crt does not cover {', '.join(uncovered[:3])}")
    digest = hashlib.sha256(b"".join(raw[k] or b"" for k in TLS_KEYS)).hexdigest()[:16]
    return Verdict(True, "", digest)


def _covered(host: str, names: set[str]) -> bool:
    # A wildcard covers exactly one leftmost label (RFC 6125), as TLS clients match it.
    return host in names or ("." in host and "*." + host.split(".", 1)[1] in names)


def _secret(deployment: LLMDeployment, options: RenderOptions, name: str, component: str, kind: str,
            data: Mapping[str, bytes]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": kind,
        "metadata": {"name": name, "namespace": deployment.metadata.namespace,
                     "labels": labels(deployment, component, options), "annotations": {},
                     "ownerReferences": [owner_reference(deployment)]},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def ca_usable(secret: Mapping[str, Any] | None) -> bool:
    """A CA Secret with both keys whose certificate outlives the certificates it would sign."""
    from cryptography import x509

    data = (secret or {}).get("data") or {}
    pem, key = _decode(data, "ca.crt"), _decode(data, "ca.key")
    if not pem or not key:
        return False
    try:
        ca = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return False
    return ca.not_valid_after_utc - datetime.timedelta(days=CERT_DAYS) > datetime.datetime.now(datetime.UTC)


def issue_ca_secret(deployment: LLMDeployment, options: RenderOptions) -> dict[str, Any]:
    """`<name>-ca`: the deployment's CA certificate and key (Opaque; no pod references it)."""
    from stratus_workers.security import issue_ca

    with tempfile.TemporaryDirectory(prefix="stratus-ca-") as tmp:
        crt, key = issue_ca(Path(tmp), name=f"stratus {deployment.metadata.namespace}/{deployment.metadata.name}",
                            days=CERT_DAYS * 5)
        data = {"ca.crt": crt.read_bytes(), "ca.key": key.read_bytes()}
    return _secret(deployment, options, ca_name(deployment.metadata.name), "ca", "Opaque", data)


def issue_server_secret(deployment: LLMDeployment, options: RenderOptions, identity: Identity,
                        ca_secret: Mapping[str, Any]) -> dict[str, Any]:
    """The Secret of one identity: its certificate (server use; the router's also client use) signed by the CA
    in `ca_secret`, its key and the CA certificate, and nothing else."""
    from stratus_workers.security import issue_cert

    data = ca_secret.get("data") or {}
    ca_pem, ca_key_pem = _decode(data, "ca.crt"), _decode(data, "ca.key")
    if not ca_pem or not ca_key_pem:
        raise ValueError(f"the CA Secret {ca_name(deployment.metadata.name)} lacks ca.crt or ca.key")
    with tempfile.TemporaryDirectory(prefix="stratus-tls-") as tmp:
        directory = Path(tmp)
        (directory / "ca.crt").write_bytes(ca_pem)
        (directory / "ca.key").write_bytes(ca_key_pem)
        cert, key = issue_cert(directory, identity.name, directory / "ca.crt", directory / "ca.key",
                               identity.hosts, days=CERT_DAYS, server=True, client=identity.role == "router")
        files = {"tls.crt": cert.read_bytes(), "tls.key": key.read_bytes(), "ca.crt": ca_pem}
    return _secret(deployment, options, identity.secret, "tls", "kubernetes.io/tls", files)


def ca_certificate(ca_secret: Mapping[str, Any] | None) -> bytes | None:
    """The PEM of the CA in a CA Secret."""
    return _decode((ca_secret or {}).get("data") or {}, "ca.crt")
