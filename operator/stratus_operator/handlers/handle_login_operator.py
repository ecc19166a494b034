"""Logs in the standard way: in-cluster service account, else KUBECONFIG or ~/.kube/config."""

from __future__ import annotations

import logging
from typing import Any

import kopf


def login(*, logger: logging.Logger | kopf.Logger, settings: kopf.OperatorSettings,
          memo: Any, **kwargs: Any) -> kopf.ConnectionInfo | None:
    # The official client's loader covers in-cluster, KUBECONFIG (several files) and exec plugins;
    # kopf's own minimal loaders are the fallback where it is missing or fails.
    info = kopf.login_via_client(logger=logger, settings=settings, **kwargs)  # type: ignore[arg-type]
    if info is None:
        info = kopf.login_with_service_account(logger=logger, settings=settings, **kwargs)  # type: ignore[arg-type]
    if info is None:
        info = kopf.login_with_kubeconfig(logger=logger, settings=settings, **kwargs)  # type: ignore[arg-type]
    if info is not None:
        # Our own client (stratus_operator.kube) reads the same credentials.
        memo.connection = info
    return info
