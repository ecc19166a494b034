"""The workers' command lines and the router's config file, built by both executors from a bound plan.

The plan names models and backends; an executor decides where a model lies and which address a backend
has (`render`: pod paths and Service DNS names; `local.runner`: work-dir paths and loopback ports) and then
builds the same `python -m stratus_workers.*` invocations here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stratus_operator.names import GRPC_PORT, HTTP_PORT, ROUTER_CONFIG_FILE
from stratus_operator.planner.topology import Plan, RouterPlan, ServerPlan, Tier
from stratus_operator.spec import Device, Dtype
from stratus_workers.router.config import Backend, RouterConfig


@dataclass(frozen=True)
class ServeFlags:
    """The flags of `python -m stratus_workers.serve`."""

    model: str
    name: str
    tier: Tier
    dtype: Dtype
    device: Device
    max_batch_size: int
    max_prompt_tokens: int
    max_new_tokens: int
    host: str = "0.0.0.0"
    port: int = GRPC_PORT
    http_port: int = HTTP_PORT
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    prefill_chunk_tokens: int | None = None  # None: the server's default
    prefix_cache_tokens: int | None = None
    stream_messages_per_second: int | None = None

    @classmethod
    def of(cls, server: ServerPlan, *, model: str, host: str = "0.0.0.0", port: int = GRPC_PORT,
           http_port: int = HTTP_PORT) -> ServeFlags:
        """The flags of `server`, with its model bound to `model` (a path or source the server can open)."""
        return cls(
            model=model, name=server.name, tier=server.tier, dtype=server.dtype, device=server.device,
            max_batch_size=server.serving.max_batch_size, max_prompt_tokens=server.serving.max_prompt_tokens,
            max_new_tokens=server.serving.max_new_tokens, host=host, port=port, http_port=http_port,
            tensor_parallel=server.tensor_parallel, pipeline_parallel=server.pipeline_parallel,
            prefill_chunk_tokens=server.serving.prefill_chunk_tokens,
            prefix_cache_tokens=server.serving.prefix_cache_tokens,
            stream_messages_per_second=server.serving.stream_messages_per_second,
        )

    def args(self) -> list[str]:
        args = [
            "--model", self.model, "--name", self.name, "--tier", self.tier,
            "--host", self.host, "--port", str(self.port), "--http-port", str(self.http_port),
            "--dtype", self.dtype, "--device", self.device,
            "--max-batch-size", str(self.max_batch_size),
            "--max-prompt-tokens", str(self.max_prompt_tokens),
            "--max-new-tokens", str(self.max_new_tokens),
        ]
        if self.tensor_parallel > 1:
            args += ["--tensor-parallel", str(self.tensor_parallel)]
        if self.pipeline_parallel > 1:
            args += ["--pipeline-parallel", str(self.pipeline_parallel)]
        optional = (("--prefill-chunk-tokens", self.prefill_chunk_tokens),
                    ("--prefix-cache-tokens", self.prefix_cache_tokens),
                    ("--stream-message-rate", self.stream_messages_per_second))  # fmt: skip
        for flag, value in optional:
            if value is not None:
                args += [flag, str(value)]
        return args

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", "stratus_workers.serve", *self.args()]


@dataclass(frozen=True)
class RouterFlags:
    """The flags of `python -m stratus_workers.router`."""

    config: str = ROUTER_CONFIG_FILE
    host: str = "0.0.0.0"
    port: int = GRPC_PORT
    http_port: int = HTTP_PORT

    def args(self) -> list[str]:
        return ["--config", self.config, "--host", self.host, "--port", str(self.port),
                "--http-port", str(self.http_port)]

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", "stratus_workers.router", *self.args()]


def compress_command(*, spec: str, out: str, termination_log: str, python: str = "python",
                     device: str = "auto") -> list[str]:
    """`python -m stratus_workers.compress`: read the Job spec, write the artifact, report to the log."""
    command = [python, "-m", "stratus_workers.compress", "--spec", spec, "--out", out,
               "--termination-log", termination_log]
    return [*command, "--device", device] if device != "auto" else command


def router_config(p: Plan, router: RouterPlan, *, address: Callable[[str], str], tokenizer: str | None) -> RouterConfig:
    """The router's config file: its routing section, each backend at `address(name)`, the bound tokenizer."""
    backends = [Backend(name=name, address=address(name), tier=p.server(name).tier) for name in router.backends]
    return RouterConfig(routing=router.routing, backends=backends, tokenizer=tokenizer or None)
