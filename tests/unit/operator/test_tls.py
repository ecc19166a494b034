"""The mTLS Secrets (pure): a CA apart, a certificate per server and router, and the checks that hold them."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from samples import SMOLLM2, sample

from stratus_operator.render import RenderOptions
from stratus_operator.spec import LLMDeployment
from stratus_operator.tls import (
    ca_certificate,
    ca_usable,
    check_secret,
    dialled_hosts,
    identities,
    issue_ca_secret,
    issue_server_secret,
    service_hosts,
)

pytestmark = pytest.mark.unit


def load(**spec: Any) -> LLMDeployment:
    m = sample(SMOLLM2, uid="11111111-2222-3333-4444-555555555555", namespace="team-a")
    m["spec"].update(spec)
    return LLMDeployment.from_manifest(m)


NOW = datetime.datetime.now(datetime.UTC)


def test_the_ca_key_sits_apart_and_each_server_gets_its_own_certificate() -> None:
    d = load()
    ca = issue_ca_secret(d, RenderOptions())
    kubernetes_validate.validate(ca, "1.31", strict=True)
    assert ca["metadata"]["name"] == "smollm2-ca" and set(ca["data"]) == {"ca.crt", "ca.key"}
    assert ca["metadata"]["ownerReferences"][0]["uid"] == d.metadata.uid and ca_usable(ca)
    wanted = {i.name: i for i in identities(d)}
    assert sorted(wanted) == ["smollm2-cloud", "smollm2-edge-int8", "smollm2-router"]
    for identity in wanted.values():
        secret = issue_server_secret(d, RenderOptions(), identity, ca)
        kubernetes_validate.validate(secret, "1.31", strict=True)
        assert secret["type"] == "kubernetes.io/tls" and secret["metadata"]["name"] == f"{identity.name}-tls"
        assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}  # never the CA's key
        assert check_secret(secret, identity.hosts, NOW, ca=ca_certificate(ca)).ok
        cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        # Its own Service names only: an edge server's certificate cannot pass for the cloud server.
        assert set(names) == set(identity.hosts) and f"{identity.name}.team-a.svc" in names
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        client = {ExtendedKeyUsageOID.CLIENT_AUTH} & usages
        assert ExtendedKeyUsageOID.SERVER_AUTH in usages and bool(client) is (identity.role == "router")
    # Another CA's certificate no longer counts, and a new variant is a new identity.
    other = issue_ca_secret(d, RenderOptions())
    stale = issue_server_secret(d, RenderOptions(), wanted["smollm2-cloud"], other)
    assert check_secret(stale, wanted["smollm2-cloud"].hosts, NOW, ca=ca_certificate(ca)).problem == (
        "ca.crt is not the deployment's CA")
    more = load(edge={"variants": [{"name": "int8"}, {"name": "int4"}]})
    assert "smollm2-edge-int4" in {i.name for i in identities(more)}
    assert "smollm2-edge-int4.team-a.svc" in service_hosts(more)


def test_a_long_namespace_and_name_still_get_a_ca() -> None:
    # X.509 caps a common name at 64 characters; "stratus <namespace>/<name>" may be longer.
    m = sample(SMOLLM2, uid="u", namespace="n" * 63)
    m["metadata"]["name"] = "a" * 33
    assert ca_usable(issue_ca_secret(LLMDeployment.from_manifest(m), RenderOptions()))


def test_check_secret_names_what_is_wrong() -> None:
    d = load()
    cloud = next(i for i in identities(d) if i.name == "smollm2-cloud")
    good = issue_server_secret(d, RenderOptions(), cloud, issue_ca_secret(d, RenderOptions()))
    other = issue_server_secret(d, RenderOptions(), cloud, issue_ca_secret(d, RenderOptions()))
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
    assert "does not cover smollm2-router" in check_secret(good, ["smollm2-router"], NOW).problem
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
