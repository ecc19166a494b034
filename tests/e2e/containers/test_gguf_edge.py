"""The edge image serves a GGUF variant on llama.cpp, in a pod as the operator renders it.

The sample's edge variant is int8 (torch); this runs the same deployment with the compression sample's GGUF
variant in its place (sample_stack.gguf_manifest): the compression Job writes the GGUF artifact offline, the
edge server loads it with the image's llama.cpp, and the router's cascade answers from it. Runs after
test_containers.py has torn its stack down (file order), so the two stacks never share the machine.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from docker_pods import LABEL
from sample_stack import GGUF_VARIANT, Stack, edge_artifact, server_channel

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.client import Client
from stratus_workers.models.artifact import WEIGHTS_FILE
from stratus_workers.models.gguf_artifact import GGUF_FILE
from stratus_workers.runtimes import RUNTIME_LLAMACPP

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]


def test_the_plan_runs_the_variant_on_llama_cpp(gguf_stack: Stack) -> None:
    [variant] = gguf_stack.final.plan.variants
    assert (variant.name, variant.state, variant.runtime) == (GGUF_VARIANT, "Accepted", RUNTIME_LLAMACPP)


def test_the_job_wrote_a_gguf_artifact_offline(gguf_stack: Stack) -> None:
    info = subprocess.run(["docker", "inspect", "--format", "{{.HostConfig.NetworkMode}}",
                           gguf_stack.job.pod.container], capture_output=True, text=True, check=True)
    assert info.stdout.strip() == "none"
    summary = json.loads(gguf_stack.job_message.strip().splitlines()[-1])
    assert (gguf_stack.job_exit, summary["status"]) == (0, "accepted"), summary
    artifact = edge_artifact(gguf_stack.final, gguf_stack.cluster.workdir / "claims")
    assert (artifact / GGUF_FILE).is_file() and not (artifact / WEIGHTS_FILE).exists(), sorted(
        p.name for p in artifact.iterdir())


def test_the_edge_server_answers_from_llama_cpp(gguf_stack: Stack) -> None:
    # Straight to the edge server over mutual TLS, past the router: its ModelInfo names the GGUF recipe.
    with server_channel(gguf_stack, "edge-server", client_cert=True) as channel:
        stub = pb_grpc.InferenceStub(channel)
        info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert info.tier == pb.TIER_EDGE and info.compression.startswith("quantize:gguf-"), info
    with server_channel(gguf_stack, "edge-server", client_cert=True) as channel:
        reply = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
            chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="What is the capital of France?")]),
            max_new_tokens=8), timeout=120)
    assert reply.text.strip() and reply.usage.completion_tokens > 0, reply


def test_the_cascade_answers_from_the_gguf_edge(gguf_stack: Stack) -> None:
    with Client(gguf_stack.router_grpc, token=gguf_stack.token, timeout=120) as client:
        replies = [client.generate(messages=[{"role": "user", "content": f"Say hello to user {n}."}],
                                   max_new_tokens=8) for n in range(4)]
    for reply in replies:
        assert reply.text.strip() and not reply.route.degraded, reply.route
    # Under cascade the edge answers first; the router keeps that answer or escalates with its confidence noted.
    assert all(r.route.tier == pb.TIER_EDGE or r.route.HasField("confidence") for r in replies), [
        r.route for r in replies]


def test_teardown_leaves_nothing_behind(gguf_stack: Stack) -> None:
    assert gguf_stack.cluster.teardown() == []
    assert gguf_stack.cluster.leftovers() == {"containers": [], "volumes": [], "networks": []}
    names = subprocess.run(["docker", "ps", "-a", "--filter", f"label={LABEL}={gguf_stack.cluster.run_id}", "-q"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert names == []
