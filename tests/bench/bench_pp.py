"""`make bench-pp`: one device, tensor parallel and pipeline parallel side by side, into docs/benchmarks.md.

The same random-init model (saved once as a model directory) is served by `python -m stratus_workers.serve`
in each layout: on one device, `--tensor-parallel 2` and `--pipeline-parallel 2` (two GPUs on CUDA; two
processes over gloo on the CPU, which checks the harness, not the layouts' speed). Each server is loaded
by streaming clients in separate processes (bench_serve.ClientPool) at each concurrency, after a short
warm-up pass; aggregate tokens/s counts completion tokens over wall time. The prefix cache is off in
every layout (the prompts repeat across rounds; the comparison is of the forward passes), and the engine
runs in a process of its own in every layout (pipeline parallel needs that; on CUDA it is the default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import report  # tests/bench/report.py (scripts run from this folder)
import torch
from bench_serve import ARCHS, ClientPool, _server_row, machine, make_prompts

from stratus_workers.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
SECTION = "bench-pp-{kind}"
LAYOUTS: dict[str, tuple[str, list[str], int, dict[str, str]]] = {
    # name: (label, server flags, devices, environment)
    "single": ("one device", [], 1, {}),
    "tp2": ("tensor parallel 2", ["--tensor-parallel", "2"], 2, {}),
    "pp2": ("pipeline parallel 2", ["--pipeline-parallel", "2"], 2, {}),
    # A step's rows as one micro-batch: no overlap of the stages within a step, but each stage reads its
    # weights once a step instead of once per micro-batch (which is what a memory-bound decode step costs).
    "pp2-m1": ("pipeline parallel 2, one micro-batch", ["--pipeline-parallel", "2", "--pipeline-microbatches", "1"], 2,
               {}),
    # Stages with their decode graphs but without decoding ahead: each step waits for rank 0's sampling.
    "pp2-noahead": ("pipeline parallel 2, no decoding ahead", ["--pipeline-parallel", "2"], 2,
                    {"STRATUS_DECODE_AHEAD": "0"}),
    # Stages without their decode graphs (nor decoding ahead): each micro-batch's layers launched kernel by kernel.
    "pp2-eager": ("pipeline parallel 2, no CUDA graphs", ["--pipeline-parallel", "2"], 2, {"STRATUS_CUDA_GRAPHS": "0"}),
    # One device without decode graphs (nor decoding ahead): what pipeline stages run like, on one device.
    "single-eager": ("one device, no CUDA graphs", [], 1, {"STRATUS_CUDA_GRAPHS": "0"}),
}


async def run_layout(
    layout: str, model_dir: str, prompts: list[str], pool: ClientPool, args: argparse.Namespace, log: Any
) -> list[dict[str, Any]]:
    from stratus_workers.client import AsyncClient

    label, flags, _, extra_env = LAYOUTS[layout]
    port = free_port()
    batch = max(args.concurrency)
    cmd = [
        sys.executable, "-m", "stratus_workers.serve", "--model", model_dir, "--name", "bench", "--port", str(port),
        "--http-port", "0", "--device", args.device, "--engine", "process", "--max-batch-size", str(batch),
        "--max-prompt-tokens", str(args.prompt_tokens), "--max-new-tokens", str(args.new_tokens),
        "--max-queue", str(4 * batch), "--prefix-cache-tokens", "0", "--threads", str(args.threads),
        "--log-level", "warning", "--log-format", "text", *flags,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "workers"), os.environ.get("PYTHONPATH", "")]))
    env.update(extra_env)
    if args.trace:  # the stages' timings (serve/stagetrace.py), one folder per layout
        env["STRATUS_PP_TRACE"] = str(args.trace / layout)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*cmd, env=env)
    address = f"127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    try:
        async with AsyncClient(address) as client:
            while not await client.healthy():
                if proc.returncode is not None or time.monotonic() - started > args.start_timeout:
                    raise RuntimeError(f"the {label} server did not come up (exit {proc.returncode})")
                await asyncio.sleep(0.5)
        log(f"  {label}: up in {time.monotonic() - started:.1f}s")
        for c in [1, *args.concurrency]:  # warm-up: no measured run pays for a first use
            await pool.load(address, prompts, c, 1, min(args.new_tokens, 8), 1, 0.0)
        for c in args.concurrency:
            wall, results = await pool.load(
                address, prompts, c, args.rounds, args.new_tokens, args.client_procs, args.stagger_ms / 1e3
            )
            row = _server_row(label, c, wall, results)
            row["layout"] = layout
            rows.append(row)
            log(row)
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            code = await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:  # a server that does not stop (a hung layout) is killed; its ranks die with it
            proc.kill()
            code = await proc.wait()
        log(f"  {label}: exit {code}")
    return rows


def render(run: dict[str, Any]) -> tuple[str, str]:
    meta, settings, rows = run["meta"], run["settings"], run["rows"]
    layouts = [name for name in LAYOUTS if any(r["layout"] == name for r in rows)]
    by = {(r["layout"], r["concurrency"]): r for r in rows}
    concurrencies = sorted({r["concurrency"] for r in rows})
    kind = meta["kind"]
    lines = [
        f"## Tensor parallel and pipeline parallel ({'GPU' if kind == 'gpu' else 'CPU'})",
        "",
        f"`make bench-pp` ({'`--device cuda`' if kind == 'gpu' else 'CPU: checks the harness, not the layouts'}): "
        f"{meta['device']}; {meta['cpu']}; torch {meta['torch']}; {meta['date']}. Model: `{settings['model']}` "
        f"random-init ({settings['parameters'] / 1e6:.0f}M parameters, {settings['dtype']}), "
        f"{settings['prompt_tokens']}-token prompts, {settings['new_tokens']} new tokens, {settings['rounds']} "
        f"requests per stream, prefix cache off, engine in its own process.",
        "",
        "Aggregate tokens/s (time to first token p50 / inter-token latency p50, ms):",
        "",
        "| streams | " + " | ".join(LAYOUTS[name][0] for name in layouts) + " |",
        "| ---: | " + " | ".join("---:" for _ in layouts) + " |",
    ]
    for c in concurrencies:
        cells = []
        for name in layouts:
            r = by.get((name, c))
            cells.append(
                "—" if r is None else f"{r['tokens_per_s']:,.0f} ({r['ttft_p50_ms']:.1f} / {r['itl_p50_ms']:.2f})"
            )
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    if "single" in layouts and len(layouts) > 1:
        lines += ["", "Tokens/s relative to one device:", ""]
        for name in layouts:
            if name == "single":
                continue
            ratios = []
            for c in concurrencies:
                r, base = by.get((name, c)), by.get(("single", c))
                if r is not None and base is not None and base["tokens_per_s"]:
                    ratios.append(f"{c} stream{'' if c == 1 else 's'} {r['tokens_per_s'] / base['tokens_per_s']:.2f}x")
            lines.append(f"- {LAYOUTS[name][0]}: " + ", ".join(ratios))
    return kind, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ARCHS), default=None, help="default: 1b on CUDA, tiny on the CPU")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=["single", "tp2", "pp2"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 64 on CUDA, 32 on the CPU")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 on CUDA, 16 on the CPU")
    parser.add_argument("--rounds", type=int, default=None, help="requests per stream (default 2 CUDA, 1 CPU)")
    parser.add_argument("--client-procs", type=int, default=None, help="client processes (default 4 CUDA, 1 CPU)")
    parser.add_argument("--stagger-ms", type=float, default=2.0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads per server process (0: torch's)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the bundled SmolLM2 tokenizer)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to come up")
    parser.add_argument("--layout-timeout", type=float, default=None, help="seconds a layout may take in all")
    parser.add_argument("--json", type=Path, help="also dump the raw rows here")
    parser.add_argument("--trace", type=Path, help="trace pipeline stages into TRACE/<layout> (STRATUS_PP_TRACE)")
    parser.add_argument("--from-json", type=Path, help="render and write an earlier --json dump instead")
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    if args.from_json:
        kind, section = render(json.loads(args.from_json.read_text()))
        print(section)
        if not args.no_write:
            report.write_section(args.write, SECTION.format(kind=kind), section)
        return 0

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    args.model = args.model or ("1b" if cuda else "tiny")
    args.prompt_tokens = args.prompt_tokens or (64 if cuda else 32)
    args.new_tokens = args.new_tokens or (128 if cuda else 16)
    args.rounds = args.rounds or (2 if cuda else 1)
    args.client_procs = args.client_procs or (4 if cuda else 1)
    if cuda and torch.cuda.device_count() < max(LAYOUTS[name][2] for name in args.layouts):
        print(f"bench-pp: the layouts need 2 GPUs; this machine has {torch.cuda.device_count()}", file=sys.stderr)
        return 2

    def log(item: Any) -> None:
        if isinstance(item, dict):
            item = "  " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in item.items())
        print(item, flush=True)

    from transformers import AutoTokenizer

    from stratus_workers.models import tiny as tiny_models

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else tiny_models.bundled_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = make_prompts(tokenizer, max(args.concurrency) * args.rounds + 8, args.prompt_tokens)
    dtype = torch.bfloat16 if cuda else torch.float32
    pool = ClientPool(args.client_procs, str(ROOT / "workers"))  # before any server: see ClientPool
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pp-") as tmp:
            arch = dict(getattr(tiny_models, ARCHS[args.model]))
            model = tiny_models.random_llama(arch, vocab_size=len(tokenizer), seed=0).to(dtype=dtype)
            params = sum(p.numel() for p in model.parameters())
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del model
            log(f"model {args.model}: {params / 1e6:.0f}M parameters, {dtype}")
            settings = dict(model=args.model, parameters=params, dtype=str(dtype).removeprefix("torch."),
                            prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, rounds=args.rounds,
                            client_procs=args.client_procs)  # fmt: skip
            for layout in args.layouts:
                try:
                    rows += asyncio.run(
                        asyncio.wait_for(run_layout(layout, tmp, prompts, pool, args, log), args.layout_timeout)
                    )
                except (RuntimeError, TimeoutError) as exc:  # the other layouts still run; this one is missing
                    log(f"  {layout}: skipped ({type(exc).__name__}: {exc})")
                run = dict(meta=machine(torch.device("cuda" if cuda else "cpu")), settings=settings, rows=rows)
                if args.json:  # after each layout: a run cut short keeps what it measured
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(run, indent=1))
    finally:
        pool.close()
    kind, section = render(run)
    print(section)
    if not args.no_write:
        report.write_section(args.write, SECTION.format(kind=kind), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
