"""pipelineParallel in the cloud spec: validation, the plan, the rendered pod, and the topology in status."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from samples import sample

from stratus_operator.crd import build_crd
from stratus_operator.placement import ClusterView
from stratus_operator.planner import build_status, plan
from stratus_operator.render import RenderOptions, render_plan
from stratus_operator.spec import LLMDeployment

pytestmark = pytest.mark.unit


def cloud(**fields: Any) -> LLMDeployment:
    manifest = sample()
    manifest["spec"]["cloud"].update(fields)
    return LLMDeployment.from_manifest(manifest)


def test_the_plan_asks_a_gpu_per_stage_and_the_pod_runs_the_stages() -> None:
    d = cloud(gpusPerPod=2, pipelineParallel=2)
    p = plan(d, ClusterView.local(), {})
    assert p.cloud is not None and p.cloud.pipeline_parallel == 2 and p.cloud.tensor_parallel == 1
    assert p.cloud.resources.limits == {"nvidia.com/gpu": "2"}  # one per stage
    objects = render_plan(p, d, RenderOptions())
    server = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-cloud"))
    pod = server["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = container.get("command") or container["args"]
    assert command[command.index("--pipeline-parallel") + 1] == "2"
    assert "--tensor-parallel" not in command
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]  # NCCL's shared memory


def test_stages_of_tensor_parallel_groups_take_a_pod_of_all_their_gpus() -> None:
    """tensorParallel x pipelineParallel: one pod with every rank's GPU, both flags on the server's command."""
    d = cloud(gpusPerPod=4, pipelineParallel=2, tensorParallel=2)
    p = plan(d, ClusterView.local(), {})
    assert p.cloud is not None and (p.cloud.pipeline_parallel, p.cloud.tensor_parallel) == (2, 2)
    assert p.cloud.resources.limits == {"nvidia.com/gpu": "4"}
    objects = render_plan(p, d, RenderOptions())
    server = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-cloud"))
    container = server["spec"]["template"]["spec"]["containers"][0]
    command = container.get("command") or container["args"]
    assert command[command.index("--pipeline-parallel") + 1] == "2"
    assert command[command.index("--tensor-parallel") + 1] == "2"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_gpus_per_pod_zero_runs_the_stages_on_cpu() -> None:
    # gpusPerPod 0 means a CPU pod whatever the degree (the stages talk gloo), as for tensorParallel.
    d = cloud(gpusPerPod=0, pipelineParallel=2)
    p = plan(d, ClusterView.local(), {})
    assert p.cloud is not None and p.cloud.pipeline_parallel == 2
    assert "nvidia.com/gpu" not in p.cloud.resources.limits


def test_one_stage_renders_as_before() -> None:
    d = cloud()
    p = plan(d, ClusterView.local(), {})
    assert p.cloud is not None and p.cloud.pipeline_parallel == 1
    server = next(o for o in render_plan(p, d, RenderOptions()) if o["metadata"]["name"].endswith("-cloud")
                  and o["kind"] == "Deployment")
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert "--pipeline-parallel" not in (container.get("command") or container["args"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gpusPerPod": 2, "tensorParallel": 2, "pipelineParallel": 2},
         "tensorParallel times pipelineParallel cannot exceed gpusPerPod"),
        ({"gpusPerPod": 2, "pipelineParallel": 4}, "pipelineParallel cannot exceed gpusPerPod"),
        ({"pipelineParallel": 0}, "pipelineParallel"),
    ],
)
def test_refused_combinations_say_what_to_change(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        cloud(**fields)


def test_the_crd_carries_the_same_rules() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    tier = schema["properties"]["spec"]["properties"]["cloud"]
    assert tier["properties"]["pipelineParallel"]["minimum"] == 1
    rules = {r["rule"] for r in tier["x-kubernetes-validations"]}
    assert ("self.gpusPerPod == 0 || self.tensorParallel == 1 || self.pipelineParallel == 1 "
            "|| self.tensorParallel * self.pipelineParallel <= self.gpusPerPod") in rules
    assert "self.gpusPerPod == 0 || self.pipelineParallel <= self.gpusPerPod" in rules
    status = schema["properties"]["status"]["properties"]["cloud"]["properties"]
    assert "topology" in status


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"gpusPerPod": 2, "pipelineParallel": 2}, "pipeline parallel 2: one pod per replica, 2 stage processes"),
        ({"gpusPerPod": 2, "tensorParallel": 2}, "tensor parallel 2: one pod per replica, 2 rank processes"),
        ({"gpusPerPod": 4, "tensorParallel": 2, "pipelineParallel": 2},
         "pipeline parallel 2 x tensor parallel 2: one pod per replica, 4 rank processes (2 stages"),
        ({}, "one process per replica"),
    ],
)
def test_status_reports_the_cloud_topology(fields: dict[str, Any], words: str) -> None:
    p = plan(cloud(**fields), ClusterView.local(), {})
    status = build_status(p, {}, previous=None, now="2026-01-01T00:00:00Z")
    assert status.cloud.topology.startswith(words)
    assert status.model_dump(by_alias=True)["cloud"]["topology"] == status.cloud.topology
