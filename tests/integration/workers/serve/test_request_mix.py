"""Request-mix fuzzer: random interleavings of requests against a live model server, invariants after every step.

One real server process (`python -m stratus_workers.serve`, the tiny random model, real gRPC on loopback)
takes waves of concurrent requests that hypothesis draws: prompt lengths up to and past the server's limit
(past the KV cache's first 256 positions, where item 1 of issue 12 hid), output lengths, greedy and sampled
decoding, penalties, logit bias, stop sequences, streaming or not, log-probabilities with alternatives, echo,
staggered starts, client cancellations, deadlines from tens of milliseconds to generous. After every wave:

- every request ended within its deadline (+ a margin) with tokens or a clean error: INVALID_ARGUMENT
  exactly when its prompt was over the limit, CANCELLED only when the client cancelled, DEADLINE_EXCEEDED
  only for a short deadline, RESOURCE_EXHAUSTED only when more requests were in flight than the server
  holds; a request with a generous deadline is never left hanging;
- greedy answers equal an unbatched reference run of the same model (one token at a time, penalties and bias
  applied as OpenAI defines them); echo returns every prompt token;
- the server's batch and queue drain to empty (no row leaks);
- gRPC health (and /readyz) say SERVING exactly when a new request gets served.

`make test` runs a bounded, derandomized version (profile `fuzz-ci`); `make fuzz` a long random one (profile
`fuzz-soak`, STRATUS_FUZZ_EXAMPLES waves sequences) and writes its figures to docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from transformers import AutoModelForCausalLM, AutoTokenizer

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.ports import free_port
from stratus_workers.protocol.requests import render_prompt

pytestmark = pytest.mark.integration

MAX_PROMPT = 300  # past the KV cache's first allocation of 256 positions
MAX_NEW = 40
BATCH = 4
QUEUE = 3
GENEROUS = 30.0  # a deadline no healthy server misses for MAX_NEW tokens of the tiny model
MARGIN = 3.0  # how long past its deadline a request may take to end
PROBE_TIMEOUT = 20.0

settings.register_profile(
    "fuzz-ci",
    max_examples=10,
    stateful_step_count=6,
    derandomize=True,
    deadline=None,
    # Shrinking replays steps against the live server for minutes; the failing step's spec says enough.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
settings.register_profile("fuzz-ci-short", settings.get_profile("fuzz-ci"), max_examples=4)
settings.register_profile(
    "fuzz-soak",
    max_examples=int(os.environ.get("STRATUS_FUZZ_EXAMPLES", "200")),
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

COMMON_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part"
)
WORDS = tuple(COMMON_WORDS.split())


@dataclass(frozen=True)
class Spec:
    """One request of a wave."""

    words: int
    offset: int
    chat: bool
    new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: str
    stream: bool
    logprobs: bool
    deadline: float
    cancel_after: float | None
    delay: float
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0
    echo: bool = False

    def prompt(self) -> str:
        return " ".join(WORDS[(self.offset + 7 * i) % len(WORDS)] for i in range(self.words))

    def request(self) -> pb.GenerateRequest:
        request = pb.GenerateRequest(
            max_new_tokens=self.new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            return_logprobs=self.logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=dict(self.logit_bias),
            top_logprobs=self.top_logprobs if self.logprobs else 0,
            echo=self.echo,
        )
        if self.chat:
            request.chat.messages.add(role="user", content=self.prompt())
        else:
            request.prompt = self.prompt()
        if self.stop:
            request.stop.append(self.stop)
        if self.seed is not None:
            request.seed = self.seed
        return request


specs = st.builds(
    Spec,
    words=st.one_of(st.integers(1, 40), st.integers(200, MAX_PROMPT + 20)),
    offset=st.integers(0, len(WORDS) - 1),
    chat=st.booleans(),
    new_tokens=st.integers(1, MAX_NEW),
    temperature=st.sampled_from([0.0, 0.0, 0.7, 1.5]),
    top_p=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.one_of(st.none(), st.integers(0, 2**32)),
    stop=st.sampled_from(["", "", "", " the", "e"]),
    stream=st.booleans(),
    logprobs=st.booleans(),
    deadline=st.one_of(st.just(GENEROUS), st.floats(0.02, 3.0)),
    cancel_after=st.one_of(st.none(), st.none(), st.floats(0.0, 1.0)),
    delay=st.floats(0.0, 0.3),
    presence_penalty=st.sampled_from([0.0, 0.0, 0.0, 0.5, 2.0, -1.0]),
    frequency_penalty=st.sampled_from([0.0, 0.0, 0.0, 0.3, -0.5]),
    logit_bias=st.one_of(
        st.just(()),
        st.just(()),
        st.lists(st.tuples(st.integers(0, 49151), st.sampled_from([-100.0, -5.0, 5.0, 100.0])), max_size=3).map(
            lambda pairs: tuple(sorted(dict(pairs).items()))
        ),
    ),
    top_logprobs=st.sampled_from([0, 0, 1, 5]),
    echo=st.sampled_from([False, False, True]),
)


@dataclass
class Outcome:
    spec: Spec
    code: grpc.StatusCode
    elapsed: float
    text: str = ""
    finish: int = 0
    details: str = ""
    echoed: int = 0  # prompt tokens that came back with echo


@dataclass
class Figures:
    """What a run did, for the report (docs/reliability.md)."""

    requests: int = 0
    waves: int = 0
    checks: int = 0
    failures: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    greedy_compared: int = 0
    seconds: float = 0.0
    first_failure: str = ""


FIGURES = Figures()


class Server:
    """The live server process and what the test knows of it."""

    def __init__(self, model_dir: Path, env: dict[str, str] | None = None) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "stratus_workers.serve", "--model", str(model_dir), "--tier", "cloud",
                "--port", str(self.grpc_port), "--http-port", str(self.http_port), "--threads", "1",
                "--max-prompt-tokens", str(MAX_PROMPT), "--max-new-tokens", str(MAX_NEW),
                "--max-batch-size", str(BATCH), "--max-queue", str(QUEUE), "--log-format", "text",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )  # fmt: skip
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.eos = sorted(
            {int(self.model.generation_config.eos_token_id), int(self.model.config.eos_token_id)}
            | ({int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set())
        )
        self._references: dict[tuple[Any, ...], list[int]] = {}

    def prompt_tokens(self, spec: Spec) -> list[int]:
        return render_prompt(self.tokenizer, spec.request())

    def reference(self, spec: Spec) -> str:
        """The greedy answer of an unbatched run of the same model, one token at a time with its own cache,
        penalties and logit bias applied as OpenAI defines them (cut at EOS and at the stop sequence)."""
        prompt = tuple(self.prompt_tokens(spec))
        key = (prompt, spec.new_tokens, spec.presence_penalty, spec.frequency_penalty, spec.logit_bias)
        if key not in self._references:
            ids: list[int] = []
            counts: dict[int, int] = {}
            with torch.inference_mode():
                out = self.model(torch.tensor([prompt]), use_cache=True)
                for _ in range(spec.new_tokens):
                    logits = out.logits[0, -1].clone()
                    for token, bias in spec.logit_bias:
                        logits[token] += bias
                    for token, count in counts.items():
                        logits[token] -= count * spec.frequency_penalty + spec.presence_penalty
                    token = int(torch.argmax(logits))
                    if token in self.eos:
                        break
                    ids.append(token)
                    counts[token] = counts.get(token, 0) + 1
                    out = self.model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            self._references[key] = ids
        text = settled_text(self.tokenizer, self._references[key])
        if spec.stop and spec.stop in text:
            text = text[: text.index(spec.stop)]
        return text

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            if asyncio.run(health(self.address)) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
        raise TimeoutError("the server did not come up in 120 s")

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=5) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


def settled_text(tokenizer: Any, ids: list[int]) -> str:
    """The text of `ids` as the server gives it: the longest decode not ending inside a character (a trailing
    byte token that never completes a character is not text; protocol/text.py)."""
    for end in range(len(ids), 0, -1):
        text = str(tokenizer.decode(ids[:end], skip_special_tokens=True))
        if not text.endswith("\ufffd"):
            return text
    return ""


async def health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return health_pb2.HealthCheckResponse.UNKNOWN
        return int(reply.status)


async def one(stub: pb_grpc.InferenceStub, spec: Spec) -> Outcome:
    await asyncio.sleep(spec.delay)
    started = time.monotonic()
    request = spec.request()
    call: Any = (
        stub.GenerateStream(request, timeout=spec.deadline)
        if spec.stream
        else stub.Generate(request, timeout=spec.deadline)
    )
    if spec.cancel_after is not None:
        asyncio.get_running_loop().call_later(spec.cancel_after, call.cancel)
    try:
        if spec.stream:
            parts, finish, echoed = [], 0, 0
            async for chunk in call:
                parts.append(chunk.text)
                finish = chunk.finish_reason or finish
                echoed += len(chunk.prompt_logprobs)
            text = "".join(parts)
        else:
            answer = await call
            text, finish, echoed = answer.text, answer.finish_reason, len(answer.prompt_logprobs)
        return Outcome(spec, grpc.StatusCode.OK, time.monotonic() - started, text, finish, echoed=echoed)
    except grpc.aio.AioRpcError as exc:
        return Outcome(spec, exc.code(), time.monotonic() - started, details=exc.details() or "")
    except asyncio.CancelledError:  # our own cancel(), seen by the awaiting call
        return Outcome(spec, grpc.StatusCode.CANCELLED, time.monotonic() - started, details="cancelled by us")


async def wave(address: str, batch: list[Spec]) -> list[Outcome]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        return list(await asyncio.gather(*(one(stub, s) for s in batch)))


async def probe(address: str) -> bool:
    """Whether a new, small request gets served."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await pb_grpc.InferenceStub(channel).Generate(
                pb.GenerateRequest(prompt="probe", max_new_tokens=1), timeout=PROBE_TIMEOUT
            )
        except grpc.aio.AioRpcError:
            return False
        return True


def check(condition: bool, message: str) -> None:
    FIGURES.checks += 1
    if not condition:
        FIGURES.failures += 1
        FIGURES.first_failure = FIGURES.first_failure or message
        raise AssertionError(message)


def judge(server: Server, outcome: Outcome, wave_size: int) -> None:
    """The per-request invariants."""
    spec, code = outcome.spec, outcome.code
    FIGURES.codes[code.name] = FIGURES.codes.get(code.name, 0) + 1
    where = f"{spec} (in a wave of {wave_size}) -> {code.name} after {outcome.elapsed:.2f} s: {outcome.details}"
    check(outcome.elapsed <= spec.deadline + MARGIN, f"ended past its deadline: {where}")
    over = len(server.prompt_tokens(spec)) > MAX_PROMPT
    if over:  # refused, unless the client gave up first
        check(code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED),
              f"a prompt over the limit was not refused: {where}")  # fmt: skip
    else:
        check(code != grpc.StatusCode.INVALID_ARGUMENT, f"refused though within the limits: {where}")
    if code == grpc.StatusCode.CANCELLED:
        check(spec.cancel_after is not None, f"cancelled without being cancelled: {where}")
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        check(spec.deadline < GENEROUS, f"a generous deadline was missed (a hang): {where}")
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Only when requests had to queue. Not "only past batch + queue": a client's cancel reaches the server
        # a moment later, so the server may still count a request the client already gave up.
        check(wave_size > BATCH, f"refused as overloaded while every request had a row: {where}")
    else:
        check(code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), f"not a clean outcome: {where}")
    if code == grpc.StatusCode.OK and spec.echo:
        check(outcome.echoed == len(server.prompt_tokens(spec)), f"echo did not return the prompt's tokens: {where}")
    if code == grpc.StatusCode.OK and spec.temperature == 0.0:  # greedy (top_p 0 means none over gRPC)
        FIGURES.greedy_compared += 1
        check(outcome.text == server.reference(spec), f"greedy answer differs from the unbatched run: {where}")


def live_server(model_dir: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    live = Server(model_dir, env)
    try:
        live.wait_ready()
        yield live
    finally:
        live.proc.kill()
        live.proc.wait(10)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[Server]:
    yield from live_server(tiny_model_dir)


@pytest.fixture(scope="module")
def held_server(tiny_model_dir: Path) -> Iterator[Server]:
    """A server whose engine holds arrivals back to prefill them in groups (docs/serving.md, "Prefill grouping")."""
    yield from live_server(tiny_model_dir, {"STRATUS_PREFILL_HOLD": "2", "STRATUS_PREFILL_GROUP": "3"})


def test_request_mix(server: Server) -> None:
    run_request_mix(server, os.environ.get("STRATUS_FUZZ_PROFILE", "fuzz-ci"))


def test_request_mix_with_prefill_grouping(held_server: Server) -> None:
    # The same invariants while arrivals wait for company: held requests are still cancelled, time out, drain and
    # give the unbatched answers.
    run_request_mix(held_server, os.environ.get("STRATUS_FUZZ_PROFILE", "fuzz-ci-short"))


def run_request_mix(server: Server, profile: str) -> None:
    started = time.monotonic()

    class RequestMix(RuleBasedStateMachine):
        @rule(batch=st.lists(specs, min_size=1, max_size=8))
        def interleave(self, batch: list[Spec]) -> None:
            FIGURES.waves += 1
            FIGURES.requests += len(batch)
            for outcome in asyncio.run(wave(server.address, batch)):
                judge(server, outcome, len(batch))
            for _ in range(100):  # rows free at the engine's next step; cancellations reach it in flight
                if server.metric("stratus_server_active_sequences") == 0 and (
                    server.metric("stratus_server_waiting_requests") == 0
                ):
                    break
                time.sleep(0.05)
            check(server.metric("stratus_server_active_sequences") == 0, "rows left in the batch after a wave")
            check(server.metric("stratus_server_waiting_requests") == 0, "requests left waiting after a wave")

        @invariant()
        def health_tells_the_truth(self) -> None:
            serving = asyncio.run(health(server.address)) == health_pb2.HealthCheckResponse.SERVING
            served = asyncio.run(probe(server.address))
            check(serving == served, f"health says {'SERVING' if serving else 'not serving'}, yet a new request "
                  f"was {'served' if served else 'not served'}")  # fmt: skip
            check(server.ready() == served, "/readyz disagrees with whether a request gets served")
            check(server.proc.poll() is None, "the server process exited")

    try:
        run_state_machine_as_test(RequestMix, settings=settings.get_profile(profile))
    except BaseException as exc:
        # Replaying a failure against a server the first run already broke goes differently, which
        # hypothesis reports as flaky data generation: name the invariant that failed first instead.
        if FIGURES.first_failure:
            raise AssertionError(f"invariant failed: {FIGURES.first_failure}") from exc
        raise
    finally:
        FIGURES.seconds = time.monotonic() - started
        summary = json.dumps(FIGURES.__dict__ | {"profile": profile})
        print(f"request-mix fuzzer: {summary}")
        report = os.environ.get("STRATUS_FUZZ_REPORT")
        if report:
            Path(report).write_text(summary)


def test_prompt_counting_matches_the_server(server: Server) -> None:
    """The fuzzer's over-the-limit rule rests on counting tokens as the server does."""
    spec = Spec(MAX_PROMPT + 5, 0, False, 1, 0.0, 1.0, None, "", False, False, GENEROUS, None, 0.0)
    assert len(server.prompt_tokens(spec)) > MAX_PROMPT
    outcome = asyncio.run(wave(server.address, [spec]))[0]
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT and "prompt too long" in outcome.details
