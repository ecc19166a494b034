"""kubectl against the emulator: every sample applies, and `kubectl get llmd` prints the CRD's columns."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import yaml
from kube_emulator import LLMD, Emulator
from operator_harness import ROOT, OperatorProcess, eventually

pytestmark = pytest.mark.integration

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
SAMPLES = sorted((ROOT / "deploy" / "samples").glob("*.yaml"))


async def kubectl(kubeconfig: Path, *args: str) -> tuple[int, str]:
    # A subprocess through asyncio: the emulator serving kubectl runs on this very loop.
    proc = await asyncio.create_subprocess_exec(
        KUBECTL, f"--kubeconfig={kubeconfig}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


@pytest.mark.skipif(not Path(KUBECTL).exists(), reason="kubectl is not installed")
async def test_every_sample_applies_and_get_shows_printer_columns(
        emulator: Emulator, kubeconfig: Path, operator: OperatorProcess) -> None:
    assert SAMPLES, "deploy/samples/ has no samples"
    expected: list[str] = []
    for sample in SAMPLES:
        code, out = await kubectl(kubeconfig, "apply", "--validate=false", "-f", str(sample))
        assert code == 0, f"kubectl apply -f {sample.name} failed:\n{out}"
        assert "created" in out, out
        for doc in yaml.safe_load_all(sample.read_text()):
            if doc and doc.get("kind") == "LLMDeployment":
                expected.append(doc["metadata"]["name"])
    for name in expected:
        assert emulator.read(LLMD, "default", name) is not None, name

    # Re-applying is idempotent: kubectl's client-side apply computes a patch against its annotation.
    code, out = await kubectl(kubeconfig, "apply", "--validate=false", "-f", str(SAMPLES[0]))
    assert code == 0 and ("unchanged" in out or "configured" in out), out

    # The operator fills status, which the printer columns show.
    await eventually(lambda: all((emulator.read(LLMD, "default", n) or {}).get("status", {}).get("phase")
                                 for n in expected), what="every sample to have a phase", logs=operator.logs)
    code, out = await kubectl(kubeconfig, "get", "llmd")
    assert code == 0, out
    lines = out.strip().splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "POLICY", "EDGE", "CLOUD", "AGE"], out
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == sorted(expected)
    smollm2 = rows["smollm2"]
    assert smollm2[1] == "Compressing" and smollm2[2] == "cascade" and smollm2[3] == "0/1" and smollm2[4] == "0/1"

    code, out = await kubectl(kubeconfig, "get", "llmdeployments.stratus.dev", "smollm2", "-o", "yaml")
    assert code == 0, out
    obj = yaml.safe_load(out)
    assert obj["spec"]["routing"]["policy"] == "cascade"
    assert obj["status"]["conditions"]

    code, out = await kubectl(kubeconfig, "delete", "llmd", "smollm2", "--wait=false")
    assert code == 0, out
    await eventually(lambda: emulator.read(LLMD, "default", "smollm2") is None, what="deletion",
                     logs=operator.logs)
