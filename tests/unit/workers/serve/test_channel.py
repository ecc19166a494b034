"""The engine channel: whole messages in order, a sender that never blocks on a slow reader, and a clean end."""

from __future__ import annotations

import socket

import pytest

from stratus_workers.serve.channel import Channel, ChannelClosed

pytestmark = pytest.mark.unit


def test_messages_arrive_whole_and_in_order_whatever_the_reads_cut() -> None:
    a, b = socket.socketpair()
    sender, receiver = Channel(a), Channel(b)
    sent = [("step", i, list(range(i % 70)), b"x" * (i * 37 % 5000)) for i in range(300)]
    got: list[object] = []
    for message in sent:
        sender.send(message)
        if len(got) % 7 == 0:
            got += receiver.receive()
    while len(got) < len(sent):
        sender.flush()
        receiver.wait(1.0)
        got += receiver.receive()
    assert got == sent
    assert receiver.receive() == []


def test_a_reader_that_falls_behind_never_blocks_the_sender() -> None:
    a, b = socket.socketpair()
    sender, receiver = Channel(a), Channel(b)
    big = b"y" * (1 << 20)
    drained = [sender.send(("step", i, big)) for i in range(40)]  # far more than the socket buffers hold
    assert not all(drained) and sender.pending
    got: list[object] = []
    while len(got) < 40:
        sender.flush()
        receiver.wait(1.0)
        got += receiver.receive()
    assert [m[1] for m in got] == list(range(40))  # type: ignore[index]
    assert not sender.pending


def test_a_closed_peer_is_reported_after_its_last_messages() -> None:
    a, b = socket.socketpair()
    sender, receiver = Channel(a), Channel(b)
    sender.send(("failed", "boom", "RuntimeError"))
    sender.close()
    receiver.wait(1.0)
    assert receiver.receive() == [("failed", "boom", "RuntimeError")]
    with pytest.raises(ChannelClosed):
        receiver.receive()
