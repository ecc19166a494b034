"""Free ports for child processes: outside the kernel's ephemeral range, bindable, never handed out twice."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from stratus_workers import ports

pytestmark = pytest.mark.unit


def test_ports_come_from_below_the_ephemeral_range_and_are_bindable() -> None:
    low, _ = ports.ephemeral_range()
    seen = set()
    for _ in range(50):
        port = ports.free_port()
        assert ports._LOWEST <= port < low
        assert port not in seen  # two children started together never share one
        seen.add(port)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_someone_listens_on_is_not_bindable_so_never_chosen() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.free_port()))
        taken.listen()
        assert not ports._bindable("127.0.0.1", taken.getsockname()[1])


def test_no_room_below_the_range_uses_the_ports_above_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    table = tmp_path / "ip_local_port_range"
    table.write_text("1024\t60000\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", table)
    assert 60000 < ports.free_port() <= 65535


def test_an_unreadable_range_falls_back_to_linux_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", tmp_path / "missing")
    assert ports.ephemeral_range() == (32768, 60999)


def test_no_room_on_either_side_leaves_it_to_the_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    table = tmp_path / "ip_local_port_range"
    table.write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", table)
    port = ports.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
