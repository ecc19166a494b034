"""The workers' command lines both executors build parse with the workers' own parsers (the contract)."""

from __future__ import annotations

import dataclasses

import pytest
from samples import accepted, deployment, sample

from stratus_operator.commands import RouterFlags, ServeFlags, compress_command, router_config
from stratus_operator.placement import ClusterView
from stratus_operator.planner import plan
from stratus_operator.spec import LLMDeployment, ServingSpec
from stratus_workers.compress.__main__ import build_parser as compress_parser
from stratus_workers.router.server import RouterSettings
from stratus_workers.serve.server import ServerSettings
from stratus_workers.settings import parse_config

pytestmark = pytest.mark.unit


def test_server_flags_parse_with_the_servers_parser() -> None:
    p = plan(deployment(uid="u"), ClusterView.local(), {"int8": accepted()})
    assert len(p.servers) == 2
    for server in p.servers:
        flags = ServeFlags.of(server, model="/models/x", host="127.0.0.1", port=7001, http_port=7002)
        assert flags.command("py")[:3] == ["py", "-m", "stratus_workers.serve"]
        config = parse_config(ServerSettings, flags.args())
        assert (config.model, config.name, config.tier, config.host, config.port, config.http_port) == (
            "/models/x", server.name, server.tier, "127.0.0.1", 7001, 7002)
        assert (config.max_batch_size, config.max_prompt_tokens, config.max_new_tokens) == (
            server.serving.max_batch_size, server.serving.max_prompt_tokens, server.serving.max_new_tokens)
        assert (config.dtype, config.device) == (server.dtype, server.device)


def test_edge_server_flags_in_full() -> None:
    p = plan(deployment(uid="u"), ClusterView.local(), {"int8": accepted()})
    assert ServeFlags.of(p.edge[0], model="/artifacts/int8").args() == [
        "--model", "/artifacts/int8", "--name", "smollm2-edge-int8", "--tier", "edge", "--host", "0.0.0.0",
        "--port", "50051", "--http-port", "8080", "--dtype", "auto", "--device", "cpu",
        "--max-batch-size", "4", "--max-prompt-tokens", "512", "--max-new-tokens", "256"]


def test_router_flags_and_config() -> None:
    assert RouterFlags().command() == ["python", "-m", "stratus_workers.router", "--config",
                                       "/etc/stratus/router.json", "--host", "0.0.0.0", "--port", "50051",
                                       "--http-port", "8080"]
    settings = parse_config(RouterSettings, RouterFlags(config="/tmp/r.json", port=9).args())
    assert str(settings.config) == "/tmp/r.json" and settings.port == 9
    p = plan(deployment(uid="u"), ClusterView.local(), {"int8": accepted()})
    assert p.router is not None
    config = router_config(p, p.router, address=lambda name: f"{name}:1", tokenizer="/tok")
    assert [(b.name, b.address, b.tier) for b in config.backends] == [
        ("smollm2-cloud", "smollm2-cloud:1", "cloud"), ("smollm2-edge-int8", "smollm2-edge-int8:1", "edge")]
    assert config.tokenizer == "/tok" and config.routing == p.router.routing


def test_compress_command_parses_with_the_workers_parser() -> None:
    command = compress_command(spec="/etc/stratus/spec.json", out="/artifacts/int8",
                               termination_log="/dev/termination-log")
    assert command[:3] == ["python", "-m", "stratus_workers.compress"]
    args = compress_parser().parse_args(command[3:])
    assert (str(args.spec), str(args.out), str(args.termination_log)) == (
        "/etc/stratus/spec.json", "/artifacts/int8", "/dev/termination-log")
    assert args.device == "auto"
    gpu = compress_command(spec="/s.json", out="/a", termination_log="/t", device="cuda")
    assert compress_parser().parse_args(gpu[3:]).device == "cuda"


def test_the_serving_tunables_reach_the_server_and_unset_ones_leave_its_defaults() -> None:
    m = sample(uid="u")
    m["spec"]["cloud"]["serving"].update(prefillChunkTokens=256, prefixCacheTokens=0, streamMessagesPerSecond=0)
    p = plan(LLMDeployment.from_manifest(m), ClusterView.local(), {"int8": accepted()})
    cloud = next(s for s in p.servers if s.tier == "cloud")
    config = parse_config(ServerSettings, ServeFlags.of(cloud, model="/m").args())
    assert (config.prefill_chunk_tokens, config.prefix_cache_tokens, config.stream_message_rate) == (256, 0, 0)
    edge = ServeFlags.of(p.edge[0], model="/m")
    assert "--prefix-cache-tokens" not in edge.args()  # unset in the manifest: no flag, the server's own default
    defaults = parse_config(ServerSettings, edge.args())
    assert (defaults.prefill_chunk_tokens, defaults.prefix_cache_tokens, defaults.stream_message_rate) == tuple(
        f.default for f in dataclasses.fields(ServerSettings)
        if f.name in ("prefill_chunk_tokens", "prefix_cache_tokens", "stream_message_rate"))


@pytest.mark.parametrize(("field", "setting"), [("prefill_chunk_tokens", "prefill_chunk_tokens"),
                                                ("prefix_cache_tokens", "prefix_cache_tokens"),
                                                ("stream_messages_per_second", "stream_message_rate")])
def test_the_crd_says_the_servers_defaults_of_what_it_leaves_unset(field: str, setting: str) -> None:
    # The CRD's descriptions name the server's defaults for users; the server's settings are where they live.
    default = next(f.default for f in dataclasses.fields(ServerSettings) if f.name == setting)
    description = ServingSpec.model_fields[field].description or ""
    assert description.endswith(f"Unset: the server's default ({default:g}).")
