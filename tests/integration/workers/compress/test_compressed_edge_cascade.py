"""A distilled student and pruned variants of the tiny model pass their gate and serve as the cascade's edge tier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stratus_operator.planner import plan_jobs
from stratus_operator.spec import LLMDeployment
from stratus_workers.api import inference_pb2 as pb
from stratus_workers.client import AsyncClient
from stratus_workers.compress.job import compress
from stratus_workers.compress.spec import ExitCode

pytestmark = pytest.mark.integration

ALWAYS_EDGE = {"confidenceThreshold": -100.0}
NEVER_EDGE = {"confidenceThreshold": -0.001}
# The GPU sample's recipes (deploy/samples/smollm2-compression-gpu.yaml) at the tiny model's scale.
TRAINING_TEXT = {"generatedSequences": 4, "generatedLength": 48, "generationBatchSize": 2, "corpusShare": 0.5}
EVALUATION = {"perplexitySamples": 4, "sequenceLength": 64, "speedTokens": 4, "agreementPrompts": 4,
              "agreementTokens": 8}
VARIANTS: dict[str, dict[str, Any]] = {
    "student": {"trainingText": TRAINING_TEXT,
                "distillation": {"studentLayers": 1, "steps": 4, "batchSize": 2, "sequenceLength": 32,
                                 "alpha": 1.0, "temperature": 1.0, "warmupSteps": 1, "learningRate": 0.0005}},
    "wanda-50": {"pruning": {"method": "wanda", "sparsity": 0.5, "calibrationSamples": 4, "recoverySteps": 3,
                             "recoveryBatchSize": 2, "recoverySequenceLength": 32, "recoveryWarmupSteps": 1}},
    "wanda-2-4": {"pruning": {"method": "wanda", "pattern": "2:4", "calibrationSamples": 4, "recoverySteps": 3,
                              "recoveryBatchSize": 2, "recoverySequenceLength": 32, "recoveryWarmupSteps": 1,
                              "recoveryLearningRate": 0.0003}},
}


def _deployment(model_dir: Path) -> LLMDeployment:
    return LLMDeployment.from_manifest({
        "apiVersion": "stratus.dev/v1alpha1", "kind": "LLMDeployment",
        "metadata": {"name": "tiny", "namespace": "default", "uid": "u"},
        "spec": {"model": {"source": str(model_dir)}, "routing": {"policy": "cascade"}, "edge": {"variants": [
            {"name": name, "compression": recipe, "evaluation": EVALUATION,
             # A random model's perplexity is near uniform; the gate still has to hold for the variant to serve.
             "gate": {"maxPerplexityIncrease": 0.05}, "job": {"gpus": 0}}
            for name, recipe in VARIANTS.items()]}},
    })


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_compressed_variant_passes_its_gate_and_serves_the_cascade(
    variant: str, tiny_model_dir: Path, tmp_path: Path, model_server, router_config, running_router
) -> None:
    job = next(j for j in plan_jobs(_deployment(tiny_model_dir)) if j.variant == variant)
    assert job.device == "auto" and job.resources is None  # no GPU asked for: the CPU path of `stratus up`
    out = tmp_path / variant
    result = compress(job.spec, out, work_dir=tmp_path / "work", device="cpu")
    assert (result.exit_code, result.summary.status) == (ExitCode.OK, "accepted"), result.summary.reasons
    assert result.summary.device == "cpu" and result.summary.speed_device == "cpu"
    assert result.summary.training_tokens and result.summary.training_tokens > 0
    if "trainingText" in VARIANTS[variant]:
        assert result.manifest["figures"]["training_text"]["sequences"] == 4
    else:  # recovery on the corpus alone, as the GPU sample's pruned variants
        assert "training_text" not in result.manifest["figures"]
    if variant == "wanda-2-4":  # the mask held through recovery, in what the edge server loads
        assert result.manifest["figures"]["pruning"]["pattern_violations"] == 0

    async with (
        model_server(tier="edge", name=f"edge-{variant}", model=str(out)) as edge,
        model_server(tier="cloud", name="cloud") as cloud,
    ):
        async with AsyncClient(edge.address) as direct:
            info = await direct.model_info()
            alone = await direct.generate("Route me", max_new_tokens=6)
        assert info.compression == result.summary.recipe
        backends = [(f"edge-{variant}", edge.address, "edge"), ("cloud", cloud.address, "cloud")]
        async with running_router(router_config("cascade", backends, cascade=ALWAYS_EDGE)) as router, \
                AsyncClient(router.address) as client:
            reply = await client.generate("Route me", max_new_tokens=6)
        assert (reply.route.tier, reply.route.backend, reply.route.reason) == (
            pb.TIER_EDGE, f"edge-{variant}", "confident")
        assert reply.text == alone.text  # the edge tier's answer is the compressed model's own
        async with running_router(router_config("cascade", backends, cascade=NEVER_EDGE)) as router, \
                AsyncClient(router.address) as client:
            escalated = await client.generate("Route me", max_new_tokens=6)
        assert (escalated.route.tier, escalated.route.escalated) == (pb.TIER_CLOUD, True)
