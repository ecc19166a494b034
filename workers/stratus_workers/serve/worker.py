"""The engine process: `python -m stratus_workers.serve.worker FD` runs one engine loop behind the socket FD.

The model server (the frontend) starts it with one end of a socket pair and sends it what to build:
`EngineSettings` and a picklable loader that returns a `models.LoadedModel`. It loads the model,
builds the engine core, warms it up, answers ("ready", EngineInfo, tokenizer), then runs the
engine loop until told to stop or until the frontend goes away (a closed channel reads as a stop, and the
process exits with status 0, logging a warning). A thread beside the loop sends
("beat", steps, seconds in the current step) every BEAT_SECONDS, so the frontend can tell a process
that stopped (no beats) from a step that takes long (beats, but no progress). An error that ends
the loop is sent as ("failed", message, exception type) before the process exits with status 1.
Under `--tensor-parallel N` this process is rank 0: it starts ranks 1..N-1 (unless torchrun did),
which follow its runner calls, and they die with it. Under `--pipeline-parallel P` it is rank 0 of
stage 0 and starts the other P - 1 stages' ranks (P * T - 1 processes with `--tensor-parallel T`) the
same way (serve/pipeline.py); a rank that dies ends this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from stratus_workers.lifecycle import exit_now
from stratus_workers.observability import setup_logging
from stratus_workers.serve.channel import Channel, ChannelClosed
from stratus_workers.serve.loop import EngineLoop, EngineSettings, start_core

log = logging.getLogger(__name__)

BEAT_SECONDS = 0.2
PR_SET_PDEATHSIG = 1


def freeze_heap() -> None:
    """Move everything loaded so far (torch, the model, compiled kernels) out of the garbage collector's reach.

    A full collection walks every tracked object; with a few hundred thousand objects from torch and
    the compiler it stalls the loop for 100-600 ms (measured on the 2-core machine), long enough to
    show in time to first token. None of these objects ever becomes garbage.
    """
    gc.collect()
    gc.freeze()


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (best effort elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ChannelInbox:
    """The engine loop's inbox over the channel; a closed channel (the frontend is gone) reads as stop."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def take(self, timeout: float | None) -> list[Any]:
        try:
            if self.channel.pending:
                self.channel.flush()
            messages = self.channel.receive()
            if messages or timeout == 0:
                return messages
            self.channel.wait(timeout)
            return self.channel.receive()
        except ChannelClosed:
            return [("stop",)]


class Beat(threading.Thread):
    """Sends the loop's progress every BEAT_SECONDS until the channel closes."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(name="stratus-engine-beat", daemon=True)
        self.channel = channel
        self.loop: EngineLoop | None = None

    def run(self) -> None:
        while True:
            time.sleep(BEAT_SECONDS)
            loop = self.loop
            busy = 0.0
            if loop is not None and loop.busy_since:
                busy = time.monotonic() - loop.busy_since
            try:
                self.channel.send(("beat", loop.steps if loop is not None else 0, busy))
            except ChannelClosed:
                return


def _first_message(channel: Channel) -> Any:
    while True:
        messages = channel.receive()
        if messages:
            return messages[0]
        channel.wait(None)


def serve(channel: Channel) -> int:
    settings, load = _first_message(channel)
    assert isinstance(settings, EngineSettings)
    setup_logging(settings.log_level, settings.log_format)
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.set_num_interop_threads(1)  # ops run on the loop's thread one at a time
    beat = Beat(channel)
    beat.start()
    try:
        watch: Any = None
        children: list[Any] = []

        def setup() -> tuple[Any, Any]:
            """The process group of a tensor- or pipeline-parallel engine (followers spawned), after loading."""
            nonlocal watch, children
            if settings.pipeline_parallel > 1:  # with tensor_parallel too: each stage is a tensor-parallel group
                from stratus_workers.serve import parallel as tp
                from stratus_workers.serve import pipeline

                world = settings.pipeline_parallel * settings.tensor_parallel
                children = tp.spawn_followers(world, list(settings.argv))
                watch = pipeline.StageWatch(
                    children, functools.partial(_stage_died, channel), tensor_parallel=settings.tensor_parallel
                )
                watch.start()
                pipe = pipeline.init_pipeline(
                    settings.pipeline_parallel, settings.pipeline_microbatches, settings.tensor_parallel
                )
                return None, pipe
            if settings.tensor_parallel > 1:
                from stratus_workers.serve import parallel as tp

                if "RANK" not in os.environ:
                    children = tp.spawn_followers(settings.tensor_parallel, list(settings.argv))
                return tp.init_group(settings.tensor_parallel), None
            return None, None

        core, info, tokenizer = start_core(functools.partial(_load, load), settings, setup, own_process=True)
        freeze_heap()
        channel.send(("ready", info, tokenizer))

        gone = False  # the frontend closed the channel: nobody is left to answer

        def emit(message: tuple[Any, ...]) -> None:
            nonlocal gone
            if gone:
                return
            try:
                channel.send(message)
            except ChannelClosed:
                # The frontend exited without a stop (killed, or its process ended first): the inbox reads as stop
                # from now on, and the loop ends as it would on one. No error of the engine's.
                gone = True
                log.warning("the frontend closed the engine channel; the engine loop stops")

        loop = EngineLoop(core, emit)
        beat.loop = loop
        loop.run(ChannelInbox(channel))
        if watch is not None:
            watch.stop()  # the stages exit next, and that is no failure
        core.runner.close()  # under tensor parallel: the followers leave follow() and exit
        for child in children:
            with contextlib.suppress(Exception):
                child.wait(timeout=60)
        if not gone:
            _drain(channel, 5.0)
        return 0
    except BaseException as exc:
        log.critical("engine loop died", exc_info=exc)
        with contextlib.suppress(ChannelClosed):
            channel.send(("failed", f"{type(exc).__name__}: {exc}", type(exc).__name__))
            _drain(channel, 5.0)
        return 1


def _stage_died(channel: Channel, reason: str) -> None:
    """A pipeline stage died (StageWatch's thread): report it and exit now, since the loop may be
    waiting on that stage for ever; the stages still running die with this process."""
    log.critical("pipeline stage died; the engine stops", extra={"reason": reason})
    with contextlib.suppress(ChannelClosed):
        channel.send(("failed", reason, "StageFailed"))
        _drain(channel, 2.0)
    exit_now(1)


def _load(load: Callable[[], Any]) -> Any:
    return load()


def _drain(channel: Channel, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while channel.pending and time.monotonic() < deadline:
        channel.wait(0.05)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m stratus_workers.serve.worker FD (the model server starts this)", file=sys.stderr)
        return 2
    die_with_parent()
    channel = Channel(socket.socket(fileno=int(args[0])))
    exit_now(serve(channel))


if __name__ == "__main__":
    sys.exit(main())
