"""The mTLS Secret of an LLMDeployment: issue a CA and certificate, and check a Secret still fits (no I/O)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stratus_operator.names import cloud_name, edge_name, router_name, tls_name
from stratus_operator.render import RenderOptions, labels, owner_reference, tls_secret_name
from stratus_operator.spec import LLMDeployment

CERT_DAYS = 365
# Renew this long before expiry: pods pick up a new certificate only when they restart (the hash rolls them).
RENEW_BEFORE = datetime.timedelta(days=30)
TLS_KEYS = ("tls.crt", "tls.key", "ca.crt")
CA_KEY = "ca.key"


def service_hosts(deployment: LLMDeployment) -> list[str]:
    """DNS names of every Service the deployment may have (router, cloud, each edge variant), in every form."""
    name, ns = deployment.metadata.name, deployment.metadata.namespace
    services = [router_name(name), cloud_name(name)]
    services += [edge_name(name, v.name) for v in deployment.spec.edge.variants]
    hosts: list[str] = []
    for svc in services:
        hosts += [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"]
    return hosts


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


def check_secret(secret: Mapping[str, Any] | None, hosts: list[str] | None,
                 now: datetime.datetime) -> Verdict:
    """A usable mTLS Secret: the three keys, a certificate signed by ca.crt, unexpired, covering `hosts`."""
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
    try:
        cert = x509.load_pem_x509_certificate(raw["tls.crt"] or b"")
        ca = x509.load_pem_x509_certificate(raw["ca.crt"] or b"")
        key = serialization.load_pem_private_key(raw["tls.key"] or b"", password=None)
    except ValueError as exc:
        return Verdict(False, f"holds unreadable PEM: {exc}")
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
        return Verdict(False, "tls.key does not belong to tls.crt")
    try:
        cert.verify_directly_issued_by(ca)
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


def issue_secret(deployment: LLMDeployment, options: RenderOptions,
                 previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The operator's `<name>-tls` Secret: a per-deployment CA (kept from `previous` while it is good) and a
    certificate for every Service name, for both server and client use (one identity for the whole set)."""
    from stratus_workers.security import issue_ca, issue_cert

    name = tls_secret_name(deployment) or tls_name(deployment.metadata.name)
    with tempfile.TemporaryDirectory(prefix="stratus-tls-") as tmp:
        directory = Path(tmp)
        ca_crt, ca_key = directory / "ca.crt", directory / "ca.key"
        old = (previous or {}).get("data") or {}
        old_ca, old_key = _decode(old, "ca.crt"), _decode(old, CA_KEY)
        if old_ca and old_key and _ca_usable(old_ca):
            # Same CA: pods still running with the old certificate keep trusting the new one during a roll.
            ca_crt.write_bytes(old_ca)
            ca_key.write_bytes(old_key)
        else:
            issue_ca(directory, name=f"stratus {deployment.metadata.namespace}/{deployment.metadata.name}",
                     days=CERT_DAYS * 5)
        cert, key = issue_cert(directory, "tls", ca_crt, ca_key, service_hosts(deployment), days=CERT_DAYS)
        files = {"tls.crt": cert, "tls.key": key, "ca.crt": ca_crt, CA_KEY: ca_key}
        data = {k: base64.b64encode(p.read_bytes()).decode() for k, p in files.items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": deployment.metadata.namespace,
                     "labels": labels(deployment, "tls", options), "annotations": {},
                     "ownerReferences": [owner_reference(deployment)]},
        "data": data,
    }


def _ca_usable(pem: bytes) -> bool:
    from cryptography import x509

    try:
        ca = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return False
    return ca.not_valid_after_utc - datetime.timedelta(days=CERT_DAYS) > datetime.datetime.now(datetime.UTC)
