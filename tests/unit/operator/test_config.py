"""The operator's Config from STRATUS_* variables (the workers' settings parser), and the render defaults it sets."""

from __future__ import annotations

import dataclasses

import pytest

from stratus_operator.config import Config, named_namespaces_only
from stratus_operator.render import RenderOptions

pytestmark = pytest.mark.unit


def test_config_from_env() -> None:
    config = Config.from_env({"STRATUS_NAMESPACES": "a, b*", "STRATUS_METRICS_PORT": "0",
                              "STRATUS_RESYNC_SECONDS": "12.5", "STRATUS_IMAGE": "x/y:z", "UNRELATED": "1"})
    assert config.namespaces == ("a", "b*") and config.metrics_port == 0 and config.resync_seconds == 12.5
    assert RenderOptions.from_config(config).image == "x/y:z"
    assert Config.from_env({}) == Config()
    assert Config.from_env({"STRATUS_NAMESPACES": ""}).namespaces == ()
    with pytest.raises(ValueError, match="STRATUS_HEALTH_PORT"):
        Config.from_env({"STRATUS_HEALTH_PORT": "eighty"})


def test_every_field_is_documented() -> None:
    for f in dataclasses.fields(Config):
        assert f.metadata.get("help"), f.name


def test_json_fields() -> None:
    config = Config.from_env({
        "STRATUS_EDGE_NODE_SELECTOR": '{"node-role/edge": "yes"}',
        "STRATUS_EDGE_TOLERATIONS": '[{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}]',
        "STRATUS_GPU_RESOURCE_NAME": "amd.com/gpu",
    })
    assert config.edge_node_selector == {"node-role/edge": "yes"}
    assert config.edge_tolerations == ({"key": "edge", "operator": "Exists", "effect": "NoSchedule"},)
    assert config.gpu_resource_name == "amd.com/gpu"
    for bad in ('{"a": 1}', "[1]", "not json"):
        with pytest.raises(ValueError, match="STRATUS_EDGE_NODE_SELECTOR"):
            Config.from_env({"STRATUS_EDGE_NODE_SELECTOR": bad})
    with pytest.raises(ValueError, match=r"STRATUS_EDGE_TOLERATIONS=.*operator"):
        Config.from_env({"STRATUS_EDGE_TOLERATIONS": '[{"operator": "Sometimes"}]'})


def test_render_defaults_are_the_configs() -> None:
    """One source: a RenderOptions() and one built from a default Config are the same."""
    assert RenderOptions() == RenderOptions.from_config(Config())
    options = RenderOptions.from_config(Config.from_env({"STRATUS_CACHE_HOST_PATH": "", "STRATUS_S3_IMAGE": "aws:1",
                                                         "STRATUS_JOB_DEADLINE_SECONDS": "60",
                                                         "STRATUS_IMAGE_PULL_POLICY": "Always"}))
    assert (options.cache_host_path, options.s3_image, options.job_active_deadline_seconds,
            options.image_pull_policy) == ("", "aws:1", 60, "Always")


def test_only_exact_namespace_names_skip_kopfs_discovery() -> None:
    assert Config.from_env({"STRATUS_NAMESPACES": "team-a,team-b"}).named_namespaces_only
    for patterns in ("team-*", "team-?", "!kube-system", "team-[ab]", ""):
        assert not Config.from_env({"STRATUS_NAMESPACES": patterns}).named_namespaces_only, patterns
    # The chart's RBAC decision is generated from the same characters (tests/unit/deploy/test_deploy_rbac.py).
    assert named_namespaces_only(("team-a",)) and not named_namespaces_only(())
    assert not named_namespaces_only(("team-a", "team-*"))
