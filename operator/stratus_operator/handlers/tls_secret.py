"""The I/O half of a deployment's mTLS Secret: read it, issue or renew the operator's own, remember it is good.

The checks and the certificates themselves are `stratus_operator.tls` (pure).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from stratus_operator.kube import SECRETS, Conflict, NotFound
from stratus_operator.render import SecretRefs, tls_secret_name
from stratus_operator.runtime import Runtime
from stratus_operator.spec import LLMDeployment
from stratus_operator.tls import check_secret, dialled_hosts, issue_secret, service_hosts

OURS_TTL_SECONDS = 3600.0  # how long a good operator-issued Secret is trusted without a GET
USERS_TTL_SECONDS = 300.0  # a user's Secret may be rotated under us: look again this often


async def ensure_tls(rt: Runtime, dep: LLMDeployment, body: Mapping[str, Any],
                     logger: logging.Logger | kopf.Logger) -> tuple[SecretRefs, str | None]:
    """The mTLS Secret pods mount: the user's (checked) or the operator's (issued once, renewed when it no
    longer fits). Returns the refs for rendering and, when the Secret cannot serve, why (naming the field)."""
    name = tls_secret_name(dep)
    if name is None:
        return SecretRefs(), None
    ns = dep.metadata.namespace
    users = dep.spec.security.tls_secret_name is not None
    hosts = dialled_hosts(dep) if users else service_hosts(dep)
    key, ident = (ns, dep.metadata.name), (name, tuple(hosts))
    cached = rt.tls_checked.get(key)
    if cached is not None and cached[0] == ident and cached[1] > time.monotonic():
        return SecretRefs(name, cached[2]), None
    try:
        live: dict[str, Any] | None = await rt.kube.get(SECRETS, ns, name)
    except NotFound:
        live = None
    now = datetime.datetime.now(datetime.UTC)
    verdict = check_secret(live, hosts, now)
    if not verdict.ok and users:
        return SecretRefs(name), f"spec.security.tlsSecretName: Secret {ns}/{name} {verdict.problem}"
    if not verdict.ok:
        owners = [r.get("uid") for r in ((live or {}).get("metadata") or {}).get("ownerReferences") or []]
        if live is not None and dep.metadata.uid not in owners:
            return SecretRefs(name), (f"spec.security: Secret {ns}/{name} exists and is not this deployment's; "
                                      "name it in tlsSecretName or delete it")
        secret = issue_secret(dep, rt.options, live)
        try:
            if live is None:
                await rt.kube.create(SECRETS, ns, secret)
            else:
                await rt.kube.patch(SECRETS, ns, name, {"data": secret["data"]})
        except Conflict:
            return SecretRefs(name), None  # another pass created it meanwhile; the next one adopts it
        why = "issued" if live is None else f"renewed ({verdict.problem})"
        logger.info(f"mTLS certificate {why} in Secret {name}")
        ref: Any = body  # kopf types it as its Body; any mapping with metadata serves
        kopf.info(ref, reason="CertificateIssued", message=f"mTLS certificate {why} in Secret {name}")
        verdict = check_secret(secret, hosts, now)
    ttl = USERS_TTL_SECONDS if users else OURS_TTL_SECONDS
    rt.tls_checked[key] = (ident, time.monotonic() + ttl, verdict.content_hash)
    return SecretRefs(name, verdict.content_hash), None
