"""The commands the planner renders parse with the workers' own command lines (the contract, both sides)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stratus_operator.planner import ClusterView, CompressionResult, plan, render
from stratus_operator.spec import LLMDeployment
from stratus_workers.compress.__main__ import build_parser as compress_parser
from stratus_workers.compress.spec import CompressionJobSpec
from stratus_workers.router.config import RouterConfig
from stratus_workers.router.server import RouterSettings
from stratus_workers.serve.server import ServerSettings
from stratus_workers.settings import parse_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]


def deployment() -> LLMDeployment:
    m = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    m["metadata"]["uid"] = "u"
    return LLMDeployment.from_manifest(m)


def test_server_and_router_flags_parse_with_the_workers_parsers() -> None:
    d = deployment()
    p = plan(d, ClusterView.local(), {"int8": CompressionResult("int8", "accepted", size_bytes=10)})
    assert len(p.servers) == 2
    for server in p.servers:
        config = parse_config(ServerSettings, server.flags.args())
        assert (config.name, config.tier, config.port, config.http_port) == (server.name, server.tier, 50051, 8080)
        assert (config.max_batch_size, config.dtype, config.device) == (
            server.flags.max_batch_size, server.flags.dtype, server.flags.device)
    assert p.router is not None
    settings = parse_config(RouterSettings, p.router.flags.args())
    assert str(settings.config) == "/etc/stratus/router.json" and settings.port == 50051


def test_rendered_job_and_configs_are_what_the_workers_read() -> None:
    d = deployment()
    p = plan(d, ClusterView.local(), {"int8": CompressionResult("int8", "accepted", size_bytes=10)})
    objects = render(p, d)
    job = next(o for o in objects if o["kind"] == "Job")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    args = compress_parser().parse_args(command[3:])
    assert str(args.spec) == "/etc/stratus/spec.json" and str(args.out) == "/artifacts/int8"
    spec_cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == job["metadata"]["name"])
    CompressionJobSpec.model_validate(json.loads(spec_cm["data"]["spec.json"]))
    router_cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "smollm2-router")
    config = RouterConfig.model_validate(json.loads(router_cm["data"]["router.json"]))
    assert {b.name for b in config.backends} == {"smollm2-cloud", "smollm2-edge-int8"}
