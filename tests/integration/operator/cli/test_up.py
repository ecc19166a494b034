"""`stratus up FILE --once`, the README's first command, as a user runs it: compression, servers and router as
processes on loopback, the sample prompts answered through the router, each answer naming its tier."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[4]
ANSWER = re.compile(r"^    \[(?P<tier>\w+) · (?P<why>[^·]+) · \d+ ms\] ", re.MULTILINE)


def tiny_sample(model_dir: Path, path: Path, variant_name: str = "int8", compression: dict | None = None) -> Path:
    """The main sample with the tiny random model as its source, sized for seconds instead of minutes."""
    manifest = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    manifest["metadata"]["name"] = "tiny"
    manifest["spec"]["model"]["source"] = str(model_dir)
    variant = manifest["spec"]["edge"]["variants"][0]
    variant["name"] = variant_name
    if compression is not None:
        variant["compression"] = compression
    variant["evaluation"] = {"perplexitySamples": 2, "sequenceLength": 32, "speedTokens": 4, "agreementPrompts": 2,
                             "agreementTokens": 4}
    variant["gate"] = {}  # a random model's quantization error says nothing; let it serve
    # Random weights are never confident: at this threshold the edge answers and the cascade keeps it.
    manifest["spec"]["routing"]["cascade"]["confidenceThreshold"] = -100.0
    path.write_text(yaml.safe_dump(manifest))
    return path


@pytest.mark.parametrize(
    ("variant", "compression", "recipe", "runtime"),
    [
        ("int8", None, "quantize:int8-weight", "torch"),
        # The variant's format picks its engine: a GGUF artifact is served by llama.cpp.
        ("gguf", {"quantization": {"method": "gguf", "ggufType": "q8_0"}}, "quantize:gguf-q8_0", "llamacpp"),
    ],
)
def test_up_once_compresses_serves_and_answers_naming_the_tier(
    tiny_model_dir: Path, tmp_path: Path, variant: str, compression: dict | None, recipe: str, runtime: str
) -> None:
    sample = tiny_sample(tiny_model_dir, tmp_path / "tiny.yaml", variant, compression)
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "stratus_operator.cli", "up", str(sample), "--once", "--work-dir", str(work),
         "--max-new-tokens", "6"],
        capture_output=True, text=True, timeout=570,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert re.search(rf"^compress  {variant} +accepted \(\d+ s\)", out, re.MULTILINE), out
    assert re.search(r"^cloud +127\.0\.0\.1:\d+ +tiny-cloud ", out, re.MULTILINE), out
    edge_line = rf"^edge +127\.0\.0\.1:\d+ +tiny-edge-{variant} +\(variant {variant}: {recipe}, served by {runtime}"
    assert re.search(edge_line, out, re.MULTILINE), out
    assert re.search(r"^router +127\.0\.0\.1:\d+ +http://127\.0\.0\.1:\d+ +tiny-router +\(policy cascade\)", out,
                     re.MULTILINE), out
    answers = list(ANSWER.finditer(out))
    assert len(answers) == 6 and out.count("\n  ? ") == 6, out
    assert {a["tier"] for a in answers} <= {"edge", "cloud"}
    assert "edge" in {a["tier"] for a in answers}, out  # the compressed variant answered through the router
    assert "error:" not in out
    # The work dir keeps the state and the verdict, so the next run reuses the artifact.
    assert (work / "endpoints.json").is_file()
    assert [p.name for p in (work / "artifacts").glob(f"{variant}-*.summary.json")]


def test_a_second_up_of_the_same_deployment_refuses_and_says_which_run_holds_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    sample = tiny_sample(tiny_model_dir, tmp_path / "tiny.yaml")
    work = tmp_path / "work"
    holder_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from stratus_operator.local import LocalRunner, load_manifest\n"
        "runner = LocalRunner(load_manifest(Path(sys.argv[1])), work_dir=Path(sys.argv[2]))\n"
        "runner.claim()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(sample), str(work)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            [sys.executable, "-m", "stratus_operator.cli", "up", str(sample), "--once", "--work-dir", str(work)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"error: tiny is already running from {work} (pid {holder.pid}, started" in second.stdout
        assert not (work / "logs").exists() and not (work / "tls").exists()  # nothing of the first run touched
    finally:
        holder.kill()
        holder.wait(10)
    # The kernel dropped the lock with its holder: a crashed run leaves nothing behind.
    from stratus_operator.local import LocalRunner, load_manifest

    runner = LocalRunner(load_manifest(sample), work_dir=work)
    runner.claim()
    runner.release()
