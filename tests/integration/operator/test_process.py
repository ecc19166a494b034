"""The operator process itself: liveness and Prometheus endpoints, namespace-scoped mode."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import kmock
import pytest
import yaml
from kube_emulator import JOBS, LLMD, Emulator
from operator_harness import CRD, ROOT, OperatorProcess, eventually, write_kubeconfig

pytestmark = pytest.mark.integration


def sample(name: str, namespace: str) -> dict[str, object]:
    m = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    m["metadata"].update(name=name, namespace=namespace)
    return m  # type: ignore[no-any-return]


async def test_liveness_and_metrics(emulator: Emulator, operator: OperatorProcess) -> None:
    await emulator.create_obj(LLMD, "default", sample("m", "default"))
    await eventually(lambda: emulator.read_all(JOBS, "default"), what="a Job", logs=operator.logs)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{operator.health_port}/healthz") as r:
            assert r.status == 200
            assert "deployments" in await r.text()  # the probe's own report

        async def reconciled() -> bool:
            async with session.get(f"http://127.0.0.1:{operator.metrics_port}/metrics") as r:
                text = await r.text()
            return 'stratus_operator_reconciles_total{result="ok"}' in text and \
                "stratus_operator_reconcile_duration_seconds_bucket" in text and \
                'stratus_operator_deployments{phase="Compressing"} 1.0' in text

        await eventually(reconciled, what="reconcile metrics")


async def test_namespace_scoped(emulator: Emulator, kubeconfig: Path, tmp_path: Path) -> None:
    op = OperatorProcess(kubeconfig, tmp_path / "scoped.log", args=("--namespace", "team-a"))
    await op.start()
    try:
        await emulator.create_obj(LLMD, "team-b", sample("other", "team-b"))
        await emulator.create_obj(LLMD, "team-a", sample("mine", "team-a"))
        await eventually(lambda: emulator.read_all(JOBS, "team-a"), what="a Job in team-a", logs=op.logs)
        await eventually(lambda: (emulator.read(LLMD, "team-a", "mine") or {}).get("status"), what="status")
        assert emulator.read_all(JOBS, "team-b") == []
        assert "status" not in (emulator.read(LLMD, "team-b", "other") or {})
    finally:
        await op.stop()


async def test_scoped_operator_is_not_live_until_the_crd_is_served(tmp_path: Path) -> None:
    """Scoped to named namespaces kopf does not watch for new CRDs, so liveness fails (and the pod restarts)."""
    emu = Emulator()
    async with emu, kmock.Server(emu):
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(emu.url).rstrip("/"))
        op = OperatorProcess(kubeconfig, tmp_path / "scoped.log", args=("--namespace", "team-a"))
        try:
            with pytest.raises(AssertionError, match="not healthy"):
                await op.start(healthy_within=10)
            url = f"http://127.0.0.1:{op.health_port}/healthz"
            async with aiohttp.ClientSession() as session, session.get(url) as r:
                assert r.status == 500  # at once: the kubelet's probe times out after 1 s
            assert "install the CRD" in op.logs()
            emu.register_crd(yaml.safe_load(CRD.read_text()))
            await op.stop()
            await op.start()  # what the kubelet does after the failed liveness probes
            await emu.create_obj(LLMD, "team-a", sample("mine", "team-a"))
            await eventually(lambda: emu.read_all(JOBS, "team-a"), what="a Job in team-a", logs=op.logs)
        finally:
            await op.stop()
