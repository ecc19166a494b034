"""The I/O half of a deployment's mTLS Secrets: read them, issue or renew the operator's own, remember they are good.

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
from stratus_operator.names import ca_name
from stratus_operator.render import SecretRefs
from stratus_operator.runtime import Runtime
from stratus_operator.spec import LLMDeployment
from stratus_operator.tls import (
    ca_certificate,
    ca_usable,
    check_secret,
    dialled_hosts,
    identities,
    issue_ca_secret,
    issue_server_secret,
)

OURS_TTL_SECONDS = 3600.0  # how long good operator-issued Secrets are trusted without a GET
USERS_TTL_SECONDS = 300.0  # a user's Secret may be rotated under us: look again this often


async def _get(rt: Runtime, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return await rt.kube.get(SECRETS, ns, name)
    except NotFound:
        return None


def _foreign(dep: LLMDeployment, live: Mapping[str, Any] | None) -> bool:
    owners = [r.get("uid") for r in ((live or {}).get("metadata") or {}).get("ownerReferences") or []]
    return live is not None and dep.metadata.uid not in owners


async def _write(rt: Runtime, ns: str, live: Mapping[str, Any] | None, secret: dict[str, Any]) -> bool:
    """Create or replace the data of `secret`; False when another pass created it meanwhile."""
    try:
        if live is None:
            await rt.kube.create(SECRETS, ns, secret)
        else:
            await rt.kube.patch(SECRETS, ns, secret["metadata"]["name"], {"data": secret["data"]})
    except Conflict:
        return False
    return True


async def ensure_tls(rt: Runtime, dep: LLMDeployment, body: Mapping[str, Any],
                     logger: logging.Logger | kopf.Logger) -> tuple[SecretRefs, str | None]:
    """The mTLS Secrets pods mount: the user's (checked) or the operator's (a CA and one certificate per server
    and the router, issued once, renewed when they no longer fit). Returns the refs for rendering and, when the
    Secrets cannot serve, why (naming the field)."""
    refs = SecretRefs.of(dep)
    if refs.shared is None and not refs.issued:
        return refs, None
    ns = dep.metadata.namespace
    wanted = identities(dep)
    ident = (refs.shared or ca_name(dep.metadata.name),
             tuple(dialled_hosts(dep)) if refs.shared else tuple(i.secret for i in wanted))
    key = (ns, dep.metadata.name)
    cached = rt.tls_checked.get(key)
    if cached is not None and cached[0] == ident and cached[1] > time.monotonic():
        return SecretRefs.of(dep, cached[2]), None
    now = datetime.datetime.now(datetime.UTC)
    if refs.shared is not None:
        verdict = check_secret(await _get(rt, ns, refs.shared), dialled_hosts(dep), now)
        if not verdict.ok:
            return refs, f"spec.security.tlsSecretName: Secret {ns}/{refs.shared} {verdict.problem}"
        shared = {"": verdict.content_hash}
        rt.tls_checked[key] = (ident, time.monotonic() + USERS_TTL_SECONDS, shared)
        return SecretRefs.of(dep, shared), None

    ca_secret = await _get(rt, ns, ca_name(dep.metadata.name))
    if _foreign(dep, ca_secret):
        return refs, (f"spec.security: Secret {ns}/{ca_name(dep.metadata.name)} exists and is not this "
                      "deployment's; name a Secret in tlsSecretName or delete it")
    if not ca_usable(ca_secret):
        fresh = issue_ca_secret(dep, rt.options)
        if not await _write(rt, ns, ca_secret, fresh):
            return refs, None  # another pass issued it meanwhile; the next one uses it
        ca_secret = fresh
        _issued(body, logger, f"mTLS CA issued in Secret {fresh['metadata']['name']} (mounted by no pod)")
    ca = ca_certificate(ca_secret)
    hashes: dict[str, str] = {}
    for identity in wanted:
        live = await _get(rt, ns, identity.secret)
        verdict = check_secret(live, identity.hosts, now, ca=ca)
        if not verdict.ok:
            if _foreign(dep, live):
                return refs, (f"spec.security: Secret {ns}/{identity.secret} exists and is not this deployment's; "
                              "name a Secret in tlsSecretName or delete it")
            assert ca_secret is not None
            secret = issue_server_secret(dep, rt.options, identity, ca_secret)
            if not await _write(rt, ns, live, secret):
                return refs, None
            why = "issued" if live is None else f"renewed ({verdict.problem})"
            _issued(body, logger, f"mTLS certificate of {identity.name} {why} in Secret {identity.secret}")
            verdict = check_secret(secret, identity.hosts, now, ca=ca)
        hashes[identity.name] = verdict.content_hash
    rt.tls_checked[key] = (ident, time.monotonic() + OURS_TTL_SECONDS, hashes)
    return SecretRefs.of(dep, hashes), None


def _issued(body: Mapping[str, Any], logger: logging.Logger | kopf.Logger, message: str) -> None:
    logger.info(message)
    ref: Any = body  # kopf types it as its Body; any mapping with metadata serves
    kopf.info(ref, reason="CertificateIssued", message=message)
