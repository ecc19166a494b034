"""The images keep their promises, and the sample's plan runs as containers started as the operator renders them.

Needs a Docker engine and `make images`; `make e2e-containers` runs it. Tests run in file order on one stack
(the conftest's `stack`): the last ones kill the edge and tear everything down.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.error
import urllib.request
from typing import Any

import grpc
import image_scripts
import pytest
from docker_pods import LABEL
from sample_stack import Images, Stack, edge_artifact, router_config, server_channel

from stratus_workers.api import inference_pb2 as pb
from stratus_workers.api import inference_pb2_grpc as pb_grpc
from stratus_workers.client import AsyncClient, Client
from stratus_workers.models.artifact import WEIGHTS_FILE
from stratus_workers.router.openai_request import ERROR_TYPES

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

RUN_AS = "65532:65532"
BUNDLED = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _run(image: str, *command: str, entrypoint: str = "python") -> subprocess.CompletedProcess[str]:
    """One throwaway container as the pods run: non-root, read-only root, no network, nothing pulled."""
    return subprocess.run(
        ["docker", "run", "--rm", "--pull", "never", "--network", "none", "--read-only", "--user", RUN_AS,
         "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp:rw,mode=1777",
         "--entrypoint", entrypoint, image, *command],
        capture_output=True, text=True, timeout=300, check=False,
    )


def _inspect(target: str) -> dict[str, Any]:
    out = subprocess.run(["docker", "inspect", target], capture_output=True, text=True, check=True)
    found: list[dict[str, Any]] = json.loads(out.stdout)
    return found[0]


# -- the images -------------------------------------------------------------------------------------------


def test_images_run_as_uid_65532(images: Images) -> None:
    for image in (images.operator, images.edge, *([images.cloud] if images.cloud else [])):
        assert _inspect(image)["Config"]["User"] == RUN_AS, image


def test_operator_image_has_no_torch_and_starts_read_only(images: Images) -> None:
    no_torch = _run(images.operator, "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr, no_torch.stderr
    # The whole reconcile path imports (handlers, planner, render, TLS) and the CLI answers, on a read-only root.
    imports = _run(images.operator, "-c", "import stratus_operator.main, stratus_operator.handlers, "
                   "stratus_operator.tls; import sys; print(sorted(m for m in ('torch', 'transformers', 'numpy') "
                   "if m in sys.modules))")
    assert imports.returncode == 0 and imports.stdout.strip() == "[]", imports.stderr[-2000:]
    helped = _run(images.operator, "operator", "--help", entrypoint="stratus")
    assert helped.returncode == 0 and "--namespace" in helped.stdout, helped.stderr[-2000:]


def test_edge_image_carries_the_bundled_model_converted(images: Images) -> None:
    # Offline, on a read-only root: the model and the router's tokenizer must come from the image's cache, with
    # nothing left to convert or write (a conversion would need a writable cache and fail here).
    script = (
        "from stratus_workers.models.files import cache_dir; "
        "from stratus_workers.models.loader import materialize_bundled; "
        "from stratus_workers.models.tokenizer import load_tokenizer; "
        f"path = materialize_bundled('{BUNDLED}'); tok = load_tokenizer('bundled://{BUNDLED}'); "
        "import torch; "
        "print(cache_dir(), path, sorted(p.name for p in path.iterdir()), tok('Paris').input_ids, "
        "torch.__version__, torch.version.cuda)"
    )
    checked = _run(images.edge, "-c", script)
    assert checked.returncode == 0, checked.stderr[-3000:]
    cache, path, rest = checked.stdout.split(" ", 2)
    assert cache == "/opt/stratus/cache" and path == f"/opt/stratus/cache/models/{BUNDLED}"
    assert "'model.safetensors'" in rest and "'config.json'" in rest and "'tokenizer.json'" in rest
    assert rest.rstrip().endswith("None"), f"the edge flavour carries CPU torch: {rest}"
    listing = _run(images.edge, "/opt/stratus/cache", entrypoint="ls")
    assert listing.stdout.split() == ["models"], "no locks or half-written conversions left in the image"


def test_edge_image_carries_llama_cpp_built_portable_and_no_compiler(images: Images) -> None:
    # The instruction sets llama.cpp was compiled with (not this CPU's: the build host here has AVX-512), judged
    # by the same check the image build runs, against the flags build.py gives this architecture.
    script = ("import llama_cpp, platform, shutil; "
              "print(platform.machine(), *[c for c in ('cc', 'gcc', 'g++', 'cmake') if shutil.which(c)]); "
              "print(llama_cpp.llama_print_system_info().decode())")
    checked = _run(images.edge, "-c", script)
    assert checked.returncode == 0, checked.stderr[-3000:]
    first, info = checked.stdout.split("\n", 1)
    machine, *tools = first.split()
    assert tools == [], "no compiler or build tool in the runtime image"
    flags = image_scripts.build.LLAMA_CMAKE_ARGS[machine].split()
    assert image_scripts.llama_features.problems(flags, info) == [], info
    assert image_scripts.llama_features.compiled(info), f"llama.cpp reported no instruction sets: {info!r}"


# -- the stack, started from the operator's rendered objects ---------------------------------------------


def test_every_container_runs_the_rendered_command_read_only_as_65532(stack: Stack) -> None:
    rendered = {(o["metadata"]["name"]): o["spec"]["template"]["spec"]
                for o in [*stack.final.of_kind("Deployment"), *stack.first.of_kind("Job")]}
    checked = 0
    for owner, pods in stack.cluster.pods.items():
        spec = rendered[owner]
        container = spec["containers"][0]
        for pod in pods:
            info = _inspect(pod.container)
            assert [info["Path"], *info["Args"]] == [*container["command"], *container.get("args", [])]
            assert info["HostConfig"]["ReadonlyRootfs"] is True
            assert info["Config"]["User"] == RUN_AS
            assert info["HostConfig"]["CapDrop"] == ["ALL"]
            assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
            mounts = {m["Destination"]: m for m in info["Mounts"]}
            assert mounts["/tmp"]["Type"] == "volume", "/tmp is the pod's emptyDir"
            assert set(mounts) == {m["mountPath"] for m in container["volumeMounts"]} | (
                {container["terminationMessagePath"]} if "terminationMessagePath" in container else set())
            checked += 1
    assert checked == 4, "compression Job, cloud server, edge server, router"


def test_compression_job_ran_without_network_and_its_result_was_accepted(stack: Stack) -> None:
    info = _inspect(stack.job.pod.container)
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert stack.job_exit == 0
    summary = json.loads(stack.job_message.strip().splitlines()[-1])
    assert summary["status"] == "accepted", summary
    artifact = edge_artifact(stack.final, stack.cluster.workdir / "claims")
    assert (artifact / "manifest.json").is_file() and (artifact / WEIGHTS_FILE).is_file(), sorted(
        str(p) for p in artifact.parent.rglob("*"))[:20]


def test_servers_and_router_have_no_route_out(stack: Stack) -> None:
    network = _inspect(stack.cluster.network)
    assert network["Internal"] is True
    attached = {c["Name"] for c in network["Containers"].values()}
    assert attached == {p.container for pods in stack.cluster.pods.values() for p in pods
                        if p.owner != stack.job.pod.owner}


def test_router_started_with_its_tokenizer_from_the_image(stack: Stack) -> None:
    router = stack.cluster.pods[stack.owner("router")][0].container
    logs = stack.cluster.logs(router, 400)
    assert "no tokenizer" not in logs, logs[-3000:]
    assert router_config(stack.final)["routing"]["policy"] == "cascade"
    assert router_config(stack.first)["routing"]["policy"] == "cloud-only", "while the Job ran"


def test_chat_through_the_router_over_grpc_needs_the_token(stack: Stack) -> None:
    with Client(stack.router_grpc, token=stack.token, timeout=120) as client:
        reply = client.generate(messages=QUESTION, max_new_tokens=16)
        assert reply.text.strip() and reply.usage.completion_tokens > 0
        assert reply.route.tier in (pb.TIER_EDGE, pb.TIER_CLOUD) and not reply.route.degraded
        assert reply.route.backend in (stack.owner("edge-server"), stack.owner("cloud-server"))
        streamed = "".join(c.text for c in client.stream(messages=QUESTION, max_new_tokens=8))
        assert streamed.strip()
    with Client(stack.router_grpc, timeout=30) as anonymous, pytest.raises(grpc.RpcError) as refused:
        anonymous.generate(messages=QUESTION, max_new_tokens=4)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _post(url: str, body: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_chat_through_the_router_over_http_needs_the_token(stack: Stack) -> None:
    url = f"{stack.router_http}/v1/chat/completions"
    status, body = _post(url, {"messages": QUESTION, "max_tokens": 16}, stack.token)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip()
    assert body["stratus"]["tier"] in ("edge", "cloud") and body["stratus"]["degraded"] is False
    status, body = _post(url, {"messages": QUESTION, "max_tokens": 4}, None)
    assert (status, body["error"]["type"]) == (401, ERROR_TYPES[401]) and "bearer token" in body["error"]["message"]




def test_model_servers_take_only_mutual_tls(stack: Stack) -> None:
    request = pb.ModelInfoRequest()
    with grpc.insecure_channel(f"{stack.ip('cloud-server')}:50051") as plain, pytest.raises(grpc.RpcError):
        pb_grpc.InferenceStub(plain).ModelInfo(request, timeout=10)
    with server_channel(stack, "cloud-server", client_cert=False) as one_way, pytest.raises(grpc.RpcError):
        pb_grpc.InferenceStub(one_way).ModelInfo(request, timeout=10)
    with server_channel(stack, "cloud-server", client_cert=True) as mutual:
        info = pb_grpc.InferenceStub(mutual).ModelInfo(request, timeout=10)
    assert info.tier == pb.TIER_CLOUD and info.source == f"bundled://{BUNDLED}"


def _edge_answered(reply: pb.GenerateResponse) -> bool:
    # Under cascade the edge answers every request first; the router keeps that answer (tier edge) or, judging
    # its confidence too low, escalates (tier cloud, with the edge's confidence recorded).
    return reply.route.tier == pb.TIER_EDGE or reply.route.HasField("confidence")


async def test_killing_the_edge_under_load_degrades_to_the_cloud(stack: Stack) -> None:
    edge_owner = stack.owner("edge-server")
    before: list[pb.GenerateResponse] = []
    after: list[pb.GenerateResponse] = []
    failures: list[str] = []
    killed = asyncio.Event()

    def ask(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]  # every prompt distinct: the router's output cache stays out

    async def user(uid: int, client: AsyncClient) -> None:
        for n in range(12):
            try:
                reply = await client.generate(messages=ask(f"Say hello to user {uid}, #{n}."), max_new_tokens=8)
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            (after if killed.is_set() else before).append(reply)

    async def killer() -> None:
        while len(before) < 6 or not any(_edge_answered(r) for r in before):
            if len(before) >= 40:
                return  # the assertion below says the edge never answered
            await asyncio.sleep(0.05)
        await asyncio.to_thread(stack.cluster.kill, edge_owner)
        killed.set()

    async with AsyncClient(stack.router_grpc, token=stack.token, timeout=120) as client:
        await asyncio.gather(*(user(u, client) for u in range(4)), killer())
        assert killed.is_set(), f"the edge never answered before the kill: {[r.route for r in before]}"
        assert not stack.cluster.running(stack.cluster.pods[edge_owner][0].container)
        # Once the router has seen the edge go, every answer is the cloud's, marked degraded.
        settled = [await client.generate(messages=ask(f"Name a colour, please ({i})."), max_new_tokens=8)
                   for i in range(3)]
    assert failures == [], failures
    assert len(before) + len(after) == 48
    assert after, "requests went on after the kill"
    for reply in settled:
        assert (reply.route.tier, reply.route.reason, reply.route.degraded) == (
            pb.TIER_CLOUD, "edge-unavailable", True), reply.route
        assert reply.text.strip()
    status, body = _post(f"{stack.router_http}/v1/chat/completions",
                         {"messages": ask("Name a fruit, please."), "max_tokens": 8}, stack.token)
    assert status == 200 and body["stratus"]["tier"] == "cloud" and body["stratus"]["degraded"] is True, body


def test_teardown_leaves_nothing_behind(stack: Stack) -> None:
    assert stack.cluster.teardown() == []
    assert stack.cluster.leftovers() == {"containers": [], "volumes": [], "networks": []}
    names = subprocess.run(["docker", "ps", "-a", "--filter", f"label={LABEL}={stack.cluster.run_id}", "-q"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert names == []
