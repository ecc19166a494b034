"""The chart configures the operator through exactly the STRATUS_* variables and flags the operator reads."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest
from chart_support import Manifest, Render

pytestmark = pytest.mark.unit

config_module = pytest.importorskip("stratus_operator.config", reason="the operator's Config is not written yet")
Config = config_module.Config

# Config fields the chart deliberately leaves at their defaults.
NOT_CHART_VALUES = {
    "STRATUS_PEERING": "the chart runs one replica (Recreate), so kopf peering stays off",
    "STRATUS_FINALIZER": "an internal name, not a deployment choice",
}


def _config_variables() -> set[str]:
    return {config_module.PREFIX + f.name.upper() for f in dataclasses.fields(Config)}


def _operator_container(objects: list[Manifest]) -> Manifest:
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    container: Manifest = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def _env(objects: list[Manifest]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _operator_container(objects)["env"]}


def test_every_variable_the_chart_sets_is_read_by_the_operator(default_objects: list[Manifest]) -> None:
    assert set(_env(default_objects)) - _config_variables() == set()


def test_every_operator_setting_is_a_chart_value(default_objects: list[Manifest]) -> None:
    assert _config_variables() - set(_env(default_objects)) - set(NOT_CHART_VALUES) == set()


NON_DEFAULT: dict[str, Any] = {
    "watchNamespaces": ["team-a", "team-b"], "metrics": {"port": 9100}, "healthPort": 8090, "resyncSeconds": 12.5,
    "workerLimit": 4,
    "cloud": {"gpuResourceName": "amd.com/gpu", "nodeSelector": {"pool": "a100"},
              "tolerations": [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    "images": {"cloud": {"repository": "registry.example.com/stratus-workers-cloud", "tag": "1.0-cuda"},
               "edge": {"repository": "registry.example.com/stratus-workers-edge", "tag": ""}},
    "workloads": {"imagePullSecrets": ["regcred", "mirror"], "serviceAccountName": "stratus-workloads"},
    "edge": {"nodeSelector": {"stratus.dev/edge": None, "example.com/edge": "yes"},
             "tolerations": [{"key": "example.com/edge", "operator": "Exists", "effect": "NoExecute",
                              "tolerationSeconds": 30}]},
}


@pytest.mark.parametrize("values", [None, NON_DEFAULT], ids=["default", "non-default"])
def test_operator_parses_what_the_chart_sets(
    chart: Any, render: Render, values: dict[str, Any] | None
) -> None:
    objects = render(values)
    config = Config.from_env(_env(objects))
    expected = values or {}
    merged = chart.merge_values(values)
    assert config.namespaces == tuple(expected.get("watchNamespaces", ()))
    assert dict(config.edge_node_selector) == merged["edge"]["nodeSelector"]
    assert [dict(t) for t in config.edge_tolerations] == merged["edge"]["tolerations"]
    assert config.gpu_resource_name == merged["cloud"]["gpuResourceName"]
    assert dict(config.cloud_node_selector) == merged["cloud"]["nodeSelector"]
    assert [dict(t) for t in config.cloud_tolerations] == merged["cloud"]["tolerations"]
    assert config.image_pull_secrets == tuple(merged["workloads"]["imagePullSecrets"])
    assert config.service_account == merged["workloads"]["serviceAccountName"]
    if values is None:  # one image for every tier, and the GPU taint tolerated by default
        assert (config.cloud_image, config.edge_image) == ("", "")
        assert [dict(t) for t in config.cloud_tolerations] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    else:
        assert config.cloud_image == "registry.example.com/stratus-workers-cloud:1.0-cuda"
        assert config.edge_image == "registry.example.com/stratus-workers-edge:0.1.0"
    assert config.image == "ghcr.io/stratus-llm/stratus-workers:0.1.0"
    assert config.metrics_port == expected.get("metrics", {}).get("port", 9090)
    assert config.resync_seconds == expected.get("resyncSeconds", 60)
    assert config.worker_limit == expected.get("workerLimit", 0)
    # The liveness probe and the declared port are the ones the operator serves /healthz on.
    container = _operator_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == config.health_port == expected.get("healthPort", 8081)
    assert ports["metrics"] == config.metrics_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_metrics_disabled_turns_the_endpoint_off(render: Render) -> None:
    assert Config.from_env(_env(render({"metrics": {"enabled": False}}))).metrics_port == 0


def _choices(parser: argparse.ArgumentParser, dest: str) -> list[str]:
    action = next(a for a in parser._actions if a.dest == dest)
    assert action.choices is not None
    return list(action.choices)


def test_log_flags_are_the_cli_s_and_accept_every_schema_value(chart: Any) -> None:
    cli = pytest.importorskip("stratus_operator.cli")
    parser = cli.build_parser()
    schema = chart.schema["properties"]
    assert sorted(schema["logLevel"]["enum"]) == sorted(_choices(parser, "log_level"))
    assert sorted(schema["logFormat"]["enum"]) == sorted(_choices(parser, "log_format"))
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "operator" not in subcommands:
        pytest.skip("`stratus operator` is not registered yet (stratus_operator/cli/operator.py)")
    args = parser.parse_args(["--log-level", "debug", "--log-format", "text", "operator"])
    assert (args.log_level, args.log_format, args.command) == ("debug", "text", "operator")
