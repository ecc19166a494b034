"""The frontend's engine: streams of text events over an engine core in a process of its own, or in a thread.

`AsyncEngine` is what the gRPC servicer talks to (it implements surface.ServingEngine). It sends
each request's token ids to the engine core through a transport and receives one message per
engine step carrying every row's new token ids; it turns them into text here (incremental
detokenization, stop sequences, log-probability strings), so the engine loop never spends its
time on text, protobuf or asyncio. A stream whose reader falls behind gets every token that
arrived since its last event in one event. Over the process transport a speculative session's Draft and Verify
calls send their contexts as deltas on the session's last one (serve/contexts.py), not whole, and their Sampling as
its values; the engine process's step messages carry their verdicts as plain tuples (`StepOutput.pack`).

Two transports run the core (serve/loop.py): `ProcessTransport` in an engine process of its own
(serve/worker.py) over a socket pair (serve/channel.py), the default on CUDA; `ThreadTransport` in
a thread of this process, for a preloaded model and the small CPU case. Either way the frontend
supervises it: an engine process that exits, closes its channel, stops sending heartbeats for
HANG_SECONDS, or stays inside one step for `step_timeout` seconds is dead, and so is a loop thread
that raised; so is a core that is alive but does not advance: work is owed and no step output came
for `stall_timeout` seconds. Then every request in flight and every later one ends with UNAVAILABLE,
and `on_failure` hears why at once (the server turns its health to NOT_SERVING).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from stratus_workers.protocol.requests import Sampling
from stratus_workers.protocol.text import TextAssembler
from stratus_workers.serve.channel import Channel, ChannelClosed
from stratus_workers.serve.contexts import (
    CONTEXTS_PER_SESSION,
    MIN_CONTEXTS,
    PROMPT_ANCHORS,
    ContextSender,
    pack_call,
    prompt_messages,
)
from stratus_workers.serve.core import CALL_ERRORS, EngineStats, Finished, StepOutput
from stratus_workers.serve.errors import EngineFailed, EngineOverloaded, EngineStopped
from stratus_workers.serve.surface import (
    Alternatives,
    DraftResult,
    EngineInfo,
    Event,
    FinishEvent,
    FinishReason,
    SparseDist,
    TokenEvent,
    TokenLogprob,
    VerifyResult,
)

if TYPE_CHECKING:
    from stratus_workers.serve.core import EngineCore
    from stratus_workers.serve.loop import EngineLoop, EngineSettings, ThreadInbox
    from stratus_workers.serve.parallel import ParallelContext

log = logging.getLogger(__name__)

HANG_SECONDS = 1.25  # an engine process silent this long (it beats every 0.2 s) is frozen or gone
# Stream messages per second the frontend sends in all (see AsyncEngine.message_rate; `--stream-message-rate`).
# On an H200 at 64 streams a message cost the frontend ~80 µs and a request ~2 ms (gRPC's handling most of both):
# at 4,000 a second the messages alone took a third of its one thread, and new requests queued behind them
# (135M, 3,000-token shared prefix: TTFT p50 at the clients 10.5 ms at 4,000, 7.3 at 2,000, 6.3 at 1,000, 6.2 at
# 500; docs/benchmarks.md). At 1,000 one stream still gets a message every millisecond (about a decode step), 64
# streams ~16 a second each.
MESSAGE_RATE = 1_000.0
WATCH_SECONDS = 0.1
DEFAULT_STEP_TIMEOUT = 60.0

Deliver = Callable[[list[Any]], None]
Dead = Callable[[str], None]


class Transport(abc.ABC):
    """Runs an engine core somewhere and carries messages to it and its outputs back."""

    kind: str
    pid: int = 0
    settings: EngineSettings
    # Whether speculative calls send their contexts as deltas (serve/contexts.py): over a channel that pickles
    # them, yes; to a thread, which takes the list as it is, they would only cost a comparison and a copy.
    delta_contexts = False

    @abc.abstractmethod
    async def start(self, deliver: Deliver, dead: Dead) -> tuple[EngineInfo, Any]:
        """Start the core; returns its info and the tokenizer. Outputs go to `deliver` (in the event
        loop's thread, several messages at a time); `dead(reason)` is called if the core dies."""

    @abc.abstractmethod
    def send(self, message: tuple[Any, ...]) -> None: ...

    @abc.abstractmethod
    def check(self) -> str | None:
        """None while the core works; otherwise why it is dead (polled by the supervision)."""

    @abc.abstractmethod
    async def stop(self, timeout: float) -> None: ...

    def halt(self) -> None:  # noqa: B027 - a thread cannot be killed: by default there is nothing to free
        """The frontend gave up on a core that does not advance: free what it holds, if that can be done."""


class ThreadTransport(Transport):
    """The core in a thread of this process: for a model already loaded here, and the small CPU case."""

    kind = "thread"

    def __init__(
        self,
        settings: EngineSettings,
        *,
        loaded: Any = None,
        load: Callable[[], Any] | None = None,
        core: tuple[EngineCore, EngineInfo, Any] | None = None,
        parallel: ParallelContext | None = None,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.loaded = loaded
        self.load = load
        self.prebuilt = core
        self.parallel = parallel
        self.step_timeout = step_timeout
        self.failure: str | None = None
        self.loop: EngineLoop | None = None
        self.core: EngineCore | None = None
        self._inbox: ThreadInbox | None = None
        self._thread: threading.Thread | None = None
        self._pending: list[Any] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._stopping = False

    async def start(self, deliver: Deliver, dead: Dead) -> tuple[EngineInfo, Any]:
        from stratus_workers.serve.loop import EngineLoop, ThreadInbox, start_core

        loop = asyncio.get_running_loop()
        if self.prebuilt is not None:
            core, info, tokenizer = self.prebuilt
        else:
            loaded, load, parallel = self.loaded, self.load, self.parallel
            if loaded is not None:
                load = lambda: loaded  # noqa: E731
            assert load is not None
            core, info, tokenizer = await loop.run_in_executor(
                None, start_core, load, self.settings, lambda: (parallel, None)
            )
        self.core = core
        self._inbox = ThreadInbox()

        def emit(message: tuple[Any, ...]) -> None:  # the engine thread: one loop wake-up per batch of steps
            with self._lock:
                self._pending.append(message)
                if self._scheduled:
                    return
                self._scheduled = True
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(flush)

        def flush() -> None:
            with self._lock:
                items, self._pending, self._scheduled = self._pending, [], False
            deliver(items)

        def run() -> None:
            try:
                assert self.loop is not None and self._inbox is not None
                self.loop.run(self._inbox)
            except BaseException as exc:  # the thread must never end quietly behind a serving health
                log.critical("engine loop died; this server stops serving", exc_info=exc)
                self.failure = f"the model engine stopped after an internal error ({type(exc).__name__}: {exc})"
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(dead, self.failure)

        self.loop = EngineLoop(core, emit, pickled=False)  # messages cross as they are: verdicts stay objects
        self._thread = threading.Thread(target=run, name="stratus-engine", daemon=True)
        self._thread.start()
        return info, tokenizer

    def send(self, message: tuple[Any, ...]) -> None:
        assert self._inbox is not None
        self._inbox.put(message)

    def check(self) -> str | None:
        if self.failure is not None:
            return self.failure
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the model engine's thread exited"
        loop = self.loop
        if loop is not None and loop.busy_since and time.monotonic() - loop.busy_since > self.step_timeout:
            return f"the model engine has been inside one step for over {self.step_timeout:.0f} s"
        return None

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        if self._inbox is not None:
            self._inbox.put(("stop",))
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)
        if self.core is not None and (self._thread is None or not self._thread.is_alive()):
            self.core.runner.close()  # under tensor parallel: the other ranks leave follow() and exit


def engine_process_env() -> dict[str, str]:
    """The engine process's environment: this one, with the folder this process imported `stratus_workers` from
    first on PYTHONPATH, so that the engine runs the same copy of the code as the frontend even where the frontend
    found it through a path of its own (a script's `sys.path` edit, a benchmark's tree)."""
    import stratus_workers

    root = os.path.dirname(os.path.dirname(os.path.abspath(stratus_workers.__file__)))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != root]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, *paths]))


class ProcessTransport(Transport):
    """The core in an engine process of its own (serve/worker.py), over a socket pair."""

    kind = "process"
    delta_contexts = True

    def __init__(
        self,
        settings: EngineSettings,
        load: Callable[[], Any],
        *,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
        hang_seconds: float = HANG_SECONDS,
    ) -> None:
        self.settings = settings
        self.load = load
        self.step_timeout = step_timeout
        self.hang_seconds = hang_seconds
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deliver: Deliver | None = None
        self._dead: Dead | None = None
        self._ready: asyncio.Future[tuple[EngineInfo, Any]] | None = None
        self._heard = 0.0  # when the engine last sent anything
        self._busy = 0.0  # seconds its loop had been inside one step, as of the last beat
        self._closed = False
        self._writing = False
        self._corked = False  # an `_uncork` is scheduled for this turn of the event loop
        self._stopping = False
        self.failure: str | None = None

    async def start(self, deliver: Deliver, dead: Dead) -> tuple[EngineInfo, Any]:
        loop = self._loop = asyncio.get_running_loop()
        self._deliver, self._dead = deliver, dead
        ours, theirs = socket.socketpair()
        with theirs:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - a fork and exec, not a wait
                [sys.executable, "-m", "stratus_workers.serve.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=engine_process_env(),
            )
        self.pid = self.proc.pid
        self.channel = Channel(ours)
        self._ready = loop.create_future()
        self._heard = time.monotonic()
        loop.add_reader(self.channel.fileno(), self._readable)
        self.send((self.settings, self.load))
        while True:  # loading can take minutes; a process that dies meanwhile ends the wait
            try:
                return await asyncio.wait_for(asyncio.shield(self._ready), 0.5)
            except TimeoutError:
                code = self.proc.poll()
                if code is not None and not self._ready.done():
                    self._close_reader()
                    raise EngineFailed(f"the engine process exited with status {code} before it was ready") from None

    def _readable(self) -> None:
        assert self.channel is not None
        try:
            messages = self.channel.receive()
        except ChannelClosed:
            self._gone("the engine process closed its channel")
            return
        self._heard = time.monotonic()
        outputs: list[Any] = []
        for message in messages:
            kind = message[0]
            if kind == "beat":
                self._busy = message[2]
            elif kind == "ready":
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result((message[1], message[2]))
            elif kind == "failed":
                self.failure = f"the model engine stopped after an internal error ({message[1]})"
                self._gone(self.failure, message)
                return
            else:
                outputs.append(message)
        if outputs and self._deliver is not None:
            self._deliver(outputs)

    def _gone(self, reason: str, failed: tuple[Any, ...] | None = None) -> None:
        self._closed = True
        self._close_reader()
        if self._ready is not None and not self._ready.done():
            if failed is not None and failed[2] in ("ModelLoadError", "ValueError", "UnsupportedModelError"):
                from stratus_workers.models.files import ModelLoadError

                message = str(failed[1]).split(": ", 1)[-1]
                self._ready.set_exception(
                    ModelLoadError(message) if failed[2] == "ModelLoadError" else ValueError(message)
                )
            else:
                self._ready.set_exception(EngineFailed(reason))
            return
        if self._stopping:
            return
        if self.failure is None and self.proc is not None:
            # A process that died closed its channel on the way out; its status follows at once.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.2)
            self.failure = self._exit_reason() or reason
        if self._dead is not None and self.failure is not None:
            self._dead(self.failure)

    def _exit_reason(self) -> str | None:
        code = self.proc.poll() if self.proc is not None else None
        if code is None:
            return None
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return f"the model engine process {how}"

    def _close_reader(self) -> None:
        if self._loop is not None and self.channel is not None and not self.channel.sock._closed:  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.channel.fileno())
            if self._writing:
                with contextlib.suppress(Exception):
                    self._loop.remove_writer(self.channel.fileno())
                self._writing = False

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue `message`; what this turn of the event loop queues goes out in one write at the turn's end.

        A step's replies wake every session at once, and each sends its next call in the same turn: corked, the
        engine reads them all in one `receive` instead of waking for each (and the frontend makes one system call).
        """
        if self.channel is None or self._closed:
            raise EngineStopped("the engine process is not running")
        self.channel.queue(message)
        if not self._corked:
            self._corked = True
            assert self._loop is not None
            self._loop.call_soon(self._uncork)

    def _uncork(self) -> None:
        """The end of the turn that queued messages: write what the socket takes, the rest when it is writable."""
        self._corked = False
        if self.channel is None or self._closed:
            return
        try:
            drained = self.channel.flush()
        except ChannelClosed:
            self._gone("the engine process closed its channel")
            return
        if not drained and not self._writing and self._loop is not None:
            self._writing = True
            self._loop.add_writer(self.channel.fileno(), self._writable)

    def _writable(self) -> None:
        assert self.channel is not None and self._loop is not None
        try:
            drained = self.channel.flush()
        except ChannelClosed:
            self._gone("the engine process closed its channel")
            return
        if drained:
            self._loop.remove_writer(self.channel.fileno())
            self._writing = False

    def check(self) -> str | None:
        if self.failure is not None:
            return self.failure
        proc = self.proc
        if proc is None or self._stopping:
            return None
        exited = self._exit_reason()
        if exited is not None:
            self.failure = exited
        elif self._closed:
            self.failure = "the model engine process closed its channel"
        else:
            silent = time.monotonic() - self._heard
            if silent > self.hang_seconds:
                self.failure = f"the model engine process stopped responding (no heartbeat for {silent:.1f} s)"
            elif self._busy + silent > self.step_timeout:
                self.failure = f"the model engine has been inside one step for over {self.step_timeout:.0f} s"
        if self.failure is not None:
            self.halt()
        return self.failure

    def halt(self) -> None:
        self._close_reader()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()  # frozen or stuck: it must not hold the GPU for a restart

    async def stop(self, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        alive = proc.poll() is None and not self._closed
        self._stopping = True
        if alive:
            with contextlib.suppress(EngineStopped):
                self.send(("stop",))
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, proc.wait, timeout)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop within %.0f s; killing it", timeout)
            proc.kill()
            await loop.run_in_executor(None, proc.wait)
        self._close_reader()
        if self.channel is not None:
            self.channel.close()


class _Stream:
    """One request in flight, as the frontend tracks it."""

    __slots__ = (
        "admitted", "anchor", "arrived", "deadline", "finish", "first_seen", "pacing", "params", "pending",
        "pending_logprobs", "pending_top", "prompt_tokens", "received", "sent_at", "seq_id", "text", "waiter",
    )  # fmt: skip

    def __init__(
        self, seq_id: int, params: Sampling, prompt_tokens: int, deadline: float | None, text: TextAssembler
    ) -> None:
        self.seq_id = seq_id
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.deadline = deadline
        self.arrived = time.monotonic()
        self.text = text
        self.pending: list[int] = []
        self.pending_logprobs: list[float] = []
        self.pending_top: list[Alternatives] = []
        self.finish: Finished | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.received = 0
        self.admitted = 0.0
        self.first_seen = 0.0
        self.sent_at = 0.0  # when its last event went out (0: none yet)
        self.anchor: int | None = None  # the prompt anchor its prompt went under as a delta (serve/contexts.py)
        self.pacing = False  # waiting out its pace (AsyncEngine.message_rate): only its end wakes it early

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class AsyncEngine:
    """A ServingEngine over an engine core run by `transport`; every method runs in the event loop's thread."""

    def __init__(
        self,
        transport: Transport,
        *,
        max_batch_size: int,
        max_queue: int = 256,
        on_stats: Callable[[EngineStats], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
        stall_timeout: float = DEFAULT_STEP_TIMEOUT,
        context_mirrors: int = 0,
        message_rate: float = MESSAGE_RATE,
    ) -> None:
        self.transport = transport
        self.stall_timeout = stall_timeout
        self._progress_at = 0.0  # when the core last stepped, or when nothing was owed
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.on_stats = on_stats
        self.on_failure = on_failure
        self.info = EngineInfo("", "", "", "", 0, "", 0, 0)
        self.tokenizer: Any = None
        self.failure: str | None = None
        self.stats = EngineStats()
        self.verify_together = True  # False: one forward pass per Verify call (the way it was; benchmarks)
        # Draft and Verify contexts go to the core as deltas where the transport gains by it (serve/contexts.py);
        # `context_mirrors` sessions' contexts are remembered (0: CONTEXTS_PER_SESSION per speculative session).
        self.delta_contexts = transport.delta_contexts
        sessions = transport.settings.max_sessions
        self.contexts = ContextSender(context_mirrors or max(MIN_CONTEXTS, CONTEXTS_PER_SESSION * sessions))
        self.prompts = ContextSender(PROMPT_ANCHORS)  # requests' prompts as deltas, by anchor (the same rules)
        # Stream messages per second, all streams together: with n streams running, one stream's next event
        # goes out at least n / message_rate seconds after its last (its first, and its end, at once). One
        # Python process sends every stream's text: at 64 streams and a step a millisecond, a message per
        # token each is 64,000 messages a second, which it cannot send, and a backlog it works through
        # delays every first token and finish. 0: every step's tokens go out as soon as they arrive.
        self.message_rate = message_rate
        self._streams: dict[int, _Stream] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._stopping = False
        self._started = False
        self._watch: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.contexts.clear()  # a new core remembers no session's context, nor any prompt
        self.prompts.clear()
        self.info, self.tokenizer = await self.transport.start(self._deliver, self._fail)
        self._started = True
        self._watch = asyncio.ensure_future(self._supervise())

    async def stop(self, timeout: float = 30.0) -> None:
        """End every request (cancelled: the server is shutting down) and stop the core."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        if self._started:
            await self.transport.stop(timeout)
        self._end_all("cancelled", "server shutting down", EngineStopped("the server is shutting down"))

    async def _supervise(self) -> None:
        self._progress_at = time.monotonic()
        while self.failure is None:
            await asyncio.sleep(WATCH_SECONDS)
            reason = self.transport.check() or self._stalled()
            if reason is not None:
                self._fail(reason)
                self.transport.halt()

    def _stalled(self) -> str | None:
        """Why the core counts as stuck: work is owed (a request unfinished, a call unanswered) and no step
        output has arrived for `stall_timeout` seconds. A process that still beats, or a thread that is
        alive, can be stuck anywhere (inside a step or outside it, in a lost wake-up or a scheduler that
        lost track of its queue); only its steps say that it advances."""
        now = time.monotonic()
        owed = sum(1 for st in self._streams.values() if st.finish is None)
        owed += sum(1 for future in self._calls.values() if not future.done())
        if not owed:
            self._progress_at = now
            return None
        quiet = now - self._progress_at
        if quiet <= self.stall_timeout:
            return None
        return f"the model engine is not advancing: no step in {quiet:.1f} s with {owed} requests or calls in flight"

    @property
    def pid(self) -> int:
        """The engine process's id (0 when the core runs in a thread of this process)."""
        return self.transport.pid

    @property
    def mode(self) -> str:
        return self.transport.kind

    @property
    def active(self) -> int:
        return self.stats.active

    @property
    def waiting(self) -> int:
        return self.stats.waiting

    @property
    def steps(self) -> int:
        return self.stats.steps

    @property
    def max_len(self) -> int:
        return self.info.max_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    def _check_running(self) -> None:
        if self.failure is not None:
            raise EngineFailed(self.failure)
        if self._stopping or not self._started:
            raise EngineStopped("the server is shutting down" if self._stopping else "the engine has not started")

    # -- requests -----------------------------------------------------------------------------

    def _submit(self, prompt: Sequence[int], params: Sampling, deadline: float | None) -> _Stream:
        self._check_running()
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) >= self.info.max_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; this server's context holds {self.info.max_len - 1}"
            )
        if params.logit_bias and params.logit_bias[-1][0] >= self.info.vocab_size:
            raise ValueError(f"logit_bias names token ids outside this model's vocabulary of {self.info.vocab_size}")
        waiting = len(self._streams) - self.max_batch_size
        if waiting >= self.max_queue:
            # Requests whose time ran out while they waited hold no place (the engine ends them this step).
            now = time.monotonic()
            waiting -= sum(1 for st in self._streams.values() if st.deadline is not None and now > st.deadline)
            if waiting >= self.max_queue:
                raise EngineOverloaded(f"{waiting} requests are already waiting; try again later")
        text = TextAssembler(self.tokenizer, params.stop)
        stream = _Stream(next(self._ids), params, len(prompt), deadline, text)
        self._streams[stream.seq_id] = stream
        ids = list(prompt)
        if not self.delta_contexts:
            self.transport.send(("add", stream.seq_id, ids, params, deadline))
            return stream
        # A long prompt as a delta on the last one sent under its anchor (serve/contexts.py).
        messages, anchor = prompt_messages(self.prompts, stream.seq_id, ids, params, deadline)
        try:
            for message in messages:
                self.transport.send(message)
        except BaseException:
            if anchor is not None:
                self.prompts.forget(anchor)  # always safe: the next prompt under it goes whole
            raise
        stream.anchor = anchor
        return stream

    async def stream(
        self, prompt: Sequence[int], params: Sampling, deadline: float | None = None
    ) -> AsyncIterator[Event]:
        """Events of one request; leaving the iterator early cancels it."""
        st = self._submit(prompt, params, deadline)
        done = False
        loop = asyncio.get_running_loop()
        try:
            while True:
                if st.finish is None and st.sent_at and self.message_rate > 0:
                    delay = st.sent_at + len(self._streams) / self.message_rate - time.monotonic()
                    if delay > 0:  # tokens pile up meanwhile and go out as one event; the end comes at once
                        st.pacing = True
                        st.waiter = loop.create_future()
                        timer = loop.call_later(delay, st.wake)
                        await st.waiter
                        timer.cancel()
                        st.waiter = None
                        st.pacing = False
                while not st.pending and st.finish is None:
                    st.waiter = loop.create_future()
                    await st.waiter
                    st.waiter = None
                if st.pending:
                    event = self._text_event(st)
                    if event is not None:
                        st.sent_at = time.monotonic()
                        yield event
                    if st.text.stopped:  # a stop sequence: the answer ends here, the engine need not go on
                        yield self._finish_event(st, "stop", st.received)
                        return
                    continue
                finish = st.finish
                assert finish is not None
                done = True
                rest = st.text.flush()
                if rest and finish.reason in ("stop", "length"):
                    yield TokenEvent(rest, ())
                f = finish
                yield self._finish_event(st, f.reason, f.completion_tokens, f.error, f.cached_tokens)
                return
        finally:
            self._streams.pop(st.seq_id, None)
            if not done and self.failure is None and not self._stopping:
                with contextlib.suppress(EngineStopped):
                    self.transport.send(("abort", st.seq_id))

    def _text_event(self, st: _Stream) -> TokenEvent | None:
        tokens, st.pending = st.pending, []
        logprobs, st.pending_logprobs = st.pending_logprobs, []
        tops, st.pending_top = st.pending_top, []
        text = st.text
        if text.stop:  # token by token: only that says which token completed a stop sequence
            parts = []
            used = 0
            for token in tokens:
                parts.append(text.add(token))
                used += 1
                if text.stopped:
                    break
            tokens = tokens[:used]
            delta = "".join(parts)
        else:
            delta = text.extend(tokens)
        st.received += len(tokens)
        lps: tuple[TokenLogprob, ...] = ()
        if st.params.logprobs:
            lps = tuple(
                TokenLogprob(t, self._token_text(t), lp, self._alternatives(tops[n]) if n < len(tops) else ())
                for n, (t, lp) in enumerate(zip(tokens, logprobs, strict=False))
            )
        if not delta and not tokens:
            return None
        return TokenEvent(delta, tuple(tokens), lps)

    def _token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))

    def _alternatives(self, pairs: Alternatives) -> tuple[TokenLogprob, ...]:
        return tuple(TokenLogprob(t, self._token_text(t), lp) for t, lp in pairs)

    def _finish_event(
        self, st: _Stream, reason: FinishReason, completion: int, error: str = "", cached: int = 0
    ) -> FinishEvent:
        now = time.monotonic()
        admitted = st.admitted or (st.finish.admitted if st.finish is not None and st.finish.admitted else now)
        return FinishEvent(
            reason=reason,
            prompt_tokens=st.prompt_tokens,
            completion_tokens=completion,
            queue_ms=(admitted - st.arrived) * 1e3,
            ttft_ms=((st.first_seen or now) - st.arrived) * 1e3,
            total_ms=(now - st.arrived) * 1e3,
            error=error,
            cached_tokens=cached,
        )

    # -- speculative calls --------------------------------------------------------------------

    async def _call(self, op: str, *args: Any) -> Any:
        return await self._registered(lambda call_id: self.transport.send(("call", call_id, op, args)))

    async def _registered(self, send: Callable[[int], None]) -> Any:
        """A call registered under a new id, sent by `send` (given the id), and its result awaited (a step's output
        resolves it); the id is freed whatever happens."""
        self._check_running()
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            send(call_id)
            return await future
        finally:
            self._calls.pop(call_id, None)

    async def score(self, prompt: Sequence[int], continuation: Sequence[int]) -> tuple[float, ...]:
        """Log-probability of each continuation token after `prompt` (one forward pass)."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        result: tuple[float, ...] = await self._call("score", list(prompt), list(continuation))
        return result

    async def prompt_logprobs(self, prompt: Sequence[int], top: int = 0) -> tuple[TokenLogprob, ...]:
        """Each prompt token with its log-probability after the ones before it (Score's forward pass); the
        first token, which nothing predicts, gets 0. With `top`, the most likely tokens at each position."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        logprobs, alternatives = await self._call("score_with_alternatives", list(prompt[:1]), list(prompt[1:]), top)
        first = TokenLogprob(prompt[0], self._token_text(prompt[0]), 0.0)
        tops = alternatives or [()] * len(logprobs)
        rest = (
            TokenLogprob(token, self._token_text(token), lp, self._alternatives(top))
            for token, lp, top in zip(prompt[1:], logprobs, tops, strict=True)
        )
        return (first, *rest)

    async def _session_call(self, op: str, sid: str, context: Sequence[int], rest: tuple[Any, ...], end: bool) -> Any:
        """A call on session `sid` with its context: ("call", id, op, (sid, context, *rest, end)), or with the
        context as a delta, ("delta", id, op, (sid, tail, *rest, end), keep): the engine keeps `keep` tokens of
        the session's last context and appends the tail, and the args carry the call's Sampling as its values
        (serve/contexts.py). Sessions evicted from the sender's memory go first, each as ("drop", sid)."""
        self._check_running()
        ids = list(context)  # ours: the sender keeps it (first: a context that cannot be listed registers no call)

        def send(call_id: int) -> None:
            if not self.delta_contexts:
                self.transport.send(("call", call_id, op, (sid, ids, *rest, end)))
                return
            keep, tail, evicted = self.contexts.encode(sid, ids, end)
            try:
                for old in evicted:
                    self.transport.send(("drop", old))
                self.transport.send(("delta", call_id, op, pack_call(op, (sid, tail, *rest, end)), keep))
            except BaseException:
                self.contexts.forget(sid)  # always safe: the next call keeps nothing
                raise

        try:
            return await self._registered(send)
        except ValueError:
            raise  # the caller's input, refused: both sides' memories moved alike, the next delta stands
        except BaseException:
            # Anything else (a context the engine lost, an engine that stopped): the next call on this session
            # sends its whole context, always safe, and it mends a memory that a bug left behind.
            self.contexts.forget(sid)
            raise

    async def draft(
        self, sid: str, context: Sequence[int], max_tokens: int, sampling: Sampling, top_k: int = 32, end: bool = False
    ) -> DraftResult:
        result: DraftResult = await self._session_call("draft", sid, context, (max_tokens, sampling, top_k), end)
        return result

    async def verify(
        self,
        sid: str,
        context: Sequence[int],
        draft: Sequence[int],
        dists: Sequence[SparseDist],
        sampling: Sampling,
        end: bool = False,
    ) -> VerifyResult:
        # Batched with the step's other Verify calls unless `verify_together` is off (benchmarks compare).
        op = "verify" if self.verify_together else "verify_alone"
        result: VerifyResult = await self._session_call(op, sid, context, (list(draft), list(dists), sampling), end)
        return result

    async def end_session(self, sid: str) -> None:
        self.contexts.forget(sid)  # the engine forgets it on reading the call
        await self._call("end", sid)

    # -- outputs ------------------------------------------------------------------------------

    def _deliver(self, messages: list[Any]) -> None:
        """Outputs of the core, in order (several steps when this loop fell behind)."""
        streams = self._streams
        touched: list[_Stream] = []
        stats: EngineStats | None = None
        for message in messages:
            if message[0] not in ("step", "stopped", "part"):
                continue
            out = StepOutput.unpack(message[1])
            now = self._progress_at = time.monotonic()
            logprobs, top = out.logprobs, out.top
            for i, (seq_id, token) in enumerate(zip(out.seq_ids, out.tokens, strict=True)):
                st = streams.get(seq_id)
                if st is None:
                    continue  # finished or cancelled here already
                if not st.first_seen:
                    st.first_seen = now
                st.pending.append(token)
                if logprobs is not None:
                    st.pending_logprobs.append(logprobs[i])
                    st.pending_top.append(top[i] if top is not None else ())
                touched.append(st)
            for finished in out.finished:
                st = streams.get(finished.seq_id)
                if st is not None:
                    st.finish = finished
                    st.admitted = st.admitted or finished.admitted
                    touched.append(st)
                    if finished.reason == "error" and st.anchor is not None:
                        self.prompts.forget(st.anchor)  # (a mirror that lost it: the next prompt goes whole)
            for call_id, kind, value in out.results:
                future = self._calls.get(call_id)
                if future is None or future.done():
                    continue
                if kind:
                    future.set_exception(CALL_ERRORS.get(kind, RuntimeError)(value))
                else:
                    future.set_result(value)
            if message[0] != "part":  # (a part of a step carries no stats: the step's output does)
                stats = out.stats
        for st in touched:
            if st.finish is not None or not st.pacing:
                st.wake()
        if stats is not None:
            self.stats = stats
            if self.on_stats is not None:
                self.on_stats(stats)

    def _fail(self, reason: str) -> None:
        """The core died: refuse new work, end every request and call in flight, and say so."""
        if self.failure is not None or self._stopping:
            return
        self.failure = reason
        self.contexts.clear()
        self.prompts.clear()
        log.critical("the model engine died; this server stops serving", extra={"reason": reason})
        if self.on_failure is not None:  # first: health should turn before callers hear of it
            try:
                self.on_failure(reason)
            except Exception:
                log.exception("the engine's failure callback failed")
        self._end_all("unavailable", reason, EngineFailed(reason))

    def _end_all(self, reason: FinishReason, error: str, exc: Exception) -> None:
        for st in list(self._streams.values()):
            if st.finish is None:
                st.finish = Finished(st.seq_id, reason, st.prompt_tokens, st.received, 0, 0.0, 0.0, error)
            st.wake()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(exc)


def build_engine(
    model: Any,
    tokenizer: Any,
    *,
    max_batch_size: int = 8,
    max_len: int = 4096,
    max_sessions: int = 4,
    max_queue: int = 256,
    prefill_chunk: int = 512,
    prefix_cache_tokens: int = -1,
    threads: int = 0,
    on_stats: Callable[[EngineStats], None] | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> AsyncEngine:
    """An engine over a model object of this process, its core in a thread (tests; `await engine.start()`).

    `model` is a torch model or a GGUF artifact's `GGUFModel` (llama.cpp's runner, on `threads` threads).
    """
    from stratus_workers.models.loader import LoadedModel
    from stratus_workers.serve.loop import EngineSettings

    if hasattr(model, "parameters"):
        param = next(model.parameters())
        dtype, device = param.dtype, param.device
    else:  # a GGUFModel: llama.cpp on the CPU, float32 activations
        import torch

        dtype, device = torch.float32, torch.device("cpu")
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="model", source="memory", dtype=dtype, device=device)
    settings = EngineSettings(
        max_batch_size=max_batch_size,
        max_tokens=max_len,
        max_sessions=max_sessions,
        prefill_chunk=prefill_chunk,
        prefix_cache_tokens=prefix_cache_tokens,
        threads=threads,
    )
    return AsyncEngine(
        ThreadTransport(settings, loaded=loaded),
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        on_stats=on_stats,
        on_failure=on_failure,
    )
