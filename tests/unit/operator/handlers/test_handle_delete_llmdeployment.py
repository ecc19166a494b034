"""The finalizer lets go when the namespace is going away, and after a bounded number of failed attempts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from api_recorder import Recorder, api_server
from kopf._core.engines import posting  # the event queue kopf's handlers post into
from samples import sample

from stratus_operator.config import Config
from stratus_operator.handlers.handle_delete_llmdeployment import CLEANUP_ATTEMPTS, delete
from stratus_operator.kube import Kube
from stratus_operator.runtime import Runtime

pytestmark = pytest.mark.unit

__all__ = ["api_server"]  # the fixture, imported for pytest

TERMINATING = {"kind": "Status", "reason": "Forbidden", "code": 403, "message": (
    'jobs "smollm2-cleanup" is forbidden: unable to create new content in namespace prod because it is being '
    "terminated")}
LOG = logging.getLogger("test")


@pytest.fixture()
def events() -> Iterator[asyncio.Queue[Any]]:
    """What kopf.info/warn post, as the operator's event poster would receive it."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    tokens = [posting.settings_var.set(kopf.OperatorSettings()), posting.event_queue_var.set(queue),
              posting.event_queue_loop_var.set(asyncio.get_event_loop())]
    yield queue
    for var, token in zip((posting.settings_var, posting.event_queue_var, posting.event_queue_loop_var), tokens,
                          strict=True):
        var.reset(token)  # type: ignore[attr-defined]


def body(storage: dict[str, Any]) -> dict[str, Any]:
    m = sample(uid="u", namespace="prod")
    m["spec"]["storage"] = storage
    return m


def reasons(queue: asyncio.Queue[Any]) -> list[str]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait().reason)
    return out


OBJECT_STORE = {"objectStore": {"url": "s3://bucket/stratus"}}


@pytest.mark.parametrize("answer", [(403, TERMINATING), (404, {"kind": "Status", "reason": "NotFound",
                                                                "message": 'namespaces "prod" not found'})],
                         ids=["terminating", "gone"])
async def test_a_terminating_or_missing_namespace_releases_the_finalizer(
        api_server: tuple[Recorder, Kube], events: asyncio.Queue[Any], answer: tuple[int, dict[str, Any]]) -> None:
    recorder, kube = api_server
    recorder.answers.append(answer)
    rt = Runtime.from_config(Config(), kube)
    await delete(rt, body(OBJECT_STORE), LOG)  # returns: kopf removes the finalizer
    assert [r["method"] for r in recorder.requests] == ["POST"]
    assert reasons(events) == ["CleanupSkipped"]


async def test_other_failures_are_retried_a_bounded_number_of_times(api_server: tuple[Recorder, Kube],
                                                                   events: asyncio.Queue[Any]) -> None:
    recorder, kube = api_server
    rt = Runtime.from_config(Config(), kube)
    broken = (500, {"kind": "Status", "reason": "InternalError", "message": "etcd timeout"})
    for attempt in range(CLEANUP_ATTEMPTS - 1):
        recorder.answers.append(broken)
        with pytest.raises(kopf.TemporaryError, match="etcd timeout"):
            await delete(rt, body({"pvc": {"claimName": "shared"}}), LOG, retry=attempt)
    recorder.answers.append(broken)
    await delete(rt, body({"pvc": {"claimName": "shared"}}), LOG, retry=CLEANUP_ATTEMPTS - 1)
    assert reasons(events) == ["CleanupSkipped"]
    # A cleanup Job that is already there from an earlier attempt is success.
    recorder.answers.append((409, {"kind": "Status", "reason": "AlreadyExists", "message": "exists"}))
    await delete(rt, body({"pvc": {"claimName": "shared"}}), LOG)
    assert reasons(events) == ["Finalizing"]
