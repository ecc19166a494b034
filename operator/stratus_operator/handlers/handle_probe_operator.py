"""Liveness probe details: how many deployments this process serves, by phase; fails while the API is missing."""

from __future__ import annotations

from typing import Any

import kopf

from stratus_operator.kube import LLMDEPLOYMENTS, KubeError
from stratus_operator.runtime import runtime_of


async def probe(memo: Any) -> dict[str, int]:
    runtime = runtime_of(memo)
    if runtime.config.named_namespaces_only and not runtime.api_served:
        # Without kopf's CRD scanning (handle_startup_operator says why) a CRD installed after the start is never
        # watched: fail liveness until it is served, so the kubelet restarts the operator into it.
        try:
            group = await runtime.kube.request("GET", LLMDEPLOYMENTS.group_path)
        except KubeError as exc:
            if exc.status != 404:
                raise
            group = None
        served = {r.get("name") for r in (group or {}).get("resources") or []}
        if LLMDEPLOYMENTS.plural not in served:
            # Permanent: kopf would otherwise retry the probe for a minute while the kubelet's request waits.
            raise kopf.PermanentError(f"the API server does not serve {LLMDEPLOYMENTS.plural}.{LLMDEPLOYMENTS.group}/"
                               f"{LLMDEPLOYMENTS.version}: install the CRD (deploy/crds or the Helm chart)")
        runtime.api_served = True
    counts: dict[str, int] = {}
    for phase in runtime.phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    return counts
