"""The real operator under a batch of malformed LLMDeployments mixed with valid ones: no crash, no hang."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from kube_emulator import DEPLOYMENTS, JOBS, LLMD, SECRETS, Emulator
from operator_harness import ROOT, OperatorProcess, eventually

sys.path.insert(0, str(ROOT / "tests" / "unit" / "operator"))
from bad_manifests import Case, bad_manifests, valid_manifests

pytestmark = pytest.mark.integration

NS = "default"
BAD, GOOD = 160, 40


def generate() -> tuple[list[Case], list[dict[str, Any]]]:
    bad: dict[str, Case] = {}
    good: list[dict[str, Any]] = []

    @settings(max_examples=BAD * 3, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(bad_manifests())
    def collect_bad(case: Case) -> None:
        if len(bad) < BAD:
            bad.setdefault(repr(case.manifest), case)

    @settings(max_examples=GOOD, deadline=None, database=None)
    @given(valid_manifests())
    def collect_good(m: dict[str, Any]) -> None:
        good.append(m)

    collect_bad()
    collect_good()
    return list(bad.values()), good[:GOOD]


def phase(emu: Emulator, name: str) -> str | None:
    obj = emu.read(LLMD, NS, name) or {}
    return (obj.get("status") or {}).get("phase")


def ready_condition(emu: Emulator, name: str) -> dict[str, Any]:
    obj = emu.read(LLMD, NS, name) or {}
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), {})


async def test_malformed_batch_never_wedges_the_operator(emulator: Emulator, operator: OperatorProcess) -> None:
    emu = emulator
    bad, good = generate()
    assert len(bad) >= 150 and len(good) == GOOD
    objects: list[tuple[str, dict[str, Any], Case | None]] = []
    for i, case in enumerate(bad):
        objects.append((f"bad-{i}", case.manifest, case))
    for i, manifest in enumerate(good):
        objects.append((f"good-{i}", manifest, None))
    # Interleave, so valid objects queue behind malformed ones.
    objects.sort(key=lambda o: int(o[0].split("-")[1]) * 2 + (o[2] is None))
    started = asyncio.get_running_loop().time()
    for name, manifest, _ in objects:
        body = {**manifest, "metadata": {"name": name, "namespace": NS}}
        # Past the CRD's validation, as on a cluster whose CRD lacks the schema (an older or hand-made one):
        # the operator itself must cope. The CRD's own refusals are tested in tests/unit/operator.
        await emu.create_obj(LLMD, NS, body, validate=False)

    good_names = [n for n, _, c in objects if c is None]
    bad_cases = {n: c for n, _, c in objects if c is not None}

    def reconciled() -> int:
        return sum(phase(emu, n) in ("Compressing", "Deploying") for n in good_names)

    await eventually(lambda: reconciled() == len(good_names), timeout=90, what="every valid object reconciled",
                     logs=operator.logs)
    await eventually(lambda: all(phase(emu, n) == "Failed" for n in bad_cases), timeout=60,
                     what="every malformed object marked Failed", logs=operator.logs)
    elapsed = asyncio.get_running_loop().time() - started

    unnamed = []
    for name, case in bad_cases.items():
        cond = ready_condition(emu, name)
        assert cond.get("reason") == "InvalidSpec", (name, case.kind, cond)
        if case.field not in cond.get("message", ""):
            unnamed.append((case.kind, case.field, cond.get("message")))
    assert not unnamed, unnamed[:5]
    # The valid ones got their children; the malformed ones got none.
    instances = {(d["metadata"].get("labels") or {}).get("app.kubernetes.io/instance")
                 for d in emu.read_all(DEPLOYMENTS, NS)}
    assert set(good_names) <= instances and not instances & set(bad_cases)
    jobs = {(j["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") for j in emu.read_all(JOBS, NS)}
    assert not jobs & set(bad_cases)
    # mTLS: each good deployment has its CA Secret (beside one per server and router); the malformed have none.
    secrets = emu.read_all(SECRETS, NS)
    assert sorted(s["metadata"]["name"] for s in secrets if s["metadata"]["name"].endswith("-ca")) == sorted(
        f"{n}-ca" for n in good_names)
    owners = {(s["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") for s in secrets}
    assert owners == set(good_names)
    # Deleting them all: every finalizer runs, malformed or not; nothing is left behind.
    for name, _, _ in objects:
        await emu.delete_obj(LLMD, NS, name)
    await eventually(lambda: not emu.read_all(LLMD, NS), timeout=60, what="every object deleted",
                     logs=operator.logs)
    # A reconcile already under way when its owner went may still create a child; the emulator collects
    # garbage only when an owner is removed, a real API server's collector at any time: it needs the owner
    # reference, which every child carries.
    for key in (DEPLOYMENTS, JOBS, SECRETS):
        assert all(o["metadata"].get("ownerReferences") for o in emu.read_all(key, NS)), key
    # Alive, healthy, and no handler blew up along the way.
    assert operator.proc is not None and operator.proc.returncode is None
    await operator.wait_healthy(timeout=5)
    logs = operator.logs()
    assert "Traceback" not in logs, logs[logs.index("Traceback") - 2000:][:6000]
    kinds = len({c.kind for c in bad_cases.values()})
    print(f"\n{len(bad_cases)} malformed ({kinds} kinds) + {len(good_names)} valid: "
          f"all valid reconciled, all malformed Failed/InvalidSpec naming the field, in {elapsed:.1f}s")
