"""Child names are DNS labels, stable and distinct; hashes are stable across processes."""

from __future__ import annotations

import pytest

from stratus_operator.names import PORTS, child_name, edge_name, job_name, stable_hash

pytestmark = pytest.mark.unit


def test_child_names_are_dns_labels() -> None:
    assert child_name("a", "edge", "b") == "a-edge-b" == edge_name("a", "b")
    long = child_name("x" * 60, "compress", "variant-name", "deadbeef")
    assert len(long) <= 63 and long[-9] == "-"
    assert long != job_name("x" * 60, "variant-namf", "deadbeef")
    assert long == job_name("x" * 60, "variant-name", "deadbeef")


def test_stable_hash_ignores_key_order() -> None:
    assert stable_hash({"a": 1, "b": [2, 3]}) == stable_hash({"b": [2, 3], "a": 1})
    assert stable_hash({"a": 1}, 16) != stable_hash({"a": 2}, 16) and len(stable_hash("x", 16)) == 16


def test_ports_by_role() -> None:
    assert dict(PORTS) == {"grpc": 50051, "http": 8080}
