"""The mTLS Secret checks and issuing (pure): the keys, the CA, expiry and the Service names a certificate covers."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from samples import SMOLLM2, sample

from stratus_operator.render import RenderOptions
from stratus_operator.spec import LLMDeployment
from stratus_operator.tls import check_secret, dialled_hosts, issue_secret, service_hosts

pytestmark = pytest.mark.unit


def load(**spec: Any) -> LLMDeployment:
    m = sample(SMOLLM2, uid="11111111-2222-3333-4444-555555555555", namespace="team-a")
    m["spec"].update(spec)
    return LLMDeployment.from_manifest(m)


NOW = datetime.datetime.now(datetime.UTC)


def test_issued_secret_is_owned_covers_every_service_and_is_reused() -> None:
    d = load()
    secret = issue_secret(d, RenderOptions())
    kubernetes_validate.validate(secret, "1.31", strict=True)
    assert secret["type"] == "kubernetes.io/tls" and secret["metadata"]["name"] == "smollm2-tls"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == d.metadata.uid
    hosts = service_hosts(d)
    assert "smollm2-edge-int8.team-a.svc" in hosts and "smollm2-router.team-a.svc.cluster.local" in hosts
    verdict = check_secret(secret, hosts, NOW)
    assert verdict.ok and len(verdict.content_hash) == 16
    # A new variant is a Service the certificate does not cover yet: renewed under the same CA.
    more = load(edge={"variants": [{"name": "int8"}, {"name": "int4"}]})
    stale = check_secret(secret, service_hosts(more), NOW)
    assert not stale.ok and "smollm2-edge-int4" in stale.problem
    renewed = issue_secret(more, RenderOptions(), secret)
    assert renewed["data"]["ca.crt"] == secret["data"]["ca.crt"] and renewed["data"]["tls.crt"] != secret["data"][
        "tls.crt"]
    assert check_secret(renewed, service_hosts(more), NOW).ok


def test_check_secret_names_what_is_wrong() -> None:
    d = load()
    good = issue_secret(d, RenderOptions())
    other = issue_secret(d, RenderOptions())
    assert check_secret(None, None, NOW).problem == "not found"
    missing = {"data": {k: v for k, v in good["data"].items() if k != "ca.crt"}}
    assert "lacks ca.crt" in check_secret(missing, None, NOW).problem
    wrong_ca = {"data": {**good["data"], "ca.crt": other["data"]["ca.crt"]}}
    assert "not signed by ca.crt" in check_secret(wrong_ca, None, NOW).problem
    wrong_key = {"data": {**good["data"], "tls.key": other["data"]["tls.key"]}}
    assert "does not belong" in check_secret(wrong_key, None, NOW).problem
    garbage = {"data": {**good["data"], "tls.crt": base64.b64encode(b"not a pem").decode()}}
    assert "unreadable" in check_secret(garbage, None, NOW).problem
    assert "expires" in check_secret(good, None, NOW + datetime.timedelta(days=360)).problem
    # A user's wildcard certificate covers the names the router dials.
    assert dialled_hosts(d) == ["smollm2-cloud.team-a.svc", "smollm2-edge-int8.team-a.svc"]


def test_a_users_wildcard_certificate_is_accepted(tmp_path: Path) -> None:
    from stratus_workers.security import issue_ca, issue_cert

    ca, ca_key = issue_ca(tmp_path)
    cert, key = issue_cert(tmp_path, "corp", ca, ca_key, ["*.team-a.svc"])
    data = {"tls.crt": cert, "tls.key": key, "ca.crt": ca}
    secret = {"data": {k: base64.b64encode(p.read_bytes()).decode() for k, p in data.items()}}
    d = load()
    assert check_secret(secret, dialled_hosts(d), NOW).ok
    assert not check_secret(secret, ["smollm2-cloud.team-b.svc"], NOW).ok
