"""The jobs stage: one Job per edge variant, named by its recipe; reading the summary the worker reports."""

from __future__ import annotations

import pytest
from samples import deployment, sample

from stratus_operator.planner import CompressionResult, ResultParseError, parse_summary, plan_jobs
from stratus_operator.spec import LLMDeployment
from stratus_workers.compress.spec import CompressionSummary

pytestmark = pytest.mark.unit

SUMMARY = CompressionSummary(name="int8", status="accepted", recipe="quantize:int8-weight", size_bytes=180_000_000,
                             perplexity=13.2, perplexity_increase=0.0233, tokens_per_second=41.5, agreement=0.94)


def test_one_job_per_variant_from_the_spec_alone() -> None:
    d = deployment(uid="u", namespace="prod")
    (job,) = plan_jobs(d)
    assert job.variant == "int8" and job.name == f"smollm2-compress-int8-{job.spec_hash}"
    assert job.spec.model_source == "bundled://smollm2-135m-instruct"
    assert job.spec.gate.max_perplexity_increase == 0.05
    assert job.state == "pending" and job.result is None
    m = sample()
    m["spec"]["routing"]["policy"] = "cloud-only"
    assert plan_jobs(LLMDeployment.from_manifest(m)) == []


def test_recipe_change_changes_the_job_name() -> None:
    a = plan_jobs(deployment())[0]
    m = sample()
    m["spec"]["edge"]["variants"][0]["compression"]["quantization"]["method"] = "int4-weight"
    b = plan_jobs(LLMDeployment.from_manifest(m))[0]
    assert a.name != b.name and a.spec_hash != b.spec_hash
    # Serving settings are not part of the recipe: same Job.
    m2 = sample()
    m2["spec"]["edge"]["variants"][0]["serving"]["maxBatchSize"] = 9
    assert plan_jobs(LLMDeployment.from_manifest(m2))[0].name == a.name


def test_a_gpu_job_gets_its_gpus_placement_and_cuda_but_keeps_its_name() -> None:
    a = plan_jobs(deployment())[0]
    assert (a.gpus, a.resources, a.device, a.node_selector, a.tolerations) == (0, None, "auto", {}, ())
    m = sample()
    m["spec"]["edge"]["variants"][0]["job"] = {
        "gpus": 1, "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}},
        "nodeSelector": {"stratus.dev/gpu": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    b = plan_jobs(LLMDeployment.from_manifest(m), gpu_resource="example.com/gpu")[0]
    # Where a recipe runs does not change what it produces: same Job name and recipe hash, same result.
    assert (b.name, b.spec_hash) == (a.name, a.spec_hash)
    assert b.device == "cuda" and b.node_selector == {"stratus.dev/gpu": "true"}
    assert [t.key for t in b.tolerations] == ["nvidia.com/gpu"]
    assert b.resources is not None
    # An extended resource: its request equals its limit, beside the variant's own cpu and memory.
    assert b.resources.requests == {"cpu": "4", "memory": "16Gi", "example.com/gpu": "1"}
    assert b.resources.limits == {"memory": "16Gi", "example.com/gpu": "1"}
    # Resources without GPUs are the variant's own; a GPU count set in the limits wins over `gpus`.
    m["spec"]["edge"]["variants"][0]["job"] = {"resources": {"limits": {"memory": "4Gi"}}}
    c = plan_jobs(LLMDeployment.from_manifest(m))[0]
    assert c.resources is not None and c.resources.limits == {"memory": "4Gi"} and c.device == "auto"
    m["spec"]["edge"]["variants"][0]["job"] = {"gpus": 1, "resources": {"limits": {"nvidia.com/gpu": "2"}}}
    d = plan_jobs(LLMDeployment.from_manifest(m))[0]
    assert d.resources is not None and d.resources.requests == d.resources.limits == {"nvidia.com/gpu": "2"}


@pytest.mark.parametrize("text", [
    SUMMARY.to_json(),
    # FallbackToLogsOnError: the log tail, with log lines (one a cut-off JSON object) before the summary.
    "2026 log line\n{\"not\": \"it\"\n" + SUMMARY.to_json() + "\n",
])
def test_the_summary_is_the_last_json_line(text: str) -> None:
    r = CompressionResult.from_output(text, name="ignored", spec_hash="abc")
    assert r.accepted and r.name == "int8" and r.summary == SUMMARY and r.spec_hash == "abc"


def test_a_summary_without_a_name_gets_the_variants() -> None:
    text = CompressionSummary(name="", status="failed", reasons=["spec.json: not found"]).to_json()
    r = CompressionResult.from_output(text, name="int8")
    assert (r.name, r.status, r.reasons) == ("int8", "failed", ("spec.json: not found",))


def test_unreadable_output_says_what_is_wrong() -> None:
    with pytest.raises(ResultParseError, match="no JSON summary"):
        parse_summary("Traceback (most recent call last):\n  boom")
    with pytest.raises(ResultParseError, match=r"status: .*accepted"):
        parse_summary('{"name": "x", "status": "maybe"}')
    with pytest.raises(ResultParseError, match="status: Field required"):
        parse_summary('{"name": "x", "bytes": 3}')
    # A JSON log line after a killed worker is not a summary either.
    with pytest.raises(ResultParseError, match="not valid"):
        parse_summary('{"level": "info", "message": "stage started", "stage": "evaluate"}')


def test_failed_result_carries_the_jobs_reason() -> None:
    r = CompressionResult.failed("int8", "DeadlineExceeded", "too slow", spec_hash="h")
    assert (r.status, r.reasons, r.failure_reason, r.spec_hash) == (
        "failed", ("DeadlineExceeded: too slow",), "DeadlineExceeded", "h")
