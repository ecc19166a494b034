"""The operator scoped to exact namespace names, held to exactly the RBAC the Helm chart renders for that mode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_emulator import (
    CLUSTERROLEBINDINGS,
    CLUSTERROLES,
    JOBS,
    LLMD,
    NODES,
    ROLEBINDINGS,
    ROLES,
    Emulator,
)
from kube_emulator.rbac import service_account
from kube_emulator.server import AuditRecord
from operator_harness import ROOT, OperatorProcess, eventually, write_kubeconfig

pytestmark = pytest.mark.integration

helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart")

RELEASE_NAMESPACE = "stratus-system"
WATCHED = ["team-a", "team-c"]
RBAC_KEYS = {"ClusterRole": CLUSTERROLES, "ClusterRoleBinding": CLUSTERROLEBINDINGS, "Role": ROLES,
             "RoleBinding": ROLEBINDINGS}
Edit = Callable[[dict[str, Any]], None]


def chart_objects(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(ROOT / "charts" / "stratus") as chart:
        rendered = chart.render(values, name="stratus", namespace=RELEASE_NAMESPACE, is_install=True)
    return [o for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for o in yaml.safe_load_all(text) if o]


def sample(name: str, namespace: str) -> dict[str, Any]:
    m: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "samples" / "smollm2.yaml").read_text())
    m["metadata"].update(name=name, namespace=namespace)
    return m


async def start_with_chart_rbac(emu: Emulator, tmp_path: Path, edit: Edit | None = None) -> tuple[OperatorProcess, str]:
    """Load the chart's RBAC for WATCHED into the emulator (after `edit`), and start the operator as the chart's
    ServiceAccount with the STRATUS_NAMESPACES the chart's Deployment gives it. Returns it and its user name."""
    objects = chart_objects({"watchNamespaces": WATCHED})
    subjects = set()
    for obj in objects:
        if obj["kind"] in RBAC_KEYS:
            if edit is not None:
                edit(obj)
            await emu.create_obj(RBAC_KEYS[obj["kind"]], obj["metadata"].get("namespace"), obj)
            subjects |= {(s["namespace"], s["name"]) for s in obj.get("subjects") or []}
    ((sa_namespace, sa_name),) = subjects
    (deployment,) = (o for o in objects if o["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["STRATUS_NAMESPACES"] == ",".join(WATCHED)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(emu.url).rstrip("/"))
    user = service_account(sa_namespace, sa_name)
    emu.add_user("emulator-token", user)  # the token write_kubeconfig gives the operator
    op = OperatorProcess(kubeconfig, tmp_path / "operator.log", env={"STRATUS_NAMESPACES": env["STRATUS_NAMESPACES"]},
                         args=())
    await op.start()
    return op, user.name


def refused(emu: Emulator, user: str) -> list[AuditRecord]:
    return [r for r in emu.audit if r.user == user and r.code == 403]


async def test_exact_names_reconcile_with_exactly_the_charts_rbac(emulator: Emulator, tmp_path: Path) -> None:
    """No namespaces or CRDs granted (kopf's discovery is off), and nothing the operator calls is refused."""
    op, user = await start_with_chart_rbac(emulator, tmp_path)
    try:
        granted = {(g, res) for role in emulator.read_all(CLUSTERROLES) for rule in role["rules"]
                   for g in rule["apiGroups"] for res in rule["resources"]}
        assert granted == {("", "nodes")}
        await emulator.create_obj(LLMD, "team-b", sample("other", "team-b"))
        await emulator.create_obj(LLMD, "team-a", sample("mine", "team-a"))
        await eventually(lambda: emulator.read_all(JOBS, "team-a"), what="a Job in team-a", logs=op.logs)
        await eventually(lambda: (emulator.read(LLMD, "team-a", "mine") or {}).get("status"), what="status",
                         logs=op.logs)
        assert emulator.read_all(JOBS, "team-b") == []
        # It worked through the chart's Roles and its one ClusterRole, and was refused nothing.
        calls = {(r.verb, r.key, r.namespace) for r in emulator.audit if r.user == user and r.code < 400}
        assert {("watch", LLMD, "team-a"), ("watch", LLMD, "team-c"), ("create", JOBS, "team-a"),
                ("watch", NODES, None)} <= calls
        assert refused(emulator, user) == [], op.logs()[-4000:]
    finally:
        await op.stop()


def _without_job_create(obj: dict[str, Any]) -> None:
    if obj["kind"] == "Role":
        for rule in obj["rules"]:
            if "jobs" in rule["resources"]:
                rule["verbs"].remove("create")


async def test_a_missing_rule_is_refused_with_403(emulator: Emulator, tmp_path: Path) -> None:
    """The same RBAC less one verb: the API server refuses that call, so the RBAC above is really enforced."""
    op, user = await start_with_chart_rbac(emulator, tmp_path, _without_job_create)
    try:
        await emulator.create_obj(LLMD, "team-a", sample("mine", "team-a"))
        denied = await eventually(lambda: refused(emulator, user), what="a 403", logs=op.logs)
        assert {(r.verb, r.key, r.namespace) for r in denied} == {("create", JOBS, "team-a")}
        assert 'cannot create resource "jobs" in API group "batch" in the namespace "team-a"' in denied[0].message
        assert emulator.read_all(JOBS, "team-a") == []
    finally:
        await op.stop()
